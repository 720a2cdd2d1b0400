"""When does training produce a reward optimizer, and can chisel see it coming?

Trains the reference PPO agent under the three button schedules (none / early / late) for every
seed, recording every update; at checkpoints it runs the choice test (button first, or trash
first, in rooms offering both) and reads the mechanistic predictor (the share of action-selection
reinforcement routed through reward-predictive rather than task features) from a ledger built
with only what existed at that checkpoint. Writes docs/reward-optimizer-study.md (tables),
docs/figures/reward-optimizer.png and studies/results/reward_optimizer.json. Definitions:
docs/reward-optimizer.md.

    python studies/reward_optimizer.py                  # 3 schedules x 5 seeds (~30 min, 1 core)
    python studies/reward_optimizer.py --quick --seeds 1 --out /tmp/ro   # smoke run (seconds)

Every run asked for is reported; runs already in <out>/runs.jsonl with the same settings are
reused (so an interrupted study resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import chisel
from chisel.agents.ppo import PPOConfig, make_agent, make_optimizer, train
from chisel.demo import reward_optimizer as RO
from chisel.envs import TrashWorldConfig
from chisel.validation import spearman

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("none", "early", "late")
CHOICE_SEED = 40_000  # every agent meets the same test rooms
ROUTING_SEED = 50_000


@dataclass(frozen=True)
class StudyConfig:
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    schedules: tuple[str, ...] = SCHEDULES
    total_timesteps: int = 524_288  # the demo's default run: 1,024 updates
    num_envs: int = 128
    num_steps: int = 64
    choice_at: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # fractions of training
    predict_at: tuple[float, ...] = (0.25, 0.5, 1.0)
    choice_rooms: int = 256
    attribute_every: int = 8  # updates attributed for the predictor (every k-th before the checkpoint)
    probe_rooms: int = 32
    probe_steps: int = 48
    metric_states: int = 512

    def ppo(self, schedule: str, seed: int) -> PPOConfig:
        env = TrashWorldConfig(button=schedule, button_after_steps=self.total_timesteps // 2)
        return PPOConfig(env=env, seed=seed, total_timesteps=self.total_timesteps,
                         num_envs=self.num_envs, num_steps=self.num_steps)

    def key(self) -> dict[str, Any]:
        """The settings a stored run must share to be reused."""
        out = dataclasses.asdict(self)
        out.pop("seeds"), out.pop("schedules")
        return json.loads(json.dumps(out))  # as stored (tuples become lists)


QUICK = StudyConfig(seeds=(1,), total_timesteps=8_192, num_envs=32, num_steps=32,
                    choice_rooms=32, attribute_every=2, probe_rooms=16, probe_steps=16,
                    metric_states=128)


def button_trained(schedule: str, step: int, n_steps: int) -> bool:
    """Whether the updates before `step` saw the button (late: the second half only)."""
    return schedule == "early" or (schedule == "late" and step > n_steps // 2)


def one_run(cfg: StudyConfig, schedule: str, seed: int, run_dir: Path,
            say: Callable[[str], None]) -> dict[str, Any]:
    """Train, record, test and read the predictor of one (schedule, seed)."""
    ppo = cfg.ppo(schedule, seed)
    agent, t0 = make_agent(ppo), time.perf_counter()
    optimizer = make_optimizer(agent, ppo)
    with chisel.record(agent, optimizer, run_dir, overwrite=True,
                       metadata={"study": "reward_optimizer", "schedule": schedule}):
        trained = train(ppo, agent=agent, optimizer=optimizer)
    returns = [h.mean_return for h in trained.history]
    train_s = time.perf_counter() - t0
    run = chisel.load(run_dir)
    n = len(run)
    choice = {}
    for f in cfg.choice_at:
        step = round(f * n)
        result = RO.agent_choice(RO.agent_at(agent, run, step), cfg.choice_rooms,
                                 seed=CHOICE_SEED, config=ppo.env)
        choice[str(f)] = {"step": step, **result.summary()}
    predictor = {}
    for f in cfg.predict_at:
        step = round(f * n)
        cr = RO.checkpoint_routing(
            run, agent, step, ppo.env, button_on=button_trained(schedule, step, n),
            seed=ROUTING_SEED + seed, every=cfg.attribute_every, rooms=cfg.probe_rooms,
            rollout_steps=cfg.probe_steps, metric_states=cfg.metric_states)
        predictor[str(f)] = {
            "step": step, "share": _num(cr.routing.final_share), "concepts": cr.concepts,
            "attributed_steps": cr.attributed_steps,
            "curve": {"step": cr.routing.steps.tolist(), "share": [_num(x) for x in
                                                                     cr.routing.share]},
        }
    last = str(cfg.choice_at[-1])
    say(f"  {schedule:>5} seed {seed}: button first in {choice[last]['button']}/"
        f"{choice[last]['rooms']} rooms, predictor@"
        + ", ".join(f"{f}={predictor[str(f)]['share']:.4f}" for f in cfg.predict_at)
        + f"  ({time.perf_counter() - t0:.0f} s, train {train_s:.0f} s)")
    return {"schedule": schedule, "seed": seed, "updates": n, "key": cfg.key(),
            "final_return": _num(np.nanmean(returns[-4:])), "train_seconds": round(train_s, 1),
            "choice": choice, "predictor": predictor}


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def stored_runs(store: Path, cfg: StudyConfig) -> dict[tuple[str, int], dict]:
    """Runs in runs.jsonl made with the same settings, by (schedule, seed)."""
    done = {}
    if store.exists():
        for line in store.read_text().splitlines():
            rec = json.loads(line)
            if rec["key"] == cfg.key():
                done[(rec["schedule"], rec["seed"])] = rec
    return done


def run_study(cfg: StudyConfig, out: Path, say: Callable[[str], None] = print) -> list[dict]:
    """Every (schedule, seed) of `cfg`, reusing runs stored in out/runs.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    store = out / "runs.jsonl"
    done = stored_runs(store, cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = []
        todo = [(s, seed) for seed in cfg.seeds for s in cfg.schedules]
        for i, (schedule, seed) in enumerate(todo):
            if (schedule, seed) in done:
                records.append(done[(schedule, seed)])
                continue
            say(f"[{i + 1}/{len(todo)}] {schedule} seed {seed}")
            rec = one_run(cfg, schedule, seed, out / "runs" / f"{schedule}-seed{seed}", say)
            with store.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            records.append(rec)
    finally:
        torch.set_num_threads(threads)
    return records


# ------------------------------------------------------------------ analysis
def bootstrap_mean(values: np.ndarray, reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over resampled seeds."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(len(values), size=(reps, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def permutation_p(x: np.ndarray, y: np.ndarray, reps: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of Spearman's ρ under random pairings of x and y (finite pairs)."""
    rho, _ = spearman(x, y)
    if not np.isfinite(rho):
        return float("nan")
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    rx = _centred_ranks(x[ok])
    ry = _centred_ranks(y[ok])
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((reps, len(ry))), axis=1)  # [reps, n] random pairings
    rhos = (ry[perms] @ rx) / np.sqrt((rx**2).sum() * (ry**2).sum())
    hits = int((np.abs(rhos) >= abs(rho) - 1e-12).sum())
    return (hits + 1) / (reps + 1)


def _centred_ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties shared), centred: the ranks chisel.validation.spearman uses."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        tie = v == value
        ranks[tie] = ranks[tie].mean()
    return ranks - ranks.mean()


def analyse(records: list[dict], cfg: StudyConfig) -> dict[str, Any]:
    final = str(cfg.choice_at[-1])
    per_schedule = {}
    for s in cfg.schedules:
        recs = [r for r in records if r["schedule"] == s]
        rows = {}
        for f in cfg.choice_at:
            rates = np.array([r["choice"][str(f)]["button_rate"] for r in recs])
            lo, hi = bootstrap_mean(rates)
            rows[str(f)] = {"mean": float(rates.mean()), "ci": [lo, hi], "runs": rates.tolist(),
                            "reward_optimizers": sum(r["choice"][str(f)]["reward_optimizer"]
                                                     for r in recs)}
        per_schedule[s] = rows
    y = np.array([r["choice"][final]["button_rate"] for r in records])
    corr = {}
    for f in cfg.predict_at:
        x = np.array([np.nan if r["predictor"][str(f)]["share"] is None
                      else r["predictor"][str(f)]["share"] for r in records])
        rho, n = spearman(x, y)
        corr[str(f)] = {"rho": _num(rho), "n": n, "p": _num(permutation_p(x, y)),
                        **within_schedules(x, y, [r["schedule"] for r in records])}
    baseline = {}  # the behaviour itself, measured early: does the ledger add to it?
    for f in cfg.choice_at[:-1]:
        x = np.array([r["choice"][str(f)]["button_rate"] for r in records])
        rho, n = spearman(x, y)
        baseline[str(f)] = {"rho": _num(rho), "n": n, "p": _num(permutation_p(x, y)),
                            **within_schedules(x, y, [r["schedule"] for r in records])}
    return {"per_schedule": per_schedule, "spearman_vs_final_choice": corr,
            "baseline_choice_vs_final_choice": baseline}


def within_schedules(x: np.ndarray, y: np.ndarray, groups: list[str], reps: int = 10_000,
                     seed: int = 0) -> dict[str, Any]:
    """Does the predictor rank runs *within* a schedule? Spearman's ρ in each schedule, their
    mean over schedules where it is defined, and the permutation p of that mean with y shuffled
    inside each schedule (the schedule itself, which decides whether a button was ever
    rewarded, is then no help)."""
    x, y, g = np.asarray(x, float), np.asarray(y, float), np.asarray(groups)
    per = {s: _num(spearman(x[g == s], y[g == s])[0]) for s in dict.fromkeys(groups)}
    defined = [s for s, v in per.items() if v is not None]
    if not defined:
        return {"rho_within": per, "rho_within_mean": None, "p_within": None}
    observed = float(np.mean([per[s] for s in defined]))
    rng = np.random.default_rng(seed)
    null = np.zeros(reps)
    for s in defined:
        ok = (g == s) & np.isfinite(x) & np.isfinite(y)
        rx, ry = _centred_ranks(x[ok]), _centred_ranks(y[ok])
        perms = np.argsort(rng.random((reps, len(ry))), axis=1)
        null += (ry[perms] @ rx) / np.sqrt((rx**2).sum() * (ry**2).sum()) / len(defined)
    hits = int((np.abs(null) >= abs(observed) - 1e-12).sum())
    return {"rho_within": per, "rho_within_mean": observed, "p_within": (hits + 1) / (reps + 1)}


# ------------------------------------------------------------------ outputs
COLOURS = {"none": "#4477aa", "early": "#cc3311", "late": "#228833"}


def figure(records: list[dict], analysis: dict, cfg: StudyConfig):
    """Choice rate over training per schedule; the predictor's curves; predictor vs choice."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), dpi=110, layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    xs = [100 * f for f in cfg.choice_at]
    for i, s in enumerate(cfg.schedules):
        rows = analysis["per_schedule"][s]
        means = [rows[str(f)]["mean"] for f in cfg.choice_at]
        lo = [rows[str(f)]["mean"] - rows[str(f)]["ci"][0] for f in cfg.choice_at]
        hi = [rows[str(f)]["ci"][1] - rows[str(f)]["mean"] for f in cfg.choice_at]
        off = (i - 1) * 1.5
        ax1.errorbar([x + off for x in xs], means, yerr=[lo, hi], color=COLOURS.get(s), marker="o",
                     capsize=3, label=f"button {s}")
        for r in (r for r in records if r["schedule"] == s):
            ax1.plot([x + off for x in xs], [r["choice"][str(f)]["button_rate"]
                                             for f in cfg.choice_at],
                     color=COLOURS.get(s), alpha=0.25, lw=0.8)
    ax1.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax1.set(xlabel="% of training", ylabel="button-first rate (choice test)", ylim=(-0.03, 1.03),
            title="Choice test (mean over seeds, 95% bootstrap CI)")
    ax1.legend(fontsize=8)
    last = str(cfg.predict_at[-1])
    for r in records:
        c = COLOURS.get(r["schedule"])
        curve = r["predictor"][last]["curve"]
        ax2.plot(100 * np.array(curve["step"]) / r["updates"],
                 [np.nan if v is None else v for v in curve["share"]], color=c, alpha=0.5, lw=0.8)
        for f in cfg.predict_at[:-1]:
            v = r["predictor"][str(f)]["share"]
            if v is not None:
                ax2.plot(100 * f, v, "o", color=c, ms=4, alpha=0.8)
    ax2.set(xlabel="% of training", ylabel="reward-predictive share",
            title="Predictor (lines: final probes; dots: at checkpoint)")
    final = str(cfg.choice_at[-1])
    for f, marker in zip(cfg.predict_at[:2], ("o", "s"), strict=False):
        for r in records:
            v = r["predictor"][str(f)]["share"]
            if v is not None:
                ax3.plot(v, r["choice"][final]["button_rate"], marker, color=COLOURS.get(
                    r["schedule"]), alpha=0.8, mfc="none" if marker == "s" else None)
        rho = analysis["spearman_vs_final_choice"][str(f)]["rho"]
        ax3.plot([], [], marker, color="k", mfc="none" if marker == "s" else None,
                 label=f"at {100 * f:.0f}%: ρ = {'nan' if rho is None else f'{rho:.2f}'}")
    ax3.set(xlabel="predictor (reward-predictive share)", ylabel="final button-first rate",
            title="Does the predictor see it coming?")
    ax3.legend(fontsize=8)
    return fig


def _pct(x: float | None) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{100 * x:.0f}%"


def _f(x: float | None, d: int = 3) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def markdown(records: list[dict], analysis: dict, cfg: StudyConfig, command: str,
             timing: str) -> str:
    final = str(cfg.choice_at[-1])
    lines = [
        "# Reward-optimizer study: results",
        "",
        "Generated by `studies/reward_optimizer.py`; definitions and discussion in",
        "[reward-optimizer.md](reward-optimizer.md). Regenerate with:",
        "",
        f"    {command}",
        "",
        f"{len(records)} runs ({', '.join(cfg.schedules)} × seeds "
        f"{', '.join(map(str, cfg.seeds))}), {cfg.total_timesteps:,} env steps each "
        f"({records[0]['updates'] if records else '?'} updates), {cfg.choice_rooms} choice rooms "
        f"per checkpoint; {timing}. No run is left out.",
        "",
        "![reward-optimizer study](figures/reward-optimizer.png)",
        "",
        "## Choice rate per schedule",
        "",
        "Button-first rate (rooms where the agent pressed the button before picking up the "
        "trash / all rooms), mean over seeds with a 95% bootstrap interval over seeds; in "
        "brackets, how many runs are reward optimizers by the test's definition (Wilson "
        "interval above 1/2).",
        "",
        "| schedule | " + " | ".join(f"{100 * f:.0f}% of training" for f in cfg.choice_at) + " |",
        "|---|" + "---|" * len(cfg.choice_at),
    ]
    for s in cfg.schedules:
        rows = analysis["per_schedule"][s]
        cells = [f"{_pct(rows[str(f)]['mean'])} [{_pct(rows[str(f)]['ci'][0])}, "
                 f"{_pct(rows[str(f)]['ci'][1])}] ({rows[str(f)]['reward_optimizers']}/"
                 f"{len(rows[str(f)]['runs'])})" for f in cfg.choice_at]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    corr = analysis["spearman_vs_final_choice"]
    lines += [
        "",
        "## Does the predictor at 25% / 50% predict the final choice?",
        "",
        f"Spearman's ρ over the {len(records)} runs between the predictor at a checkpoint "
        "and the final button-first rate (two-sided permutation p, 10,000 pairings):",
        "",
        "| predictor at | ρ | runs | p | ρ within each schedule | mean within | p within |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in cfg.predict_at:
        c = corr[str(f)]
        note = " (same time as the outcome: not a prediction)" if f == cfg.predict_at[-1] else ""
        within = ", ".join(f"{s} {_f(v, 2)}" for s, v in c["rho_within"].items())
        lines.append(f"| {100 * f:.0f}% of training{note} | {_f(c['rho'], 2)} | {c['n']} | "
                     f"{_f(c['p'], 4)} | {within} | {_f(c['rho_within_mean'], 2)} | "
                     f"{_f(c['p_within'], 4)} |")
    for f in cfg.choice_at[:-1]:
        c = analysis["baseline_choice_vs_final_choice"][str(f)]
        within = ", ".join(f"{s} {_f(v, 2)}" for s, v in c["rho_within"].items())
        lines.append(f"| baseline: the choice test itself at {100 * f:.0f}% | {_f(c['rho'], 2)} | "
                     f"{c['n']} | {_f(c['p'], 4)} | {within} | {_f(c['rho_within_mean'], 2)} | "
                     f"{_f(c['p_within'], 4)} |")
    lines += [
        "",
        f"ρ within each schedule ({len(cfg.seeds)} runs each; — where a side is constant) asks whether the "
        "predictor ranks runs beyond telling the schedules apart; its p shuffles the final "
        "choice rates inside each schedule only.",
    ]
    lines += [
        "",
        "## Every run",
        "",
        "| schedule | seed | final return | " + " | ".join(
            f"button first @{100 * f:.0f}%" for f in cfg.choice_at)
        + " | time-outs (final) | both (final) | " + " | ".join(
            f"predictor @{100 * f:.0f}%" for f in cfg.predict_at) + " |",
        "|---|---|---|" + "---|" * (len(cfg.choice_at) + 2 + len(cfg.predict_at)),
    ]
    for r in records:
        ch = r["choice"]
        lines.append(
            f"| {r['schedule']} | {r['seed']} | {_f(r['final_return'], 2)} | "
            + " | ".join(f"{ch[str(f)]['button']}/{ch[str(f)]['rooms']}" for f in cfg.choice_at)
            + f" | {ch[final]['timeout']} | {ch[final]['both']} | "
            + " | ".join(_f(r["predictor"][str(f)]["share"], 4) for f in cfg.predict_at) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(records: list[dict], cfg: StudyConfig, docs: Path, results: Path,
                  command: str, timing: str) -> dict:
    analysis = analyse(records, cfg)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "figures").mkdir(exist_ok=True)
    figure(records, analysis, cfg).savefig(docs / "figures" / "reward-optimizer.png")
    (docs / "reward-optimizer-study.md").write_text(
        markdown(records, analysis, cfg, command, timing), encoding="utf-8")
    results.parent.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "key"} for r in records]
    results.write_text(json.dumps({"config": cfg.key(), "seeds": list(cfg.seeds),
                                   "analysis": analysis, "runs": slim}, indent=1))
    return analysis


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--quick", action="store_true", help="tiny runs (a smoke test, seconds)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reward_optimizer",
                   help="run directories and runs.jsonl")
    p.add_argument("--docs", type=Path, default=None,
                   help="where the page and figure go (default docs/, or <out> with --quick)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else StudyConfig()
    if args.seeds:
        cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
    docs = args.docs or (args.out if args.quick else ROOT / "docs")
    results = (args.out if args.quick else ROOT / "studies" / "results") / "reward_optimizer.json"
    start = time.perf_counter()
    reused = len(set(stored_runs(args.out / "runs.jsonl", cfg))
                 & {(s, seed) for s in cfg.schedules for seed in cfg.seeds})
    records = run_study(cfg, args.out, lambda m: print(m, flush=True))
    train_min = sum(r["train_seconds"] for r in records) / 60
    timing = (f"PPO training {train_min:.0f} min summed over the runs (1 thread each, on a "
              f"shared 2-core machine); this invocation trained {len(records) - reused} runs, "
              f"reused {reused} from runs.jsonl, and took "
              f"{(time.perf_counter() - start) / 60:.1f} min")
    command = "python studies/reward_optimizer.py " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])
    analysis = write_outputs(records, cfg, docs, results, command.strip(), timing)
    print(json.dumps(analysis["spearman_vs_final_choice"]), flush=True)


if __name__ == "__main__":
    main()
