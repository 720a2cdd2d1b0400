"""The hooks that watch a training loop: optimizer step pre/post, factors, batches, AMP skips."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from chisel.capture.buffers import BufferPool, Buffers, FlatLayout, copy_into
from chisel.capture.config import RecordConfig
from chisel.capture.distributed import RankAgreement, RankInfo, sum_over_ranks
from chisel.capture.distributed_fsdp import is_sharded, local_grad, local_tensor
from chisel.capture.factors import FactorCapture
from chisel.capture.optim import (
    group_hyperparams,
    hook_target,
    named_optimizer_params,
    state_tensors,
)
from chisel.capture.packet import Keyframe, StepPacket
from chisel.capture.step_record import StepRecord
from chisel.capture.tags import TagBuffer


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


class StepCapture:
    """Turns each `optimizer.step()` into a `StepPacket` handed to `sink`.

    `check` is called wherever the training thread may block or start a step, so a failure
    of the consumer (the writer) surfaces in the training thread.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        config: RecordConfig,
        *,
        sink: Callable[[StepPacket | Keyframe], None],
        check: Callable[[], None],
        first_step: int,
        scaler: Any = None,
        distributed: RankInfo | None = None,
        theta: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = hook_target(optimizer)
        self.config = config
        self.names, self.owners = named_optimizer_params(model, self.optimizer)
        # what this process holds of each parameter: the parameter itself, or under FSDP2 its
        # local shard (a DTensor's piece, updated in place by the optimizer)
        self.params = [local_tensor(p) for p in self.owners]
        self.factors = FactorCapture(model, config.factors) if config.factors else None
        if self.factors is not None:
            self.factors.enabled = first_step % config.factors_every == 0
        # DDP / FSDP2: each rank's factors scaled by 1/R and fitted over all ranks; DDP: θ checked equal
        self._agreement = None
        if distributed is not None:
            if not any(is_sharded(p) for p in self.owners):  # FSDP2: ranks hold different pieces
                self._agreement = RankAgreement(distributed, self.names, self.params)
            if self.factors is not None:
                self.factors.scale = distributed.factor_scale
                self.factors.reduce = sum_over_ranks(distributed)
        self.tags = TagBuffer()
        self.step = first_step
        self.scaler = scaler
        self._sink, self._check = sink, check
        self.layout = FlatLayout.of(self.names, self.params)
        pin = any(p.device.type == "cuda" for p in self.params)
        # theta=False (DDP ranks ≥ 1, which write only their samples' factors and tags): no θ
        # or gradient copies, no host buffers for them, no keyframes
        self._pool = BufferPool(self.layout, config.queue_size + 1, grads=config.grads, pin=pin) if theta else None
        # in-place changes bump a tensor's version: a cheap test for θ changed outside step()
        self._versions = self._current_versions()
        self._depth = 0
        self._pending: dict[str, Any] | None = None
        self._stepped_since_update = False
        self._handles: list[Any] = []
        self._scaler_update: Any = None
        self._keyframed_at = -1

    def _current_versions(self) -> list[int]:
        return [p._version for p in self.params]

    # -- attach / detach -------------------------------------------------------------------
    def keyframe(self, reason: str) -> Keyframe:
        """An exact copy of θ and the optimizer state now (before step `self.step`)."""
        self._keyframed_at = self.step
        return Keyframe(
            step=self.step,
            params={n: p.detach().to("cpu", copy=True) for n, p in zip(self.names, self.params)},
            state=state_tensors(self.optimizer, self.names, self.owners),
            reason=reason,
        )

    def attach(self) -> None:
        try:
            opt = self.optimizer
            self._handles.append(opt.register_step_pre_hook(self._pre_step))
            self._handles.append(opt.register_step_post_hook(self._post_step))
            self._handles.append(
                self.model.register_forward_pre_hook(self._saw_forward, with_kwargs=True)
            )
            if self.factors is not None:
                self.factors.attach()
            if self.scaler is not None:
                self._wrap_scaler()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.factors is not None:
            self.factors.detach()
        if self._scaler_update is not None:
            del self.scaler.update  # drops our instance attribute; the class method shows again
            self._scaler_update = None

    # -- hooks ---------------------------------------------------------------------------------
    def _saw_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            return
        x = _first_tensor(args, kwargs)
        if x is None or x.ndim == 0:
            return
        sequence = x.ndim >= 3 or (x.ndim == 2 and not x.is_floating_point())
        self.tags.saw_batch(x.shape[0], x.shape[0] * x.shape[1] if sequence else None)

    def _pre_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1:
            return  # a step that re-enters itself (subclass calling super().step()) counts once
        try:
            self._check()
            self.tags.check()
            self._pending = self._begin_step()
        except BaseException:
            self._depth = 0
            self.tags.take()
            raise

    def _begin_step(self) -> dict[str, Any]:
        pending: dict[str, Any] = {"time": time.time()}
        if self._pool is not None:  # None: a DDP rank ≥ 1, which writes its samples only
            self._take_theta_and_grads(pending)
        if self.factors is not None:  # collective under DDP: every rank fits c
            pending["grad_coef"], pending["grad_coef_residual"] = self.factors.grad_coef()
        return pending

    def _take_theta_and_grads(self, pending: dict[str, Any]) -> None:
        """Keyframe (if due), optimizer state (if every step), and the gradient into a buffer."""
        t, cfg = self.step, self.config
        if self._current_versions() != self._versions:
            pending["keyframe"] = self.keyframe("external change")
        elif cfg.keyframe_every and t % cfg.keyframe_every == 0 and t != self._keyframed_at:
            pending["keyframe"] = self.keyframe("periodic")
        if cfg.optim_state == "every_step":
            pending["state"] = state_tensors(self.optimizer, self.names, self.owners)
        buffers = self._pool.acquire(self._check)
        pending["buffers"] = buffers
        grads = [local_grad(p) for p in self.owners]
        present = [g is not None for g in grads]
        live = [g.detach() for g in grads if g is not None]
        if buffers.grad_views is not None:
            for buf, ok in zip(buffers.grad_views, present):
                if not ok:
                    buf.zero_()
            copy_into([b for b, ok in zip(buffers.grad_views, present) if ok], live)
        elif live:  # no gradient copy for the writer to measure: measure here
            pending["grad_norm"] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(live)).double()))
        pending["grad_missing"] = [n for n, ok in zip(self.names, present) if not ok]

    def _post_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        pending, self._pending = self._pending, None
        assert pending is not None
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and float(found_inf) > 0:
            if self._pool is not None:
                self._pool.release(pending.pop("buffers"))
            self._versions = self._current_versions()  # the fused kernel touched θ in place
            self._emit_skip(
                "GradScaler found inf/NaN gradients; the fused optimizer left θ unchanged",
                pending,
            )
        else:
            self._emit_step(pending)
        if self._agreement is not None:  # collective: every rank, every step, in step
            self._agreement.check(self.step - 1)

    def _emit_step(self, pending: dict[str, Any]) -> None:
        buffers: Buffers | None = pending.pop("buffers", None)
        if buffers is not None:
            copy_into(buffers.after_views, [p.detach() for p in self.params])
        self._versions = self._current_versions()
        record = self._record(pending)  # the writer adds the update and gradient norms
        if self.factors is not None and pending.get("grad_coef") is not None:
            scale = self._loss_scale()
            record = replace(record, clip_coef=pending["grad_coef"] * scale if scale else None)
        packet = StepPacket(
            step=self.step,
            record=record,
            after=buffers.after if buffers is not None else None,
            grads=buffers.grads if buffers is not None else None,
            state=pending.get("state"),
            keyframe=pending.get("keyframe"),
            factors=self.factors.take() if self.factors is not None else {},
            tags=self.tags.take(),
            release=(lambda: self._pool.release(buffers)) if buffers is not None else (lambda: None),
            region=buffers.region if buffers is not None else None,
        )
        self._send(packet)

    def _record(self, pending: dict[str, Any], **fields: Any) -> StepRecord:
        groups = group_hyperparams(self.optimizer)
        grad_scale = getattr(self.optimizer, "grad_scale", None)
        return StepRecord(
            step=self.step,
            time=pending["time"],
            lr=groups[0].get("lr"),
            groups=tuple(groups),
            grad_norm=pending.get("grad_norm"),
            grad_missing=tuple(pending.get("grad_missing", ())),
            batch_sizes=tuple(self.tags.batch_sizes),
            grad_coef=pending.get("grad_coef"),
            grad_coef_residual=pending.get("grad_coef_residual"),
            # a fused optimizer under GradScaler: the stored gradients are scaled
            grads_scaled_by=float(grad_scale) if grad_scale is not None else None,
            **fields,
        )

    def _emit_skip(self, reason: str, pending: dict[str, Any]) -> None:
        loss_scale = float(self.scaler.get_scale()) if self.scaler is not None else None
        record = self._record(pending, skipped=True, skip_reason=reason, loss_scale=loss_scale)
        if self.factors is not None:
            self.factors.clear()
        packet = StepPacket(
            step=self.step,
            record=record,
            keyframe=pending.get("keyframe"),
            tags=self.tags.take(),
        )
        self._send(packet)

    def _send(self, packet: StepPacket) -> None:
        self.step += 1
        if self.factors is not None:
            self.factors.enabled = self.step % self.config.factors_every == 0
        self._stepped_since_update = True
        self._sink(packet)

    # -- AMP -------------------------------------------------------------------------------------
    def _loss_scale(self) -> float:
        """The factor between stored factors and unscaled gradients (1.0 without a GradScaler)."""
        if self.scaler is None or getattr(self.optimizer, "grad_scale", None) is not None:
            return 1.0  # fused: grads and factors are both still scaled
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def _wrap_scaler(self) -> None:
        scaler, original = self.scaler, self.scaler.update
        opt_id = id(self.optimizer)

        def update(new_scale: Any = None) -> None:
            state = scaler._per_optimizer_states.get(opt_id)
            found = state and sum(float(v) for v in state["found_inf_per_device"].values())
            if found and not self._stepped_since_update:
                self._check()
                self._emit_skip(
                    "GradScaler found inf/NaN gradients; optimizer.step() was not called",
                    {"time": time.time(), "grad_norm": None},
                )
            self._stepped_since_update = False
            return original(new_scale)

        self._scaler_update = update
        scaler.update = update
