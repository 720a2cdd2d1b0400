"""Attribution cost: time per update with all families vs the floor, and memory over a long run.

(a) The time to attribute one recorded update with geometry + integrated + credit, as a ratio
    to the time of `points` forward+backward passes of the same metric (the floor: integrated
    gradients cannot do with fewer). Target <= 1.5x.
(b) Peak RSS while attributing a 1,000-step run with the ledger streamed to parquet, sampled
    every 100 steps: it must not grow with the number of steps.

Usage: python benchmarks/attribution.py [--steps 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import chisel
import probes

OBS, HIDDEN, ACTIONS, BATCH, METRIC_STATES, POINTS = 102, 64, 7, 256, 1024, 16


def make_policy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(OBS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, ACTIONS)
    )


def record(run_dir: Path, steps: int) -> nn.Module:
    policy = make_policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    with chisel.record(policy, optimizer, run_dir, factors=True) as rec:
        for _ in range(steps):
            obs = torch.rand(BATCH, OBS, generator=gen)
            dist = torch.distributions.Categorical(logits=policy(obs))
            actions = dist.sample()
            adv = torch.randn(BATCH, generator=gen)
            (-(dist.log_prob(actions) * adv).mean()).backward()
            rec.tag(advantage=adv, reward=(adv > 0).float())
            optimizer.step()
            optimizer.zero_grad()
    return policy


def features() -> probes.FeatureSet:
    gen = torch.Generator().manual_seed(2)
    feats = [probes.custom(f"obs{i}", "0:in", torch.randn(OBS, generator=gen)) for i in range(6)]
    feats += [probes.custom(f"h1_{i}", "1:out", torch.randn(HIDDEN, generator=gen)) for i in range(6)]
    feats += [probes.custom(f"h2_{i}", "3:out", torch.randn(HIDDEN, generator=gen)) for i in range(6)]
    return probes.FeatureSet(feats + list(probes.neurons("4:out", range(ACTIONS), dim=ACTIONS, prefix="action")))


def floor_seconds(policy: nn.Module, metric, repeats: int = 5) -> float:
    """`POINTS` forward+backward passes of the metric in float64 (median of repeats)."""
    model = make_policy().double()
    model.load_state_dict(policy.state_dict())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(POINTS):
            model.zero_grad()
            metric(model).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        policy = record(run_dir, args.steps)
        run = chisel.load(run_dir)
        gen = torch.Generator().manual_seed(3)
        states = torch.rand(METRIC_STATES, OBS, generator=gen)
        metric = chisel.metrics.logprob(states, torch.randint(0, ACTIONS, (METRIC_STATES,), generator=gen))
        feats = features()
        floor = floor_seconds(policy, metric)
        chisel.attribute(run, policy, feats, metric, steps=[1], points=POINTS)  # warm-up
        per_step = {}
        block = range(60, 80)  # consecutive steps in one call, as a user attributes a run
        runs = (("integrated",), None), (("geometry", "integrated", "credit"), None), \
               (("geometry", "integrated", "credit"), 8)
        for families, horizon in runs:
            start = time.perf_counter()
            chisel.attribute(run, policy, feats, metric, steps=block, points=POINTS, families=families,
                             credit_by=["reward"], horizon=horizon)
            per_step[(families, horizon)] = (time.perf_counter() - start) / len(block)
        print(f"policy {sum(p.numel() for p in policy.parameters()):,} params; metric on {METRIC_STATES} "
              f"states; {len(feats)} features; minibatch {BATCH}; {POINTS} points")
        print(f"floor ({POINTS} fwd+bwd, float64):      {floor * 1e3:8.1f} ms")
        for (families, horizon), seconds in per_step.items():
            label = "+".join(families) + (f" (horizon {horizon})" if horizon else "")
            print(f"attribute one update, {label:44s} {seconds * 1e3:8.1f} ms  "
                  f"= {seconds / floor:.2f}x the floor")
        # (b) memory over the whole run, ledger streamed to parquet, nothing kept in memory
        marks = []
        step_block = max(1, len(run) // 10)
        for start in range(0, len(run), step_block):
            chisel.attribute(run, policy, feats, metric, steps=range(start, min(len(run), start + step_block)),
                             out=Path(tmp) / f"ledger{start}.parquet", return_ledger=False, credit_by=["reward"])
            marks.append((min(len(run), start + step_block), rss_mb()))
        print("peak RSS after attributing N steps: " + ", ".join(f"{n}: {mb:.0f} MB" for n, mb in marks))
        grow = marks[-1][1] - marks[0][1]
        print(f"growth from the first block to the last: {grow:+.0f} MB over {len(run)} steps")


if __name__ == "__main__":
    main()
