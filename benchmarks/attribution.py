"""Attribution cost: time per update with all families vs the floor, and memory over a long run.

(a) The time to attribute one recorded update with geometry + integrated + credit, as a ratio
    to the time of `points` forward+backward passes of the same metric (the floor: integrated
    gradients cannot do with fewer). Target <= 1.5x.
(b) Each configuration's cost as a ratio to the integrated family alone, measured alternately
    in one process (issue 11: all three families with the default horizon <= 2x integrated).
(c) Kink search on a 4-64-64-2 ReLU MLP with 256 metric states, one Adam step: evaluations per
    step of the earlier bracketing-only root search vs the grid-predicted roots checked with
    2 evaluations each (`kink_roots(predict=False/True)`), and the step's total evaluations.
(d) Peak RSS while attributing a 1,000-step run with the ledger streamed to parquet, sampled
    every 100 steps: it must not grow with the number of steps (skip with --no-memory).

Usage: python benchmarks/attribution.py [--steps 1000] [--threads 1] [--repeats 3] [--no-memory]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import chisel
import probes
from chisel.attribution import quadrature as Q
from chisel.attribution.functional import ParamSpace, UpdatePath

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


def kink_evaluations(states: int = 256) -> dict[str, float]:
    """Evaluations of one Adam step's kink search and integral on a 4-64-64-2 ReLU MLP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 4, generator=gen, dtype=torch.float64), torch.randint(0, 2, (256,), generator=gen)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # the second step: Adam's update with a first moment
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    delta = {n: p.detach() - theta[n] for n, p in model.named_parameters()}
    held = torch.randn(states, 4, generator=gen, dtype=torch.float64)
    space = ParamSpace(model, lambda m: torch.log_softmax(m(held), -1)[:, 0].mean(), torch.float64, "cpu")
    path = UpdatePath(space, theta, delta)
    out: dict[str, float] = {}
    for label, predict in (("before", False), ("after", True)):
        start, clock = space.evaluations, time.perf_counter()
        roots = Q.kink_roots(path, predict=predict)
        out[f"roots {label}"] = len(roots)
        out[f"root evaluations {label}"] = space.evaluations - start
        out[f"root seconds {label}"] = time.perf_counter() - clock
    start, clock = space.evaluations, time.perf_counter()
    integral = Q.integrate_path(path, points=POINTS)
    out["pieces"], out["step evaluations after"] = integral.pieces, integral.evaluations
    out["step evaluations before"] = (integral.evaluations - out["root evaluations after"]
                                      + out["root evaluations before"])
    out["step seconds after"] = time.perf_counter() - clock
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS part (d)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f} at start; {args.threads} torch thread(s)")
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
        block = range(60, 80)  # consecutive steps in one call, as a user attributes a run
        runs = (("integrated",), None), (("credit",), None), \
               (("geometry", "integrated", "credit"), None), (("geometry", "integrated", "credit"), 8)
        times: dict = {key: [] for key in runs}
        for _ in range(args.repeats):  # alternate the configurations: the load drifts
            for families, horizon in runs:
                start = time.perf_counter()
                chisel.attribute(run, policy, feats, metric, steps=block, points=POINTS,
                                 families=families, credit_by=["reward"], horizon=horizon)
                times[(families, horizon)].append((time.perf_counter() - start) / len(block))
        per_step = {key: statistics.median(v) for key, v in times.items()}
        integrated = per_step[(("integrated",), None)]
        print(f"policy {sum(p.numel() for p in policy.parameters()):,} params; metric on {METRIC_STATES} "
              f"states; {len(feats)} features; minibatch {BATCH}; {POINTS} points; Adam (default "
              f"horizon: 44 steps); median of {args.repeats} alternating rounds of {len(block)} steps")
        print(f"floor ({POINTS} fwd+bwd, float64):      {floor * 1e3:8.1f} ms")
        for (families, horizon), seconds in per_step.items():
            label = "+".join(families) + (f" (horizon {horizon})" if horizon else "")
            print(f"attribute one update, {label:44s} {seconds * 1e3:8.1f} ms  "
                  f"= {seconds / floor:.2f}x the floor = {seconds / integrated:.2f}x integrated")
        print(f"load average {os.getloadavg()[0]:.2f} after the timed rounds")
        kinks = kink_evaluations()
        print(f"kinks (4-64-64-2 ReLU, 256 states, one Adam step): {kinks['roots after']} roots "
              f"({kinks['roots before']} before), {kinks['pieces']} pieces; root search "
              f"{kinks['root evaluations before']} -> {kinks['root evaluations after']} evaluations "
              f"({kinks['root seconds before']:.2f} s -> {kinks['root seconds after']:.2f} s); "
              f"the step {kinks['step evaluations before']} -> {kinks['step evaluations after']} "
              f"evaluations")
        if args.no_memory:
            return
        # (d) memory over the whole run, ledger streamed to parquet, nothing kept in memory
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
