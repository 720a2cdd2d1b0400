"""Hugging Face `Trainer` and TRL trainers: record every optimizer step with one callback.

    >>> trainer = GRPOTrainer(model, reward_funcs=..., args=GRPOConfig(...),  # doctest: +SKIP
    ...                       callbacks=[ChiselCallback("runs/grpo", factors=True)])
    >>> trainer.train()  # doctest: +SKIP

`on_train_begin` receives the optimizer `Trainer.train()` has just made (accelerate's
`AcceleratedOptimizer`); `chisel.record` hooks the optimizer inside it, whose `step()` runs once
per real optimizer step (after gradient accumulation and clipping), so each step is recorded
once and exactly.

Per-completion tags (TRL `GRPOTrainer`, and `RLOOTrainer`, which is built the same way): TRL computes rewards and group-normalised advantages
for a whole generation batch in `_generate_and_score_completions`, then shuffles the batch and
splits it into the micro-batches the loss consumes (`_prepare_inputs`). The callback adds its own
columns to that batch (the summed reward, each reward function's reward, the completion's
prompt group), so TRL's shuffle and split carry them along with the advantages; `compute_loss`
then tags each micro-batch with exactly the advantages the loss weighted it by and the rewards of
the same completions, and removes the columns before TRL sees them. Micro-batches of one
optimizer step concatenate, in the order the loss consumed them. This holds whatever
`steps_per_generation` and `num_iterations` are (a generation batch reused over several steps
carries its columns along). `reward` is what the reward functions returned, weighted and summed
(RLOO's reward clipping and KL penalty come after it, inside the advantage). A plain `Trainer` exposes no
per-sample reward, so its steps carry no tags (tag your own with `callback.recorder.tag`).

A callback never sees its trainer, so the callback finds it in the frame that called
`on_train_begin` (the trainer's training loop).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch

from chisel.integrations._common import IntegrationError, check_options, patch, require, stop

require("transformers", "hf", "chisel.integrations.hf")

import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from chisel.recorder import Recorder, record  # noqa: E402

__all__ = ["GRPO_TAGS", "ChiselCallback", "IntegrationError"]

GRPO_TAGS: tuple[str, ...] = (
    "advantage",  # the advantage GRPO's loss weighted the completion by (inputs["advantages"])
    "reward",  # the reward functions' weighted sum (NaN: no function scored the completion)
    "group",  # prompt group: completions of one prompt share it (unique over the run)
)
# each reward function's own reward is tagged too, as reward_<function name>

_COLUMN = "_chisel_"  # prefix of the columns the callback adds to TRL's generation batch
_GUARDED = ("training_step", "_maybe_log_save_evaluate")  # trainer methods that close on error


def _find_trainer(callback: TrainerCallback) -> Trainer | None:
    """The Trainer whose callback handler holds `callback`, from the calling frames."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if isinstance(owner, Trainer) and callback in getattr(handler, "callbacks", ()):
            return owner
        frame = frame.f_back
    return None


def _is_grpo(trainer: Any) -> bool:
    return all(hasattr(trainer, n) for n in ("_generate_and_score_completions", "_calculate_rewards",
                                              "num_generations", "reward_func_names"))


def _tag_name(func_name: str) -> str:
    return "reward_" + re.sub(r"\W", "_", str(func_name))


class ChiselCallback(TrainerCallback):
    """Record every optimizer step of a `transformers.Trainer` (or TRL trainer) into `run_dir`.

    Recording starts at `on_train_begin` and stops at `on_train_end`, or when a training step,
    an optimizer step or a log/save/evaluate call raises. A second `train()` with the same
    callback continues the run (`resume=True`). GRPO steps are tagged per completion with
    `GRPO_TAGS` and `reward_<function>`; see the module docstring for how they are aligned.

    Args:
        run_dir: the run directory (see `chisel.record`).
        **record_options: passed to `chisel.record` (factors, dtype, keyframe_every, …).
    """

    def __init__(self, run_dir: str | os.PathLike, **record_options: Any) -> None:
        check_options(record_options)
        self.run_dir = run_dir
        self.record_options = record_options
        self.recorder: Recorder | None = None
        self.trainer: Trainer | None = None
        self._starts = 0
        self._groups = 0  # prompt groups numbered so far
        self._undo: list[Callable[[], None]] = []

    # -- Trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.close()  # a train() that raised where no guard saw it
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if not isinstance(model, torch.nn.Module) or optimizer is None:
            raise IntegrationError(
                "ChiselCallback.on_train_begin got no model or optimizer from the Trainer (got "
                f"{type(model).__name__}, {type(optimizer).__name__}); add the callback to a "
                "transformers.Trainer (callbacks=[...]) rather than calling it by hand."
            )
        self.trainer = _find_trainer(self)
        options = dict(self.record_options)
        if self._starts:
            options.pop("overwrite", None)
            options["resume"] = True
        options["metadata"] = {**self._metadata(args, model), **(options.get("metadata") or {})}
        try:
            self.recorder = record(model, optimizer, self.run_dir, **options)
            self._starts += 1
            self._undo.append(patch(optimizer, "step", self._closing_on_error))
            if self.trainer is not None:
                for name in _GUARDED:
                    if hasattr(self.trainer, name):
                        self._undo.append(patch(self.trainer, name, self._closing_on_error))
                if _is_grpo(self.trainer):
                    self._undo.append(patch(self.trainer, "_generate_and_score_completions",
                                            self._add_columns))
                    self._undo.append(patch(self.trainer, "compute_loss", self._tagging))
        except BaseException:
            self.close()
            raise

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop recording: undo every patch, remove the hooks, write the final keyframe."""
        undo, self._undo = self._undo, []
        recorder, self.recorder = self.recorder, None
        stop(undo, recorder)

    def __repr__(self) -> str:
        state = repr(self.recorder) if self.recorder is not None else "not recording"
        return f"ChiselCallback({self.run_dir!s}; {state})"

    # -- wrappers --------------------------------------------------------------------------------
    def _closing_on_error(self, method: Callable) -> Callable:
        @functools.wraps(method)  # keeps marks such as torch's LR scheduler's on optimizer.step
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except BaseException:
                self.close()  # train() will not reach on_train_end: no hook may outlive it
                raise

        return guarded

    def _add_columns(self, generate: Callable) -> Callable:
        """Put each completion's rewards and group beside its advantage in the generation batch."""
        seen: dict[str, torch.Tensor] = {}

        def calculate(calculate_rewards: Callable) -> Callable:
            def spied(*args: Any, **kwargs: Any) -> torch.Tensor:
                seen["per_func"] = out = calculate_rewards(*args, **kwargs)  # [all processes' B, F]
                return out

            return spied

        def with_columns(*args: Any, **kwargs: Any) -> dict[str, Any]:
            trainer = self.trainer
            seen.clear()
            undo = patch(trainer, "_calculate_rewards", calculate)
            try:
                out = generate(*args, **kwargs)
            finally:
                undo()
            if "per_func" not in seen or not trainer.model.training:
                return out  # evaluation batches are not trained on
            n = len(out["advantages"])
            rank = trainer.accelerator.process_index
            per_func = seen["per_func"].detach()[rank * n:(rank + 1) * n].cpu()  # [B, F]
            weights = trainer.reward_weights.detach().cpu().to(per_func.dtype)
            # TRL's own expression for the reward it logs, and NaN where no function scored
            reward = (per_func * weights.unsqueeze(0)).nansum(dim=1)
            reward[torch.isnan(per_func).all(dim=1)] = torch.nan
            out[_COLUMN + "reward"] = reward
            for i, name in enumerate(trainer.reward_func_names):
                out[_COLUMN + _tag_name(name)] = per_func[:, i]
            first = self._groups + rank * n // trainer.num_generations
            out[_COLUMN + "group"] = first + torch.arange(n) // trainer.num_generations
            self._groups += trainer.accelerator.num_processes * n // trainer.num_generations
            return out

        return with_columns

    def _tagging(self, compute_loss: Callable) -> Callable:
        def tagged(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            ours = {k[len(_COLUMN):]: inputs[k] for k in inputs if k.startswith(_COLUMN)}
            inputs = {k: v for k, v in inputs.items() if not k.startswith(_COLUMN)}
            out = compute_loss(model, inputs, *args, **kwargs)
            # tagged after the forward pass: chisel checks a tag's length against the batches seen
            if self.recorder is not None and ours and torch.is_grad_enabled():
                advantages = inputs.get("advantages")
                if isinstance(advantages, torch.Tensor) and advantages.ndim == 1:
                    ours["advantage"] = advantages  # [B]; a subclass's per-token [B, T] is not
                self.recorder.tag(**ours)
            return out

        return tagged

    def _metadata(self, args: Any, model: torch.nn.Module) -> dict[str, Any]:
        keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                "weight_decay", "max_grad_norm", "num_train_epochs", "max_steps", "seed",
                "num_generations", "steps_per_generation", "num_iterations", "beta", "epsilon",
                "loss_type", "scale_rewards")
        hyper = {k: getattr(args, k) for k in keys
                 if isinstance(getattr(args, k, None), (int, float, bool, str))}
        meta: dict[str, Any] = {
            "integration": "transformers",
            "transformers_version": transformers.__version__,
            "trainer": type(self.trainer).__name__ if self.trainer is not None else None,
            "model_class": type(model).__name__,
            "hyperparameters": hyper,
        }
        if self.trainer is not None and _is_grpo(self.trainer):
            import trl

            meta["trl_version"] = trl.__version__
            meta["sample_tags"] = [*GRPO_TAGS, *map(_tag_name, self.trainer.reward_func_names)]
        return meta
