"""Typed records that the capture stage hands to the store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from chisel.capture.step_record import StepRecord


@dataclass
class Keyframe:
    """An exact copy of θ (and the optimizer state) *before* optimizer step `step`."""

    step: int
    params: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]  # "<state key>/<param name>" -> tensor
    reason: str  # "start", "resume", "periodic", "external change", "end"


@dataclass
class StepPacket:
    """Everything recorded about one optimizer step, handed to the writer thread.

    Tensors are copies owned by the packet (or activations autograd no longer needs), never live
    parameters; `release()` gives the reusable buffers back once they are written.
    """

    step: int
    record: StepRecord  # completed by the writer (norms, tags, factor index)
    # dtype name -> flat vector in the recorder's FlatLayout (param order)
    after: dict[str, torch.Tensor] | None = None  # θ after the step; None when skipped
    grads: dict[str, torch.Tensor] | None = None  # the gradient the optimizer consumed
    state: dict[str, torch.Tensor] | None = None  # optimizer state before the step
    keyframe: Keyframe | None = None
    # module name -> [(x [batch, ..., in], g [batch, ..., out]) per back-propagated call]
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None
    # the page-aligned block `after` and `grads` live in (capture.buffers.Region), CPU runs only:
    # the writer may place the step's small tensors after them and write the block as it is
    region: Any = None
