"""Stable-Baselines3: record every gradient step of PPO / A2C with one callback.

    >>> model = PPO("MlpPolicy", env, n_steps=128)  # doctest: +SKIP
    >>> model.learn(20_000, callback=ChiselCallback("runs/ppo", factors=True))  # doctest: +SKIP

SB3 calls callbacks per environment step and per rollout, never per gradient step. So, while
`learn()` runs, the callback (a) wraps the rollout buffer's `_get_samples` on the instance to
see which buffer indices each minibatch holds, and (b) tags those samples in an optimizer
step pre-hook. A minibatch `train()` abandons after its forward pass (PPO's `target_kl` early
stop) never reaches `step()`, so its tags are dropped, never merged into another step. The
updates themselves are measured around `step()` by `chisel.record`, after PPO's per-minibatch
advantage normalisation and gradient clipping, so both are recorded exactly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from chisel.integrations._common import IntegrationError, check_options, patch, require, stop

require("stable_baselines3", "sb3", "chisel.integrations.sb3")

import stable_baselines3  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm  # noqa: E402
from stable_baselines3.ppo import PPO  # noqa: E402

from chisel.integrations._sb3_policy import (  # noqa: E402
    action_logits,
    logprob,
    policy_logprob,
    preprocess,
    value,
)
from chisel.integrations._sb3_tags import (  # noqa: E402
    SAMPLE_TAGS,
    EpisodeCounter,
    advantage_used,
    rollout_tags,
)
from chisel.recorder import Recorder, record  # noqa: E402

__all__ = [
    "SAMPLE_TAGS",
    "ChiselCallback",
    "IntegrationError",
    "action_logits",
    "logprob",
    "policy_logprob",
    "preprocess",
    "value",
]

class ChiselCallback(BaseCallback):
    """Record every gradient step of an on-policy SB3 algorithm (PPO, A2C) into `run_dir`.

    Each step's samples are tagged (one value per sample, in minibatch order) with
    `SAMPLE_TAGS`, or the subset given as `tags`. `record_options` go to `chisel.record`
    (factors, dtype, keyframe_every, metadata, overwrite, …). A second `learn()` with the same
    callback continues the run (`resume=True`). Recording stops when `learn()` returns, or
    raises inside a rollout or `train()`; `close()` stops it by hand.

    Args:
        run_dir: the run directory (see `chisel.record`).
        tags: which of `SAMPLE_TAGS` to log (default: all).
        verbose: SB3's verbosity level.
        **record_options: passed to `chisel.record`.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tags: Sequence[str] | None = None,
        verbose: int = 0,
        **record_options: Any,
    ) -> None:
        super().__init__(verbose)
        check_options(record_options)
        chosen = tuple(SAMPLE_TAGS if tags is None else tags)
        unknown = sorted(set(chosen) - set(SAMPLE_TAGS))
        if unknown:
            raise IntegrationError(f"tags {unknown} are not sample tags; choose from {SAMPLE_TAGS}.")
        self.run_dir = run_dir
        self.tag_names = chosen
        self.record_options = record_options
        self.recorder: Recorder | None = None
        self._starts = 0  # recordings started by this callback (later ones resume the run)
        self._undo: list[Callable[[], None]] = []
        self._batch: tuple[np.ndarray, torch.Tensor] | None = None  # minibatch awaiting step()
        self._rollout: dict[str, np.ndarray] = {}  # per-sample tags in buffer (flat) order
        self._rewards: list[np.ndarray] = []
        self._first_timestep = 0
        self._episodes = EpisodeCounter()
        self._warned_untagged = False

    # -- SB3 events -------------------------------------------------------------------------
    def _init_callback(self) -> None:
        model = self.model
        if not isinstance(model, OnPolicyAlgorithm) or not hasattr(model, "rollout_buffer"):
            raise IntegrationError(
                f"ChiselCallback records on-policy algorithms (PPO, A2C, …), not "
                f"{type(model).__name__}. For an off-policy algorithm, record its optimizers with "
                "chisel.record(model.policy, optimizer, run_dir) in your own loop."
            )
        optimizer = getattr(model.policy, "optimizer", None)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise IntegrationError(
                f"{type(model).__name__}.policy has no torch optimizer (policy.optimizer is "
                f"{type(optimizer).__name__}); ChiselCallback records policy.optimizer's steps."
            )

    def _on_training_start(self) -> None:
        if self.recorder is not None:
            self.close()  # a learn() that ended without on_training_end (it raised)
        model, optimizer = self.model, self.model.policy.optimizer
        options = dict(self.record_options)
        if self._starts:
            options.pop("overwrite", None)
            options["resume"] = True
        options["metadata"] = {**self._metadata(), **(options.get("metadata") or {})}
        # our pre-hook is registered before the recorder's, so it tags before chisel starts the
        # step: a failing tag aborts step() before anything was captured
        handle = optimizer.register_step_pre_hook(self._tag_minibatch)
        self._undo.append(handle.remove)
        try:
            self.recorder = record(model.policy, optimizer, self.run_dir, **options)
            self._starts += 1
            self._undo.append(patch(model.rollout_buffer, "_get_samples", self._watch_samples))
            for name in ("collect_rollouts", "train"):
                self._undo.append(patch(model, name, self._closing_on_error))
        except BaseException:
            self.close()
            raise

    def _on_rollout_start(self) -> None:
        self._batch = None
        self._rewards = []
        self._first_timestep = self.model.num_timesteps

    def _on_step(self) -> bool:
        # a copy now: SB3 adds γ·V(s_T) to truncated episodes' rewards in place after this call
        self._rewards.append(np.array(self.locals["rewards"], copy=True))
        return True

    def _on_rollout_end(self) -> None:
        self._rollout = rollout_tags(
            self.model.rollout_buffer, self._rewards, self._first_timestep, self._episodes
        )

    def _on_training_end(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop recording: remove every hook and wrapper, write the final keyframe."""
        undo, self._undo = self._undo, []
        recorder, self.recorder, self._batch = self.recorder, None, None
        stop(undo, recorder)

    def __enter__(self) -> ChiselCallback:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = repr(self.recorder) if self.recorder is not None else "not recording"
        return f"ChiselCallback({self.run_dir!s}, tags={list(self.tag_names)}; {state})"

    # -- wrappers and hooks ------------------------------------------------------------------
    def _closing_on_error(self, method: Callable) -> Callable:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except BaseException:
                self.close()  # learn() will not reach on_training_end: no hook may outlive it
                raise

        return guarded

    def _watch_samples(self, get_samples: Callable) -> Callable:
        def watched(batch_inds: np.ndarray, *args: Any, **kwargs: Any) -> Any:
            samples = get_samples(batch_inds, *args, **kwargs)
            self._batch = (np.array(batch_inds, dtype=np.int64), samples.advantages)
            return samples

        return watched

    def _tag_minibatch(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        batch, self._batch = self._batch, None
        if self.recorder is None:
            return
        if batch is None:
            if not self._warned_untagged:
                self._warned_untagged = True
                warnings.warn(
                    f"ChiselCallback: step {self.recorder.step} of {type(self.model).__name__} "
                    "took no minibatch from the rollout buffer; it is recorded without tags.",
                    stacklevel=2,
                )
            return
        idx, advantages = batch
        tags: dict[str, Any] = {
            name: torch.from_numpy(self._rollout[name][idx])
            for name in self.tag_names
            if name != "advantage_used"
        }
        if "advantage_used" in self.tag_names:
            model = self.model
            normalise = bool(getattr(model, "normalize_advantage", False))
            if isinstance(model, PPO):
                normalise = normalise and len(advantages) > 1  # PPO skips a minibatch of one
            tags["advantage_used"] = advantage_used(advantages, normalise)
        self.recorder.tag(**tags)

    def _metadata(self) -> dict[str, Any]:
        m = self.model
        keys = ("n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "ent_coef", "vf_coef",
                "max_grad_norm", "target_kl", "normalize_advantage", "seed")
        hyper = {k: getattr(m, k) for k in keys if isinstance(getattr(m, k, None), (int, float, bool))}
        return {
            "integration": "stable-baselines3",
            "stable_baselines3_version": stable_baselines3.__version__,
            "algorithm": type(m).__name__,
            "n_envs": m.n_envs,
            "observation_space": repr(m.observation_space),
            "action_space": repr(m.action_space),
            "sample_tags": list(self.tag_names),
            "hyperparameters": hyper,
        }
