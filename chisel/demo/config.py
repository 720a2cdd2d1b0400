"""`DemoConfig`: every knob of `chisel demo`, frozen, validated, saved in demo.json.

Two presets: the default run (about 5 minutes on a 2-core machine) and `--quick` (under a
minute, for the test suite and a first look). `DemoConfig.make(quick=...)` picks one; any field
can be overridden on top.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from chisel.envs.config import BUTTON_MODES, ButtonMode
from chisel.errors import ChiselError

# hook sites of the reference agent (chisel.agents.ppo.TrashAgent)
ACTOR_INPUT_SITES: tuple[str, ...] = ("hook_obs", "hook_pi_hidden1", "hook_pi_hidden2")
PROBE_SITES: tuple[str, ...] = (
    "hook_obs",
    "hook_pi_hidden1",
    "hook_pi_hidden2",
    "hook_logits",
    "hook_v_hidden1",
    "hook_v_hidden2",
)
ACTION_SITE = "hook_logits"
FACTOR_MODULES: tuple[str, ...] = ("pi_fc1", "pi_fc2", "pi_out")
CREDIT_BY: tuple[str, ...] = ("reward_source", "next_reward_source", "advantage_sign")
REWARD_WITHIN = "reward_within_k"  # the reward-predictive concept the rollouts label


class DemoConfigError(ChiselError, ValueError):
    """A `DemoConfig` field is out of range."""


@dataclass(frozen=True)
class DemoConfig:
    """What `chisel demo` trains, probes, attributes and checks."""

    out: Path = Path("runs/demo")
    """Run directory to write (replaced if it holds a run)."""
    seed: int = 1
    """Seeds training, the probe and metric rollouts and the causal check."""
    button: ButtonMode = "none"
    """Reward button: "none", "early" (from the start) or "late" (appears halfway through)."""
    quick: bool = False
    """The small preset (set by `DemoConfig.make(quick=True)`; recorded in demo.json)."""
    total_timesteps: int = 524_288
    """PPO env steps (1,024 optimizer updates at the PPO defaults)."""
    num_envs: int = 128
    """Rooms stepped together in PPO's rollouts (a rollout is num_envs x 64 steps; each rollout
    gives 16 optimizer updates)."""
    learning_rate: float = 2.5e-3
    """PPO's Adam step size (annealed linearly to 0)."""
    factors_every: int = 8
    """Record per-sample factors (x_i, g_i) on every this-many updates; credit runs on those."""
    attribute_every: int = 1
    """Geometry + integrated attribution on every this-many updates (1: every update; else an
    even sample from step 0, plus every update with factors)."""
    points: int = 8
    """Gauss-Legendre points along each update path (tanh nets: smooth, so 8 close to ~1e-10)."""
    horizon: int = 8
    """Earlier steps whose samples receive credit through Adam's momentum."""
    metric_states: int = 1024
    """Held-out states of the metric (log-prob of the final agent's greedy actions)."""
    probe_rooms: int = 64
    """Rooms of the probe rollouts; each runs `probe_steps` steps."""
    probe_steps: int = 64
    """Steps of each probe rollout (probe dataset: probe_rooms * probe_steps states)."""
    probe_checkpoints: int = 5
    """Checkpoints of the run (evenly spaced, incl. the first and the last) for the probe table."""
    dictionary_latents: int = 16
    """Latents of the sparse dictionary (ReLU SAE) trained on the probe states at each actor
    input site; each latent, labelled by its best-matching concept, joins the features after the
    probes (0: no dictionary)."""
    reward_k: int = 8
    """reward_within_k: a reward arrives within this many steps."""
    causal_k: int = 3
    """Feature directions projected out in each condition of the causal check."""
    causal_sites: tuple[str, ...] = ("hook_pi_hidden1", "hook_pi_hidden2")
    """Sites whose probe directions the causal check ranks and projects out."""
    causal_seeds: int = 5
    """Random draws of k directions for the "random" condition."""
    eval_rooms: int = 64
    """Rooms of each return evaluation."""
    eval_episodes: int = 8
    """Episodes per room of each return evaluation (64 x 8 = 512 episodes: the standard error
    of a mean return is about 0.03)."""
    validation_permutations: int = 150
    """Sampled permutations (each with its reverse) for the Shapley values of the
    pathway-reversion game in the validation stage."""
    shapley_players: Literal["features", "all"] = "features"
    """Who plays the Shapley game: "features" (the feature pathways; the rest of the learned
    change stays in place, so values sum to m(final) − m(every feature pathway reverted)) or
    "all" (also each weight's <mean>, <residual> and <bias>: sums to m(final) − m(θ_0) of the
    actor, but those large players interact with every feature and swamp the ranking)."""
    ablation_episodes: int = 4
    """Episodes per room of each return evaluation in the validation stage's ablation pass
    (one evaluation per attributed feature; fewer than eval_episodes to keep the stage short)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "causal_sites", tuple(self.causal_sites))
        if self.button not in BUTTON_MODES:
            raise DemoConfigError(
                f"DemoConfig.button={self.button!r}: choose one of {BUTTON_MODES}."
            )
        if not self.learning_rate > 0:
            raise DemoConfigError(f"DemoConfig.learning_rate={self.learning_rate!r}: must be > 0.")
        for name in (
            "total_timesteps",
            "num_envs",
            "factors_every",
            "attribute_every",
            "points",
            "metric_states",
            "probe_rooms",
            "probe_steps",
            "reward_k",
            "causal_k",
            "causal_seeds",
            "eval_rooms",
            "eval_episodes",
            "validation_permutations",
            "ablation_episodes",
        ):
            if getattr(self, name) < 1:
                raise DemoConfigError(f"DemoConfig.{name}={getattr(self, name)!r}: must be >= 1.")
        if self.shapley_players not in ("features", "all"):
            raise DemoConfigError(
                f"DemoConfig.shapley_players={self.shapley_players!r}: use 'features' or 'all'."
            )
        if self.horizon < 0:
            raise DemoConfigError(f"DemoConfig.horizon={self.horizon}: must be >= 0.")
        if self.dictionary_latents < 0:
            raise DemoConfigError(
                f"DemoConfig.dictionary_latents={self.dictionary_latents}: must be >= 0 (0: none)."
            )
        if self.probe_checkpoints < 2:
            raise DemoConfigError(
                f"DemoConfig.probe_checkpoints={self.probe_checkpoints}: need >= 2 (start and end)."
            )
        unknown = set(self.causal_sites) - set(ACTOR_INPUT_SITES)
        if unknown or not self.causal_sites:
            raise DemoConfigError(
                f"DemoConfig.causal_sites={self.causal_sites}: choose among {ACTOR_INPUT_SITES}."
            )

    @classmethod
    def make(cls, *, quick: bool = False, **overrides: Any) -> DemoConfig:
        """The default preset, or the quick one; `overrides` replace single fields."""
        preset = dict(QUICK) if quick else {}
        return cls(quick=quick, **{**preset, **overrides})

    def replace(self, **changes: Any) -> DemoConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out"] = str(self.out)
        out["causal_sites"] = list(self.causal_sites)
        return out


# --quick: 512 updates of smaller rollouts at twice the step size, which learn (a sweep over
# seeds 1-3 on 2026-12-02: last training returns 1.05-1.36 against the oracle's ~1.55, where the
# previous 256-update preset reached 0.03-0.12), attribution on every 4th update, credit on
# every 16th, smaller datasets
QUICK: dict[str, Any] = {
    "total_timesteps": 131_072,
    "num_envs": 64,
    "learning_rate": 5e-3,
    "attribute_every": 4,
    "factors_every": 16,
    "metric_states": 512,
    "probe_rooms": 32,
    "probe_steps": 48,
    "probe_checkpoints": 3,
    "causal_seeds": 3,
    "eval_rooms": 32,
    "eval_episodes": 2,
}
