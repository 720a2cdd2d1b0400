"""Train the reference PPO agent on TrashWorld and compare its return with the oracle's.

    .venv/bin/python benchmarks/ppo_trashworld.py [--seed 1] [--button none] [--timesteps N]

Prints the wall time of training, env steps per second, optimizer updates, parameter count,
the agent's mean return (sampled and greedy actions) and the oracle's on fresh seeded rooms,
and the ratio. Target: sampled / oracle >= 0.8 within about 60-120 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from chisel.agents import PPOConfig, UpdateStats, agent_policy, train
from chisel.envs import VecTrashWorld, evaluate, oracle_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--button", choices=["none", "early", "late"], default="none")
    parser.add_argument("--timesteps", type=int, default=None, help="total env steps")
    parser.add_argument("--eval-episodes", type=int, default=16, help="per room, 256 rooms")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; one is fastest for these tiny networks")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PPOConfig(seed=args.seed)
    cfg = dataclasses.replace(cfg, env=cfg.env.replace(button=args.button))
    if args.timesteps:
        cfg = dataclasses.replace(cfg, total_timesteps=args.timesteps)

    def log(row: UpdateStats) -> None:
        if not args.quiet and (row.iteration % 10 == 0 or row.iteration == cfg.num_iterations - 1):
            print(f"  it {row.iteration:4d}  env steps {row.global_env_step:8d}  "
                  f"updates {row.optimizer_steps:5d}  {row.seconds:6.1f}s  "
                  f"return {row.mean_return:.3f}  entropy {row.entropy:.3f}", flush=True)

    result = train(cfg, on_update=log)
    agent = result.agent
    n_params = sum(p.numel() for p in agent.parameters())
    env_steps = result.history[-1].global_env_step
    eval_env = VecTrashWorld(cfg.env, 256, seed=10_000 + args.seed)
    if args.button == "late":
        eval_env.set_button(True)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    sampled = evaluate(agent_policy(agent, generator=gen), eval_env, args.eval_episodes, seed=7)
    greedy = evaluate(agent_policy(agent, greedy=True), eval_env, args.eval_episodes, seed=7)
    oracle = evaluate(oracle_policy, eval_env, args.eval_episodes, seed=7)
    eval_s = time.perf_counter() - t0
    sem = lambda r: r.returns.std() / np.sqrt(len(r.returns))  # noqa: E731
    print(f"torch threads        {torch.get_num_threads()}")
    print(f"train time           {result.seconds:.1f} s")
    print(f"env steps            {env_steps}  ({env_steps / result.seconds:,.0f} steps/s incl. "
          "PPO updates)")
    print(f"optimizer updates    {result.history[-1].optimizer_steps}")
    print(f"parameters           {n_params}")
    print(f"eval episodes        {len(oracle.returns)} per policy ({eval_s:.1f} s)")
    print(f"agent return         {sampled.mean_return:.3f} ± {sem(sampled):.3f} (sampled)   "
          f"{greedy.mean_return:.3f} ± {sem(greedy):.3f} (greedy)")
    print(f"oracle return        {oracle.mean_return:.3f} ± {sem(oracle):.3f}")
    print(f"ratio                {sampled.mean_return / oracle.mean_return:.3f} (sampled)   "
          f"{greedy.mean_return / oracle.mean_return:.3f} (greedy)")


if __name__ == "__main__":
    main()
