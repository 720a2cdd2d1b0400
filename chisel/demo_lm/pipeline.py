"""`run_lm_demo(config)`: GRPO on a tiny LM with recording, probes + SAE, attribution,
validation, report.

Stages (each timed into lm_demo.json's wall_time_s):
1. train      GRPO inside `chisel.record` (every update, factors every `factors_every`).
2. features   probes for the cue (task) and the marker (spurious) + SAE latents at `SITE`.
3. attribute  geometry + integrated on a sample of updates, credit on the factor steps; the
           marker metric (integrated) on the same updates.
4. validate   pathway removal, Shapley values, ablation (metric, conflict accuracy).
5. report     lm_demo.json, then report.html (the generic report + the LM section).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

import chisel
from chisel.demo_lm import task as T
from chisel.demo_lm.attribute import (
    MARKER_METRIC_NAME,
    METRIC_NAME,
    AttributionPlan,
    attribute_marker,
    attribute_run,
    attribution_plan,
    metric_data,
)
from chisel.demo_lm.config import SITE, LMDemoConfig
from chisel.demo_lm.features import build_features
from chisel.demo_lm.report import LM_DEMO_FILE, lm_summary, write_lm_report
from chisel.demo_lm.train import TEST_AGREEMENT, test_accuracy, train_recorded
from chisel.demo_lm.validate import validation_stage
from chisel.report.artifacts import FEATURES_DIR

# seed offsets: each dataset its own stream, never the training prompts
PROBE_SEED, METRIC_SEED = 10_000, 20_000
STAGES = ("train", "features", "attribute", "validate", "report")


def run_lm_demo(config: LMDemoConfig, say: Callable[[str], None] = print) -> Path:
    """Run the whole LM demo into `config.out` and return the path of report.html."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    try:
        return _run(config, say)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: LMDemoConfig, say: Callable[[str], None]) -> Path:
    wall: dict[str, float] = {}
    start = time.perf_counter()

    def stage(i: int, what: str) -> float:
        say(f"[{i + 1}/{len(STAGES)}] {STAGES[i]}: {what}")
        return time.perf_counter()

    def done(i: int, t0: float) -> None:
        wall[STAGES[i]] = round(time.perf_counter() - t0, 2)
        say(f"      {STAGES[i]} done in {wall[STAGES[i]]:.1f} s")

    t0 = stage(0, f"GRPO, {cfg.steps} updates of {cfg.prompts_per_step}x{cfg.group_size} "
                  f"completions, recording into {cfg.out}")
    trained = train_recorded(cfg)
    model = trained.model.eval()
    run = chisel.load(cfg.out)
    done(0, t0)

    t0 = stage(1, f"probes (cue, marker) and a {cfg.sae_latents}-latent SAE at {SITE}")
    probe_prompts = T.sample_prompts(
        cfg.probe_prompts, TEST_AGREEMENT, torch.Generator().manual_seed(cfg.seed + PROBE_SEED)
    )
    features, feature_info = build_features(model, probe_prompts, cfg.seed,
                                            sae_latents=cfg.sae_latents, sae_steps=cfg.sae_steps)
    if (cfg.out / FEATURES_DIR).exists():
        shutil.rmtree(cfg.out / FEATURES_DIR)
    features.save(cfg.out / FEATURES_DIR)
    done(1, t0)

    held_out = metric_data(model, T.sample_prompts(
        cfg.metric_prompts, TEST_AGREEMENT, torch.Generator().manual_seed(cfg.seed + METRIC_SEED)
    ), cfg.completion_len)
    metric = held_out.metric()
    plan = attribution_plan(len(run), cfg)
    t0 = stage(2, f"{len(plan.sample)} of {len(run)} updates (credit on {len(plan.credit)})")
    ledger = attribute_run(run, model, features, metric, plan, cfg)
    marker = attribute_marker(run, model, features, held_out.prompts, plan, cfg)
    done(2, t0)

    t0 = stage(3, "pathway removal, Shapley values, ablation (metric, conflict accuracy)")
    validation = validation_stage(run, model, features, metric, ledger, probe_prompts, cfg)
    done(3, t0)

    t0 = stage(4, "lm_demo.json, report.html")
    demo = demo_record(cfg, model, trained.curve, probe_prompts, plan, feature_info)
    demo["answer"] = lm_summary(ledger, validation, demo, cfg.out, marker)
    (cfg.out / LM_DEMO_FILE).write_text(json.dumps(demo, indent=1))
    report = write_lm_report(cfg.out, demo)
    done(4, t0)
    demo["wall_time_s"] = {**wall, "total": round(time.perf_counter() - start, 2)}
    (cfg.out / LM_DEMO_FILE).write_text(json.dumps(demo, indent=1))
    say(f"wrote {report} in {demo['wall_time_s']['total']:.0f} s")
    return report


def demo_record(
    cfg: LMDemoConfig,
    model: torch.nn.Module,
    curve: list[dict],
    probe_prompts: T.Prompts,
    plan: AttributionPlan,
    feature_info: dict,
) -> dict:
    """lm_demo.json's contents before the answer (`lm_summary` adds it)."""
    return {
        "seed": cfg.seed,
        "quick": cfg.quick,
        "site": SITE,
        "metric": METRIC_NAME,
        "marker_metric": MARKER_METRIC_NAME,
        "metric_prompts": cfg.metric_prompts,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_curve": curve,
        "final_test": test_accuracy(model, probe_prompts, cfg.completion_len),
        "attributed_steps": plan.sample,
        "credit_steps": plan.credit,
        "features": feature_info,
        "config": cfg.to_json(),
    }
