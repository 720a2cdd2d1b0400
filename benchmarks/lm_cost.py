"""Attribution cost per step for the tiny LM of `chisel demo --lm`, as a ratio to the floor.

The floor is `points` forward+backward passes of the metric in float64 (integrated gradients
along the update path cannot do with fewer). Each family (and all three together, as the demo
runs them on its credit steps) attributes a block of consecutive recorded updates of the demo's
GRPO run (factors on every update) to the demo's features (2 probes + SAE latents at
`transformer.h.0:out`, a residual-stream site bound through the norms to block 1's readers and
the tied LM head); the time per update is divided by the floor. Target <= 1.5x.

Usage: python benchmarks/lm_cost.py [--steps 40] [--block 10] [--points 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import chisel
from chisel.demo_lm import LMDemoConfig
from chisel.demo_lm import task as T
from chisel.demo_lm.attribute import metric_data
from chisel.demo_lm.features import build_features
from chisel.demo_lm.train import TEST_AGREEMENT, train_recorded

FAMILIES = {
    "geometry": ("geometry",),
    "integrated": ("integrated",),
    "credit": ("credit",),
    "all three": ("geometry", "integrated", "credit"),
}


def floor_seconds(model: torch.nn.Module, metric, points: int, repeats: int = 5) -> float:
    """`points` forward+backward passes of the metric in float64 (median of repeats)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(points):
            model.zero_grad()
            metric(model).backward()
        times.append(time.perf_counter() - start)
    model.zero_grad()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="GRPO updates to record")
    parser.add_argument("--block", type=int, default=10, help="consecutive updates attributed")
    parser.add_argument("--points", type=int, default=8, help="Gauss-Legendre points")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the tied head's uncentred split, the embeddings' notes
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LMDemoConfig.make(out=Path(tmp) / "run", steps=args.steps, factors_every=1,
                                points=args.points)
        model = train_recorded(cfg).model.eval()
        run = chisel.load(cfg.out)
        probe = T.sample_prompts(cfg.probe_prompts, TEST_AGREEMENT, torch.Generator().manual_seed(1))
        feats, _ = build_features(model, probe, 0, sae_latents=cfg.sae_latents, sae_steps=500)
        held = T.sample_prompts(cfg.metric_prompts, TEST_AGREEMENT, torch.Generator().manual_seed(2))
        metric = metric_data(model, held, cfg.completion_len).metric()
        floor = floor_seconds(model, metric, args.points)
        first = max(0, len(run) - args.block - 1)
        block = range(first, first + args.block)  # late updates: credit has a full horizon
        chisel.attribute(run, model, feats, metric, steps=[block[0]], points=args.points)  # warm-up
        params = sum(p.numel() for p in model.parameters())
        print(f"tiny LM: {params:,} params, {len(feats)} features at transformer.h.0:out, metric on "
              f"{cfg.metric_prompts} prompts x {cfg.length - cfg.completion_len} tokens, "
              f"minibatch {cfg.prompts_per_step * cfg.group_size} completions, {args.points} points, "
              f"{args.threads} thread(s)")
        print(f"floor ({args.points} fwd+bwd, float64): {floor * 1e3:8.1f} ms")
        for label, families in FAMILIES.items():
            start = time.perf_counter()
            chisel.attribute(run, model, feats, metric, steps=block, points=args.points,
                             families=families, horizon=8, credit_by=["reward"], progress=False)
            seconds = (time.perf_counter() - start) / len(block)
            print(f"attribute one update, {label:12s} {seconds * 1e3:8.1f} ms = "
                  f"{seconds / floor:5.2f}x the floor")


if __name__ == "__main__":
    main()
