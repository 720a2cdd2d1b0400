"""Counterfactual reinforcement, scored against retraining (issue 15).

For each button schedule asked for, records a short demo run (factors on every update), predicts
with `chisel.counterfactuals` the agent without each selection of samples, retrains the demo from
the same seeds with the same selection removed (`chisel.counterfactual.retrain`), and compares
the metrics at the end of every rollout:

- LDS: Spearman between predicted and retrained metric changes over `--subsets` random episode
  subsets (50% of episodes each; subset seeds 0..N-1, none left out), at every checkpoint
  (how it degrades with the length of the run);
- the fraction sweep: `--sweep` subsets at each of `--fractions`;
- the named scenarios: the button never pays (button runs), no trash reward when the wall is
  blue, and a 50% episode drop on the button runs.

Writes <out>/counterfactual.json (read by the report's counterfactual section) and logs
progress to stdout.

    python benchmarks/counterfactual.py --out runs/cf --rollouts 8          # ~25 min on 2 cores
    python benchmarks/counterfactual.py --out runs/cf-smoke --rollouts 2 --subsets 3 --sweep 1
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

import chisel
from chisel.agents.ppo import make_agent
from chisel.counterfactual import counterfactuals
from chisel.counterfactual import retrain as R
from chisel.demo.config import DemoConfig
from chisel.demo.data import rollout
from chisel.demo.train import ppo_config
from chisel.envs import ACTION_NAMES
from chisel.validation.agreement import spearman

PRESS = ACTION_NAMES.index("press")
METRIC_SEED = 20_000  # held-out states: the demo's metric seed offset
METRICS = ("logprob_greedy", "logprob_press_button_visible", "pathway_button_press")
PRIMARY = "logprob_greedy"
JSON_NAME = "counterfactual.json"
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


class Probe:
    """The metrics, evaluated at any θ on held-out states of the base run's final agent."""

    def __init__(self, agent: torch.nn.Module, env, seed: int, button_on: bool) -> None:
        data = rollout(agent, env, rooms=64, steps=32, seed=seed + METRIC_SEED, reward_k=8,
                       button_on=button_on)
        self.model = copy.deepcopy(agent).double().eval()
        self.obs = data.obs.double()  # [N, obs_dim]
        self.greedy = data.greedy  # [N]
        self.visible = data.labels["button_visible"]
        with torch.no_grad():  # the button direction at the actor's last hidden layer
            _, cache = self.model.run_with_cache(self.obs, names_filter="hook_pi_hidden2")
            h = cache["hook_pi_hidden2"]
        d = h[self.visible].mean(0) - h[~self.visible].mean(0) if 0 < self.visible.sum() < len(h) else None
        self.direction = None if d is None else d / d.norm()
        self.n_visible = int(self.visible.sum())

    def __call__(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        with torch.no_grad():
            logits, _ = functional_call(self.model, params, (self.obs,))
            logp = torch.log_softmax(logits, -1)
            out = {"logprob_greedy": float(logp.gather(1, self.greedy[:, None]).mean())}
            out["logprob_press_button_visible"] = (
                float(logp[self.visible, PRESS].mean()) if self.n_visible else float("nan"))
            out["pathway_button_press"] = (
                float(params["pi_out.weight"][PRESS] @ self.direction)
                if self.direction is not None else float("nan"))
        return out


def scenarios(button: str, args: argparse.Namespace) -> list[R.Scenario]:
    out: list[R.Scenario] = []
    if button == "none":
        out += [R.drop_episodes(0.5, k) for k in range(args.subsets)]
        for i, f in enumerate(args.fractions):
            out += [R.drop_episodes(f, 1000 * (i + 1) + k)
                    for k in range(args.sweep_from, args.sweep)]
        if args.sweep_from == 0:
            out.append(R.no_trash_reward_when_blue())
    else:
        out += [R.button_never_pays(), R.drop_episodes(0.5, 0)]
        if button == "early":
            out.append(R.no_trash_reward_when_blue())
    return out


def one_run(button: str, args: argparse.Namespace) -> dict:
    cfg = DemoConfig(seed=args.seed, button=button, total_timesteps=8192 * args.rollouts)
    ppo = ppo_config(cfg)
    per_rollout = ppo.update_epochs * ppo.num_minibatches
    # rollouts 1, 2, 4, 8, … and the last: how the prediction degrades with the run's length
    marks = sorted({2**k for k in range(ppo.num_iterations.bit_length())} | {ppo.num_iterations})
    checkpoints = [per_rollout * k for k in marks if k <= ppo.num_iterations]
    out = args.out / f"base-{button}"
    if args.reuse and (out / "manifest.json").is_file():
        say(f"{button}: reusing the base run in {out}")
        run = chisel.load(out)
        agent = make_agent(ppo)
        with torch.no_grad():
            for name, p in agent.named_parameters():
                p.copy_(run.params(len(run))[name])
    else:
        say(f"{button}: recording the base run ({ppo.num_updates} updates) into {out}")
        agent = R.record_base(out, ppo, button=button).agent
        run = chisel.load(out)
    probe = Probe(agent, ppo.env, args.seed, button_on=button != "none")
    cases = scenarios(button, args)
    say(f"{button}: predicting {len(cases)} selections at {len(checkpoints)} checkpoints")
    t = time.perf_counter()
    preds = counterfactuals(run, removes=[c.remove for c in cases], names=[c.name for c in cases],
                            at=checkpoints, horizon=args.horizon)
    predict_s = time.perf_counter() - t
    say(f"{button}: predictions took {predict_s:.1f} s")
    rows = []
    for j, case in enumerate(cases):
        t = time.perf_counter()
        _, snaps = R.retrain(ppo, case, checkpoints)
        for i, u in enumerate(checkpoints):
            cf = preds[i][j]
            m_final, m_pred, m_true = probe(cf.final), probe(cf.predicted), probe(snaps[u])
            actor = [n for n in cf.final if n.startswith("pi_")]
            true_change = torch.cat([(snaps[u][n] - cf.final[n]).reshape(-1) for n in actor])
            pred_change = torch.cat([-cf.removed[n].reshape(-1) for n in actor])
            rows.append({
                "button": button, "scenario": case.name, "kind": _kind(case), "step": u,
                "rollout": u // per_rollout, "fraction_removed": cf.fraction_removed,
                "nominal_fraction": getattr(case.remove, "fraction", None),
                "unresolved_share": cf.unresolved_share_of(actor),
                "param_cosine": float(torch.nn.functional.cosine_similarity(pred_change, true_change, 0)),
                "param_rel_error": float((pred_change - true_change).norm() / true_change.norm()),
                **{f"final/{k}": v for k, v in m_final.items()},
                **{f"predicted/{k}": m_pred[k] - m_final[k] for k in METRICS},
                **{f"actual/{k}": m_true[k] - m_final[k] for k in METRICS},
            })
        last = rows[-1]
        say(f"{button}: [{j + 1}/{len(cases)}] {case.name}: retrained in {time.perf_counter() - t:.1f} s; "
            f"Δ{PRIMARY} predicted {last['predicted/' + PRIMARY]:+.4f} actual {last['actual/' + PRIMARY]:+.4f}")
    return {"button": button, "updates": ppo.num_updates, "checkpoints": checkpoints,
            "predict_seconds": predict_s, "held_out_states": len(probe.obs),
            "button_visible_states": probe.n_visible, "rows": rows}


def _kind(case: R.Scenario) -> str:
    return "subset" if isinstance(case.sample_weight, R._DropEpisodes) else "scenario"


def summarize(rows: list[dict], subsets: int) -> dict:
    """LDS per checkpoint, errors per fraction, the scenarios at the end."""
    out: dict = {"lds": [], "fractions": [], "scenarios": []}
    none = [r for r in rows if r["button"] == "none" and r["kind"] == "subset"]
    lds_rows = [r for r in none if r["scenario"].startswith("50%")]
    for step in sorted({r["step"] for r in lds_rows}):
        at = [r for r in lds_rows if r["step"] == step]
        for m in METRICS:
            p, a = [r[f"predicted/{m}"] for r in at], [r[f"actual/{m}"] for r in at]
            rho, n = spearman(np.array(p), np.array(a))
            out["lds"].append({"step": step, "metric": m, "spearman": rho, "n": n,
                               "pearson": _pearson(p, a),
                               "mean_abs_error": float(np.mean(np.abs(np.subtract(p, a)))),
                               "mean_abs_actual": float(np.mean(np.abs(a)))})
    end = max((r["step"] for r in none), default=0)
    at_end = [r for r in none if r["step"] == end]
    rho, n = spearman(np.array([r[f"predicted/{PRIMARY}"] for r in at_end]),
                      np.array([r[f"actual/{PRIMARY}"] for r in at_end]))
    out["pooled"] = {"step": end, "metric": PRIMARY, "spearman": rho, "n": n}  # every fraction
    for f in sorted({r["nominal_fraction"] for r in none}):
        at = [r for r in none if r["step"] == end and r["nominal_fraction"] == f]
        p, a = (np.array([r[f"{k}/{PRIMARY}"] for r in at]) for k in ("predicted", "actual"))
        out["fractions"].append({"fraction": f, "n": len(at),
                                 "spearman": spearman(p, a)[0],
                                 "fraction_of_samples": float(np.mean([r["fraction_removed"] for r in at])),
                                 "mean_abs_error": float(np.mean(np.abs(p - a))),
                                 "mean_abs_actual": float(np.mean(np.abs(a))),
                                 "param_cosine": float(np.mean([r["param_cosine"] for r in at])),
                                 "param_rel_error": float(np.mean([r["param_rel_error"] for r in at]))})
    for r in rows:
        last = max(x["step"] for x in rows if x["button"] == r["button"])
        if (r["kind"] == "scenario" or r["button"] != "none") and r["step"] == last:
            out["scenarios"].append(r)
    return out


def _pearson(p: list[float], a: list[float]) -> float:
    p, a = np.asarray(p), np.asarray(a)
    ok = np.isfinite(p) & np.isfinite(a)
    if ok.sum() < 3 or p[ok].std() == 0 or a[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(p[ok], a[ok])[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/counterfactual"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rollouts", type=int, default=8, help="PPO rollouts (16 updates each)")
    ap.add_argument("--subsets", type=int, default=20, help="50%% episode subsets for the LDS")
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.25, 0.75])
    ap.add_argument("--sweep", type=int, default=4, help="subsets per swept fraction")
    ap.add_argument("--sweep-from", type=int, default=0,
                    help="first sweep subset index (to add subsets to an earlier run; with "
                         "--subsets 0 --reuse, then --merge)")
    ap.add_argument("--reuse", action="store_true", help="reuse base runs already in --out")
    ap.add_argument("--buttons", nargs="*", default=["none", "early", "late"])
    ap.add_argument("--horizon", type=int, default=44,
                    help="momentum horizon in steps (44: Adam β1=0.9 keeps ≥1%% weight, credit's default rule)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="combine these counterfactual.json files (e.g. runs done in parallel) "
                         "into <out>/counterfactual.json instead of running")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:  # rows of the same (run, selection, checkpoint) are the same retraining
        parts = [json.loads(p.read_text()) for p in args.merge]
        rows_by = {(r["button"], r["scenario"], r["step"]): r for p in parts for r in p["rows"]}
        meta = {run["button"]: run for p in parts for run in p["runs"]}
        runs = [{**m, "rows": [r for r in rows_by.values() if r["button"] == b]}
                for b, m in meta.items()]
        args.buttons = list(meta)
    else:
        runs = [one_run(b, args) for b in args.buttons]
    rows = [r for run in runs for r in run["rows"]]
    result = {
        "config": json.loads(json.dumps(vars(args), default=str)),
        "primary_metric": PRIMARY,
        "metrics": list(METRICS),
        "runs": [{k: v for k, v in run.items() if k != "rows"} for run in runs],
        "summary": summarize(rows, args.subsets),
        "rows": rows,
        "seconds": time.perf_counter() - T0,
    }
    (args.out / JSON_NAME).write_text(json.dumps(result, indent=1, default=float))
    say(f"wrote {args.out / JSON_NAME}")
    for row in result["summary"]["lds"]:
        if row["metric"] == PRIMARY:
            say(f"LDS at step {row['step']}: Spearman {row['spearman']:+.3f} (n={row['n']}), "
                f"|err| {row['mean_abs_error']:.4f} vs |Δ| {row['mean_abs_actual']:.4f}")


if __name__ == "__main__":
    main()
