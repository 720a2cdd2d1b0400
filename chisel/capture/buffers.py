"""Reusable host buffers for parameter and gradient copies (bounded memory, back-pressure)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def copy_into(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """Copy tensors into preallocated host buffers (one foreach kernel on CPU)."""
    if all(s.device.type == "cpu" for s in src):
        torch._foreach_copy_(list(dst), list(src))
        return
    for d, s in zip(dst, src):
        d.copy_(s, non_blocking=True)
    for dev in {s.device for s in src if s.device.type == "cuda"}:
        torch.cuda.synchronize(dev)


@dataclass
class Buffers:
    after: list[torch.Tensor]
    grads: list[torch.Tensor] | None


class BufferPool:
    """At most `size` buffer sets exist; `acquire` blocks (checking `on_wait`) when all are out."""

    def __init__(self, params: Sequence[torch.Tensor], size: int, grads: bool) -> None:
        self._params = list(params)
        self._size = size
        self._grads = grads
        self._made = 0
        self._free: queue.Queue[Buffers] = queue.Queue()
        self._pin = any(p.device.type == "cuda" for p in self._params)

    def _empty_like(self, p: torch.Tensor) -> torch.Tensor:
        return torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=self._pin)

    def acquire(self, on_wait: Callable[[], None]) -> Buffers:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._size:
            self._made += 1
            return Buffers(
                after=[self._empty_like(p) for p in self._params],
                grads=[self._empty_like(p) for p in self._params] if self._grads else None,
            )
        while True:  # back-pressure: wait for the writer, but never past a writer failure
            on_wait()
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                continue

    def release(self, buffers: Buffers) -> None:
        self._free.put(buffers)
