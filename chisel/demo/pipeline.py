"""`run_demo(config)`: train with recording, probe, attribute, check causally, report.

Stages (each timed into demo.json's wall_time_s):
1. train   PPO on TrashWorld inside `chisel.record` (deltas every update, factors of the actor's
           Linear layers every `factors_every` updates, per-sample tags for credit).
2. probes  probe scores over training (probes.parquet) and the FeatureSet (features/).
3. attribute  geometry + integrated on every `attribute_every`-th update, all three families on
           the updates with factors; one ledger.parquet.
4. causal  project out the top / bottom / random-k feature directions (causal.json).
5. report  demo.json, then report.html and figures/.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import chisel
import probes
from chisel.agents.ppo import (
    MinibatchInfo,
    PPOConfig,
    TrainResult,
    TrashAgent,
    UpdateStats,
    make_agent,
    make_optimizer,
    train,
)
from chisel.attribution import ledger as L
from chisel.demo import causal as C
from chisel.demo import features as Fe
from chisel.demo.config import (
    CREDIT_BY,
    FACTOR_MODULES,
    PROBE_SITES,
    REWARD_WITHIN,
    DemoConfig,
)
from chisel.demo.data import Rollout, rollout, subsample
from chisel.envs import ACTION_NAMES, TrashWorldConfig, VecTrashWorld, evaluate, oracle_return
from chisel.report.artifacts import CAUSAL_FILE, DEMO_FILE, FEATURES_DIR, LEDGER_FILE, PROBES_FILE

METRIC_NAME = "logprob(chosen actions) on held-out states"
CONCEPT_GROUPS = {
    "task": ["trash_visible", "trash_adjacent", "holding_trash", "at_can"],
    "reward_predictive": [REWARD_WITHIN],
    "button": ["button_visible"],
    "spurious": ["wall_blue"],
}
# seed offsets: each dataset its own stream, never the training rooms
PROBE_SEED, METRIC_SEED, EVAL_SEED = 10_000, 20_000, 30_000


@dataclass
class Stopwatch:
    """Wall time per stage; prints each stage as it starts and ends."""

    say: Callable[[str], None] = print
    times: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)

    def stage(self, name: str, what: str) -> _Stage:
        self.say(f"[{len(self.times) + 1}/5] {name}: {what}")
        return _Stage(self, name)

    def total(self) -> dict[str, float]:
        return {
            **{k: round(v, 2) for k, v in self.times.items()},
            "total": round(time.perf_counter() - self._start, 2),
        }


@dataclass
class _Stage:
    watch: Stopwatch
    name: str
    _t: float = 0.0

    def __enter__(self) -> _Stage:
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.watch.times[self.name] = time.perf_counter() - self._t
        if exc[0] is None:
            self.watch.say(f"      {self.name} done in {self.watch.times[self.name]:.1f} s")


def run_demo(config: DemoConfig, say: Callable[[str], None] = print) -> Path:
    """Run the whole demo into `config.out` and return the path of report.html."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: one thread is fastest (2 threads ran ~10x slower)
    try:
        return _run(config, Stopwatch(say))
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig, watch: Stopwatch) -> Path:
    out = cfg.out
    ppo = ppo_config(cfg)
    with watch.stage("train", f"PPO, {ppo.num_updates} updates, recording into {out}"):
        trained, curve = train_recorded(cfg, ppo)
    run = chisel.load(out)
    agent, button_on = trained.agent, bool(trained.envs.button_enabled)
    with watch.stage("probes", "rollouts of the trained agent, probes over training, features"):
        data = rollout(
            agent,
            ppo.env,
            rooms=cfg.probe_rooms,
            steps=cfg.probe_steps,
            seed=cfg.seed + PROBE_SEED,
            reward_k=cfg.reward_k,
            button_on=button_on,
        )
        table = Fe.probe_table(agent, run, data, PROBE_SITES, cfg.probe_checkpoints, cfg.seed)
        table.to_parquet(out / PROBES_FILE)
        features = Fe.build_features(agent, data, cfg.seed)
        _replace_dir(out / FEATURES_DIR)
        features.save(out / FEATURES_DIR)
    held_out = metric_states(agent, ppo.env, cfg, button_on)
    metric = chisel.metrics.logprob(held_out.obs, held_out.greedy)
    plan = attribution_plan(len(run), cfg)
    with watch.stage(
        "attribute", f"{len(plan.sample)} of {len(run)} updates (credit on {len(plan.credit)})"
    ):
        ledger = attribute_run(run, agent, features, metric, plan, cfg)
    evaluator = C.Evaluator(
        ppo.env, cfg.eval_rooms, cfg.eval_episodes, cfg.seed + EVAL_SEED, button_on
    )
    with watch.stage("causal", "project out top / bottom / random-k feature directions"):
        totals = chisel.timeline(ledger).iloc[-1]
        means = {
            s: a.mean(0) for s, a in probes.capture(agent, data.obs, list(cfg.causal_sites)).items()
        }
        causal = C.causal_check(
            agent,
            features,
            totals,
            cfg.causal_sites,
            cfg.causal_k,
            cfg.causal_seeds,
            means,
            evaluator,
            cfg.seed,
        )
        (out / CAUSAL_FILE).write_text(json.dumps(causal, indent=1))
        returns = reference_returns(causal["baseline"], evaluator)
    with watch.stage("report", "demo.json, report.html, figures/"):
        demo = {
            "seed": cfg.seed,
            "button": cfg.button,
            "quick": cfg.quick,
            "wall_time_s": {},
            "returns": returns,
            "training_curve": curve,
            "attributed_steps": plan.sample,
            "credit_steps": plan.credit,
            "metric": METRIC_NAME,
            "metric_states": len(held_out),
            "action_names": list(ACTION_NAMES),
            "concepts": CONCEPT_GROUPS,
            "feature_concepts": Fe.feature_concepts(features),
            "button_appeared_at_env_step": _button_step(cfg, ppo, button_on),
            "config": cfg.to_json(),
        }
        _write_demo(out, demo, watch.total())
        report = chisel.write_report(out)
    _write_demo(out, demo, watch.total())
    watch.say(
        f"wrote {report} in {watch.total()['total']:.0f} s "
        f"(agent return {returns['agent']:.2f}, oracle {returns['oracle']:.2f})"
    )
    return report


def ppo_config(cfg: DemoConfig) -> PPOConfig:
    """The reference PPO run; a late button appears halfway through training."""
    env = TrashWorldConfig(button=cfg.button, button_after_steps=cfg.total_timesteps // 2)
    return PPOConfig(env=env, seed=cfg.seed, total_timesteps=cfg.total_timesteps)


def train_recorded(cfg: DemoConfig, ppo: PPOConfig) -> tuple[TrainResult, list[dict]]:
    """Train inside `chisel.record`, tagging each minibatch; returns the run and its curve."""
    agent = make_agent(ppo)
    optimizer = make_optimizer(agent, ppo)
    curve: list[dict] = []
    rewards = np.zeros(3)  # reward of the current rollout by source (none, trash, button)

    def before_step(mb: MinibatchInfo) -> None:
        adv = mb.advantages
        rec.tag(
            advantage=adv,
            reward=mb.rewards,
            reward_source=mb.reward_source,
            next_reward_source=mb.next_reward_source,
            advantage_sign=np.where(adv >= 0, 1.0, -1.0),
            episode_id=mb.episode_ids,
        )
        if mb.epoch == 0:  # epoch 0's minibatches cover the rollout once
            np.add.at(rewards, mb.reward_source.astype(np.int64), mb.rewards)

    def on_update(u: UpdateStats) -> None:
        ret = u.mean_return if np.isfinite(u.mean_return) else None
        total = rewards[1:].sum()
        share = rewards / total if total else np.zeros(3)
        curve.append(
            {
                "update": u.optimizer_steps,
                "env_steps": u.global_env_step,
                "mean_return": ret,
                "reward_trash": None if ret is None else ret * float(share[1]),
                "reward_button": None if ret is None else ret * float(share[2]),
                "seconds": round(u.seconds, 2),
            }
        )
        rewards[:] = 0

    meta = {
        "demo": cfg.to_json(),
        "ppo": {"total_timesteps": ppo.total_timesteps, "seed": ppo.seed, "button": cfg.button},
    }
    with chisel.record(
        agent,
        optimizer,
        cfg.out,
        factors=list(FACTOR_MODULES),
        factor_dtype="bfloat16",
        factors_every=cfg.factors_every,
        overwrite=True,
        metadata=meta,
    ) as rec:
        result = train(
            ppo, agent=agent, optimizer=optimizer, before_step=before_step, on_update=on_update
        )
    return result, curve


def metric_states(
    agent: TrashAgent, env: TrashWorldConfig, cfg: DemoConfig, button_on: bool
) -> Rollout:
    """Held-out states (fresh rooms, own seed) and the final agent's greedy action in each."""
    steps = max(1, -(-cfg.metric_states // cfg.probe_rooms))
    data = rollout(
        agent,
        env,
        rooms=cfg.probe_rooms,
        steps=steps,
        seed=cfg.seed + METRIC_SEED,
        reward_k=cfg.reward_k,
        button_on=button_on,
    )
    return subsample(data, cfg.metric_states, cfg.seed)


@dataclass(frozen=True)
class AttributionPlan:
    """Which updates get which families."""

    sample: list[int]  # geometry + integrated: every attribute_every-th update
    credit: list[int]  # + credit: the updates with per-sample factors (multiples of K)


def attribution_plan(n_steps: int, cfg: DemoConfig) -> AttributionPlan:
    credit = list(range(0, n_steps, cfg.factors_every))
    sample = sorted(set(range(0, n_steps, cfg.attribute_every)) | set(credit))
    return AttributionPlan(sample, credit)


def attribute_run(
    run: chisel.Run,
    agent: TrashAgent,
    features: probes.FeatureSet,
    metric: Callable,
    plan: AttributionPlan,
    cfg: DemoConfig,
) -> pd.DataFrame:
    """One ledger: all three families on the credit steps, geometry + integrated on the rest.

    Two calls so that no step's path integral is computed twice; rows sorted by step.
    """
    common = {"points": cfg.points, "progress": True}
    credit = chisel.attribute(
        run,
        agent,
        features,
        metric,
        steps=plan.credit,
        families=L.FAMILIES,
        horizon=cfg.horizon,
        credit_by=list(CREDIT_BY),
        **common,
    )
    rest = [t for t in plan.sample if t not in set(plan.credit)]
    other = chisel.attribute(
        run, agent, features, metric, steps=rest, families=(L.GEOMETRY, L.INTEGRATED), **common
    )
    tags = [c for c in credit.columns if c.startswith(L.TAG_PREFIX)]
    ledger = L.to_frame(pd.concat([credit, other], ignore_index=True), tags)
    ledger = ledger.sort_values(L.STEP, kind="stable", ignore_index=True)
    writer = L.LedgerWriter(run.path / LEDGER_FILE, tags)
    try:
        writer.write(ledger)
    finally:
        writer.close()
    return ledger


def reference_returns(agent_return: float, evaluator: C.Evaluator) -> dict[str, float]:
    """The agent's return beside the oracle's and a uniformly random policy's, same rooms."""

    def envs() -> VecTrashWorld:
        e = VecTrashWorld(evaluator.env, evaluator.rooms, seed=evaluator.seed)
        e.set_button(evaluator.button_on)
        return e

    rng = np.random.default_rng(evaluator.seed)
    oracle = oracle_return(envs(), evaluator.episodes, seed=evaluator.seed)
    uniform = evaluate(
        lambda env, obs: rng.integers(len(ACTION_NAMES), size=len(obs)),
        envs(),
        evaluator.episodes,
        seed=evaluator.seed,
    ).mean_return
    return {
        "agent": agent_return,
        "oracle": oracle,
        "ratio": agent_return / oracle if oracle else float("nan"),
        "random": uniform,
    }


def _button_step(cfg: DemoConfig, ppo: PPOConfig, button_on: bool) -> int | None:
    if cfg.button == "early":
        return 0
    if cfg.button == "late" and button_on:
        return ppo.env.button_after_steps
    return None


def _replace_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def _write_demo(out: Path, demo: dict, wall: dict[str, float]) -> None:
    demo["wall_time_s"] = wall
    (out / DEMO_FILE).write_text(json.dumps(demo, indent=1, allow_nan=False))
