"""Reference PPO agent for TrashWorld, in one CleanRL-style file.

The policy is a TransformerLens `HookedRootModule`, so every activation has a hook name
(`hook_obs`, `hook_pi_hidden1`, ...). Actor and critic are separate MLPs: value-loss gradients
never touch the policy's weights, so whatever the actor's layers come to represent was put
there by the policy-gradient updates alone.

The recorder attaches around `train` and tags each minibatch from `before_step`:

    agent, optimizer = make_agent(cfg), make_optimizer(agent, cfg)
    with chisel.record(agent, optimizer, "runs/x", factors=True) as rec:
        train(cfg, agent=agent, optimizer=optimizer,
              before_step=lambda mb: rec.tag(advantage=mb.advantages, reward=mb.rewards))

Threads are left to the caller. The networks are tiny, so one thread is fastest; on a busy
2-core machine two torch threads ran this loop ~15x slower than one (`torch.set_num_threads(1)`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from chisel.envs import (
    CONCEPTS,
    TrashWorldConfig,
    VecTrashWorld,
    next_reward_source,
)
from chisel.errors import ChiselError


class PPOConfigError(ChiselError, ValueError):
    """A `PPOConfig` field is out of range."""


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (CleanRL names). Defaults reach >= 80% of the oracle's return."""

    env: TrashWorldConfig = field(default_factory=TrashWorldConfig)
    """The TrashWorld rooms to train in."""
    seed: int = 1
    """Seeds the weights, the rooms, action sampling and minibatch shuffling."""
    total_timesteps: int = 524_288
    """Env steps to train for, summed over the batch of rooms (64 rollouts, 1,024 updates)."""
    num_envs: int = 128
    """Rooms stepped together."""
    num_steps: int = 64
    """Steps per room in each rollout; a rollout holds num_envs * num_steps samples."""
    learning_rate: float = 2.5e-3
    """Adam step size (annealed linearly to 0 when anneal_lr)."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to zero over training."""
    gamma: float = 0.95
    """Discount factor."""
    gae_lambda: float = 0.9
    """GAE lambda."""
    num_minibatches: int = 4
    """Minibatches per epoch; one optimizer step each."""
    update_epochs: int = 4
    """Passes over each rollout."""
    norm_adv: bool = True
    """Normalise advantages within each minibatch."""
    clip_coef: float = 0.2
    """PPO ratio clip."""
    clip_vloss: bool = True
    """Clip the value loss as in CleanRL."""
    ent_coef: float = 0.01
    """Entropy bonus weight."""
    vf_coef: float = 0.5
    """Value loss weight."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    hidden: int = 64
    """Width of each of the two hidden layers of the actor and of the critic."""

    def __post_init__(self) -> None:
        for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches",
                     "update_epochs", "hidden"):
            if getattr(self, name) < 1:
                raise PPOConfigError(f"PPOConfig.{name}={getattr(self, name)!r}: must be >= 1.")
        if self.batch_size % self.num_minibatches:
            raise PPOConfigError(
                f"PPOConfig.num_minibatches={self.num_minibatches} does not divide the rollout "
                f"of num_envs * num_steps = {self.batch_size} samples; pick a divisor.")
        if self.total_timesteps < self.batch_size:
            raise PPOConfigError(
                f"PPOConfig.total_timesteps={self.total_timesteps} is less than one rollout "
                f"({self.batch_size} samples); raise it or shrink num_envs * num_steps.")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def num_updates(self) -> int:
        """Optimizer steps in the whole run (each one recorded by chisel)."""
        return self.num_iterations * self.update_epochs * self.num_minibatches


class TrashAgent(HookedRootModule):
    """Actor and critic MLPs (2 tanh hidden layers each), hooked at every site.

    forward(obs [B, obs_dim]) -> (logits [B, n_actions], value [B]).
    Hook names: hook_obs, hook_pi_hidden1, hook_pi_hidden2, hook_logits,
    hook_v_hidden1, hook_v_hidden2, hook_value. Linear layers: pi_fc1, pi_fc2, pi_out,
    v_fc1, v_fc2, v_out.
    """

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()

        def linear(n_in: int, n_out: int, gain: float) -> nn.Linear:
            layer = nn.Linear(n_in, n_out)
            nn.init.orthogonal_(layer.weight, gain, generator=generator)
            nn.init.zeros_(layer.bias)
            return layer

        root2 = float(np.sqrt(2))
        self.hook_obs = HookPoint()
        self.pi_fc1, self.hook_pi_hidden1 = linear(obs_dim, hidden, root2), HookPoint()
        self.pi_fc2, self.hook_pi_hidden2 = linear(hidden, hidden, root2), HookPoint()
        self.pi_out, self.hook_logits = linear(hidden, n_actions, 0.01), HookPoint()
        self.v_fc1, self.hook_v_hidden1 = linear(obs_dim, hidden, root2), HookPoint()
        self.v_fc2, self.hook_v_hidden2 = linear(hidden, hidden, root2), HookPoint()
        self.v_out, self.hook_value = linear(hidden, 1, 1.0), HookPoint()
        self.setup()

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.hook_obs(obs)  # [B, obs_dim]
        h = self.hook_pi_hidden1(torch.tanh(self.pi_fc1(x)))  # [B, hidden]
        h = self.hook_pi_hidden2(torch.tanh(self.pi_fc2(h)))
        logits = self.hook_logits(self.pi_out(h))  # [B, n_actions]
        v = self.hook_v_hidden1(torch.tanh(self.v_fc1(x)))
        v = self.hook_v_hidden2(torch.tanh(self.v_fc2(v)))
        value = self.hook_value(self.v_out(v)[:, 0])  # [B]
        return logits, value


def make_agent(cfg: PPOConfig) -> TrashAgent:
    """A freshly initialised agent, seeded by cfg.seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return TrashAgent(cfg.env.obs_dim, 7, cfg.hidden, generator=gen)


def make_optimizer(agent: nn.Module, cfg: PPOConfig) -> torch.optim.Adam:
    """Adam over every parameter, as in CleanRL."""
    return torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)


@dataclass(frozen=True)
class MinibatchInfo:
    """What one optimizer step trains on, passed to `before_step` (gradients are ready).

    Per-sample arrays have length B = cfg.minibatch_size and follow the order of `obs`.
    """

    step: int  # optimizer steps taken before this one (0-based)
    iteration: int  # rollout index
    epoch: int
    global_env_step: int  # env steps collected so far
    obs: torch.Tensor  # [B, obs_dim] float32, the input of the forward pass
    actions: torch.Tensor  # [B] int64
    advantages: np.ndarray  # [B] float32, GAE before per-minibatch normalisation
    returns: np.ndarray  # [B] float32, value targets (advantage + old value)
    rewards: np.ndarray  # [B] float32, the env reward that followed the sample's action
    reward_source: np.ndarray  # [B] int8: that reward came from 0 none, 1 trash can, 2 button
    next_reward_source: np.ndarray  # [B] int8: source of the first reward from here on in the
    #   same episode (within the rollout), 0 if none: what the advantage is mostly about
    episode_ids: np.ndarray  # [B] int64, unique per episode within the run
    concepts: dict[str, np.ndarray]  # {concept: [B] bool} ground truth of each sample's state
    pg_loss: float
    v_loss: float
    entropy: float
    approx_kl: float


@dataclass(frozen=True)
class UpdateStats:
    """One line of the training log, passed to `on_update` after each rollout's updates."""

    iteration: int
    global_env_step: int
    optimizer_steps: int
    seconds: float  # wall time since training started
    episodes: int  # episodes that finished during this rollout
    mean_return: float  # their mean undiscounted return (nan if none finished)
    learning_rate: float
    pg_loss: float
    v_loss: float
    entropy: float


@dataclass
class TrainResult:
    """The trained agent and optimizer, the training log, and the rooms it trained in."""

    agent: TrashAgent
    optimizer: torch.optim.Optimizer
    history: list[UpdateStats]  # one row per rollout
    seconds: float  # wall time of training
    envs: VecTrashWorld  # e.g. envs.button_enabled tells whether a late button appeared


def train(cfg: PPOConfig, *, agent: TrashAgent | None = None,
          optimizer: torch.optim.Optimizer | None = None,
          before_step: Callable[[MinibatchInfo], None] | None = None,
          on_update: Callable[[UpdateStats], None] | None = None,
          reward_filter: Callable[[dict], np.ndarray] | None = None,
          sample_weight: Callable[[dict], np.ndarray] | None = None) -> TrainResult:
    """Train with PPO; `before_step` runs just before every `optimizer.step()`.

    For counterfactual retraining (chisel.counterfactual): `reward_filter(labels)` returns the
    rollout's rewards [T, N] to learn from, and `sample_weight(labels)` a weight [B] on each
    minibatch sample's loss terms (0 drops it; the mean still divides by B). `labels`: rewards,
    reward_source, next_reward_source, episode_ids and the concepts, [T, N] or the minibatch's [B].
    """
    agent = agent if agent is not None else make_agent(cfg)
    optimizer = optimizer if optimizer is not None else make_optimizer(agent, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    shuffle_rng = np.random.default_rng(cfg.seed)
    envs = VecTrashWorld(cfg.env, cfg.num_envs, seed=cfg.seed)
    next_obs, info = envs.reset()
    history: list[UpdateStats] = []
    start, opt_steps = time.perf_counter(), 0
    for iteration in range(cfg.num_iterations):
        if cfg.anneal_lr:
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate * (1.0 - iteration / cfg.num_iterations)
        roll, next_obs, info = _collect(agent, envs, next_obs, info, cfg, gen)
        if reward_filter is not None:
            roll["rewards"] = np.asarray(reward_filter(_labels(roll)), np.float32)
        adv, ret = _gae(roll, cfg)
        stats = []
        for epoch in range(cfg.update_epochs):
            order = shuffle_rng.permutation(cfg.batch_size)
            for idx in order.reshape(cfg.num_minibatches, -1):
                weight = None if sample_weight is None else torch.as_tensor(
                    np.asarray(sample_weight(_labels(roll, idx)), np.float32))
                losses = _ppo_loss(agent, roll, adv, ret, idx, cfg, weight)
                optimizer.zero_grad()
                losses["loss"].backward()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                if before_step is not None:
                    before_step(_minibatch_info(roll, adv, ret, idx, losses, opt_steps,
                                                iteration, epoch, envs.total_steps))
                optimizer.step()
                opt_steps += 1
                stats.append([losses[k].item() for k in ("pg_loss", "v_loss", "entropy")])
        finished = roll["ep_returns"]
        s = np.mean(stats, axis=0)
        row = UpdateStats(iteration, envs.total_steps, opt_steps, time.perf_counter() - start,
                          len(finished), float(np.mean(finished)) if finished else float("nan"),
                          optimizer.param_groups[0]["lr"], *map(float, s))
        history.append(row)
        if on_update is not None:
            on_update(row)
    return TrainResult(agent, optimizer, history, time.perf_counter() - start, envs)


def _collect(agent: TrashAgent, envs: VecTrashWorld, obs: np.ndarray, info: dict,
             cfg: PPOConfig, gen: torch.Generator) -> tuple[dict, np.ndarray, dict]:
    """One rollout of cfg.num_steps steps in every room; arrays are [T, N, ...]."""
    t_, n = cfg.num_steps, cfg.num_envs
    roll = {"obs": np.zeros((t_, n, cfg.env.obs_dim), np.float32),
            "actions": np.zeros((t_, n), np.int64), "logprobs": np.zeros((t_, n), np.float32),
            "values": np.zeros((t_, n), np.float32), "rewards": np.zeros((t_, n), np.float32),
            "bootstrap": np.zeros((t_, n), np.float32), "dones": np.zeros((t_, n), bool),
            "sources": np.zeros((t_, n), np.int8), "episode_ids": np.zeros((t_, n), np.int64),
            "concepts": {c: np.zeros((t_, n), bool) for c in CONCEPTS}, "ep_returns": []}
    with torch.no_grad():
        for t in range(t_):
            roll["obs"][t], roll["episode_ids"][t] = obs, info["episode_id"]
            for c in CONCEPTS:
                roll["concepts"][c][t] = info[c]
            logits, value = agent(torch.from_numpy(obs))
            logp = torch.log_softmax(logits, dim=-1)
            action = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
            roll["actions"][t], roll["values"][t] = action.numpy(), value.numpy()
            roll["logprobs"][t] = logp.gather(1, action[:, None])[:, 0].numpy()
            obs, reward, terminated, truncated, info = envs.step(action.numpy())
            roll["rewards"][t], roll["sources"][t] = reward, info["reward_source"]
            roll["dones"][t] = terminated | truncated
            if truncated.any():  # time limit: bootstrap from the cut-off state's value
                _, v_final = agent(torch.from_numpy(info["final_obs"][truncated]))
                roll["bootstrap"][t, truncated] = cfg.gamma * v_final.numpy()
            roll["ep_returns"] += info["episode_return"][info["done"]].tolist()
        roll["next_value"] = agent(torch.from_numpy(obs))[1].numpy()
    roll["next_sources"] = next_reward_source(roll["sources"], roll["dones"])
    return roll, obs, info


def _gae(roll: dict, cfg: PPOConfig) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates and value targets, [T, N] each."""
    values, dones = roll["values"], roll["dones"]
    rewards = roll["rewards"] + roll["bootstrap"]
    adv = np.zeros_like(values)
    last, next_value = np.zeros(cfg.num_envs, np.float32), roll["next_value"]
    for t in range(cfg.num_steps - 1, -1, -1):
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + cfg.gamma * next_value * nonterminal - values[t]
        last = delta + cfg.gamma * cfg.gae_lambda * nonterminal * last
        adv[t], next_value = last, values[t]
    return adv, adv + values


def _labels(roll: dict, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The rollout's per-sample labels, [T, N] (or [B] at the flat indices idx)."""
    out = {"rewards": roll["rewards"], "reward_source": roll["sources"],
           "next_reward_source": roll["next_sources"], "episode_ids": roll["episode_ids"],
           **roll["concepts"]}
    return out if idx is None else {k: v.reshape(-1)[idx] for k, v in out.items()}


def _ppo_loss(agent: TrashAgent, roll: dict, adv: np.ndarray, ret: np.ndarray,
              idx: np.ndarray, cfg: PPOConfig,
              weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Clipped PPO loss on the flat sample indices idx [B]; `weight` [B] scales each sample's
    terms (None: the plain mean)."""
    mean = (lambda x: x.mean()) if weight is None else (lambda x: (weight * x).mean())
    flat = lambda a: torch.from_numpy(a.reshape(-1, *a.shape[2:])[idx])  # noqa: E731
    obs, actions, old_logp, old_v = (flat(roll[k]) for k in ("obs", "actions", "logprobs",
                                                             "values"))
    b_adv, b_ret = flat(adv), flat(ret)
    logits, value = agent(obs)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, actions[:, None])[:, 0]
    entropy = mean(-(logp_all.exp() * logp_all).sum(-1))
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    if cfg.norm_adv:
        b_adv = (b_adv - b_adv.mean()) / (b_adv.std() + 1e-8)
    pg_loss = torch.max(-b_adv * ratio,
                        -b_adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef))
    pg_loss = mean(pg_loss)
    v_loss = (value - b_ret) ** 2
    if cfg.clip_vloss:
        v_clipped = old_v + (value - old_v).clamp(-cfg.clip_coef, cfg.clip_coef)
        v_loss = torch.max(v_loss, (v_clipped - b_ret) ** 2)
    v_loss = 0.5 * mean(v_loss)
    loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
    approx_kl = ((ratio - 1) - log_ratio).mean().detach()
    return {"loss": loss, "pg_loss": pg_loss.detach(), "v_loss": v_loss.detach(),
            "entropy": entropy.detach(), "approx_kl": approx_kl, "obs": obs, "actions": actions}


def _minibatch_info(roll: dict, adv: np.ndarray, ret: np.ndarray, idx: np.ndarray,
                    losses: dict, step: int, iteration: int, epoch: int,
                    global_env_step: int) -> MinibatchInfo:
    flat = lambda a: a.reshape(-1)[idx]  # noqa: E731  [T, N] -> [B] in minibatch order
    return MinibatchInfo(
        step=step, iteration=iteration, epoch=epoch, global_env_step=global_env_step,
        obs=losses["obs"], actions=losses["actions"], advantages=flat(adv), returns=flat(ret),
        rewards=flat(roll["rewards"]), reward_source=flat(roll["sources"]),
        next_reward_source=flat(roll["next_sources"]),
        episode_ids=flat(roll["episode_ids"]),
        concepts={c: flat(v) for c, v in roll["concepts"].items()},
        pg_loss=losses["pg_loss"].item(), v_loss=losses["v_loss"].item(),
        entropy=losses["entropy"].item(), approx_kl=losses["approx_kl"].item())


def agent_policy(agent: TrashAgent, *, greedy: bool = False,
                 generator: torch.Generator | None = None
                 ) -> Callable[[VecTrashWorld, np.ndarray], np.ndarray]:
    """The agent as an `evaluate` policy: sample from its logits, or take the argmax."""

    def act(env: VecTrashWorld, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits, _ = agent(torch.from_numpy(obs))
        if greedy:
            return logits.argmax(-1).numpy()
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0].numpy()

    return act
