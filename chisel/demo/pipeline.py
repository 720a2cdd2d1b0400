"""`run_demo(config)`: train with recording, probe, attribute, check causally, report.

Stages (each timed into demo.json's wall_time_s):
1. train   PPO on TrashWorld inside `chisel.record` (deltas every update, factors of the actor's
           Linear layers every `factors_every` updates, per-sample tags for credit).
2. probes  probe scores over training (probes.parquet) and the FeatureSet (features/).
3. attribute  geometry + integrated on every `attribute_every`-th update, all three families on
           the updates with factors; one ledger.parquet.
4. validate  pathway removal, Shapley values of the reversion game, and feature ablation on
           the metric and the return (validation.parquet, validation.json).
5. causal  project out the top / bottom / random-k feature directions (causal.json).
6. report  demo.json, then report.html and figures/.
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
    PPOConfig,
    TrashAgent,
)
from chisel.demo import causal as C
from chisel.demo import features as Fe
from chisel.demo import report_sections
from chisel.demo import reward_optimizer as RO
from chisel.demo.attribute import attribute_run, attribution_plan
from chisel.demo.config import (
    PROBE_SITES,
    REWARD_WITHIN,
    DemoConfig,
)
from chisel.demo.data import Rollout, rollout, subsample
from chisel.demo.train import ppo_config, train_recorded
from chisel.demo.validate import validation_stage
from chisel.envs import ACTION_NAMES, TrashWorldConfig, VecTrashWorld, evaluate, oracle_return
from chisel.report.artifacts import CAUSAL_FILE, DEMO_FILE, FEATURES_DIR, PROBES_FILE
from chisel.report.scenario import SECTIONS_KEY

METRIC_NAME = "logprob(chosen actions) on held-out states"
CONCEPT_GROUPS = {
    "task": ["trash_visible", "trash_adjacent", "holding_trash", "at_can"],
    "reward_predictive": [REWARD_WITHIN],
    "button": ["button_visible"],
    "spurious": ["wall_blue"],
}
STAGES = 6  # train, probes, attribute, validate, causal, report
# seed offsets: each dataset its own stream, never the training rooms
PROBE_SEED, METRIC_SEED, EVAL_SEED = 10_000, 20_000, 30_000
CHOICE_SEED = 40_000  # the choice test's rooms (chisel.demo.reward_optimizer)


@dataclass
class Stopwatch:
    """Wall time per stage; prints each stage as it starts and ends."""

    say: Callable[[str], None] = print
    times: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)

    def stage(self, name: str, what: str) -> _Stage:
        self.say(f"[{len(self.times) + 1}/{STAGES}] {name}: {what}")
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
        features = Fe.build_features(
            agent, data, cfg.seed, dictionary_latents=cfg.dictionary_latents
        )
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
    with watch.stage("validate", "pathway removal, Shapley values, ablation (metric, return)"):
        validation_stage(run, agent, features, held_out, ledger, data, evaluator, cfg, watch.say)
    with watch.stage("causal", "project out top / bottom / random-k feature directions"):
        causal = causal_stage(agent, features, ledger, data, evaluator, cfg)
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
            RO.DEMO_KEY: RO.demo_summary(agent, ledger, Fe.feature_concepts(features), ppo.env,
                                         cfg.seed + CHOICE_SEED),
            "config": cfg.to_json(),
            SECTIONS_KEY: report_sections.ME,  # the report imports the demo's sections by name
        }
        _write_demo(out, demo, watch.total())
        report = chisel.write_report(out)
    _write_demo(out, demo, watch.total())
    watch.say(
        f"wrote {report} in {watch.total()['total']:.0f} s "
        f"(agent return {returns['agent']:.2f}, oracle {returns['oracle']:.2f})"
    )
    return report


def causal_stage(
    agent: TrashAgent,
    features: probes.FeatureSet,
    ledger: pd.DataFrame,
    data: Rollout,
    evaluator: C.Evaluator,
    cfg: DemoConfig,
) -> dict:
    """Rank by the ledger's cumulative integrated attribution, ablate, write causal.json."""
    totals = chisel.timeline(ledger).iloc[-1]
    acts = probes.capture(agent, data.obs, list(cfg.causal_sites))
    means = {site: a.mean(0) for site, a in acts.items()}  # [dim] per site
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
    (cfg.out / CAUSAL_FILE).write_text(json.dumps(causal, indent=1))
    return causal


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
