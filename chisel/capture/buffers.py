"""Reusable host buffers for parameter and gradient copies (bounded memory, back-pressure).

θ is copied into one flat tensor per dtype (`FlatLayout`), so a step is a handful of tensors,
however many parameters the model has: the writer thread then spends almost no Python time
(and holds the GIL briefly) per step.
"""

from __future__ import annotations

import mmap
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch


def copy_into(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """Copy tensors into preallocated host buffers (one foreach kernel on CPU)."""
    if not src:
        return
    if all(s.device.type == "cpu" for s in src):
        torch._foreach_copy_(list(dst), list(src))
        return
    for d, s in zip(dst, src):
        d.copy_(s, non_blocking=True)
    for dev in {s.device for s in src if s.device.type == "cuda"}:
        torch.cuda.synchronize(dev)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter lives in the flat per-dtype vectors: dtype → [(name, offset, numel)]."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: dict[str, int]

    @classmethod
    def build(cls, names: Sequence[str], shapes: Sequence[Sequence[int]], dtypes: Sequence[str]) -> FlatLayout:
        sizes: dict[str, int] = {}
        offsets = []
        for shape, dtype in zip(shapes, dtypes):
            offsets.append(sizes.get(dtype, 0))
            sizes[dtype] = sizes.get(dtype, 0) + prod(shape)
        return cls(tuple(names), tuple(tuple(s) for s in shapes), tuple(dtypes), tuple(offsets), sizes)

    @classmethod
    def of(cls, names: Sequence[str], params: Sequence[torch.Tensor]) -> FlatLayout:
        return cls.build(names, [p.shape for p in params], [str(p.dtype).removeprefix("torch.") for p in params])

    def empty(self, *, pin: bool = False) -> dict[str, torch.Tensor]:
        return {d: torch.empty(n, dtype=_dtype(d), pin_memory=pin) for d, n in self.sizes.items()}

    def views(self, flats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One view per parameter, in parameter order and shape."""
        return [
            flats[d][o : o + prod(s)].view(s)
            for s, d, o in zip(self.shapes, self.dtypes, self.offsets)
        ]

    def split(self, flats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{param: its view} for every parameter whose dtype group is in `flats` (a reader may
        hold only some groups: a step without gradients of one dtype)."""
        return {
            name: flats[d][o : o + prod(s)].view(s)
            for name, s, d, o in zip(self.names, self.shapes, self.dtypes, self.offsets)
            if d in flats
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "groups": {d: n for d, n in self.sizes.items()},
            "entries": [[n, d, o] for n, d, o in zip(self.names, self.dtypes, self.offsets)],
        }


PAGE = 4096  # alignment of a buffer set's memory (O_DIRECT writes straight from it)
TAIL_ROOM = 1 << 16  # bytes after θ and grads for a step's small tensors (tags)


@dataclass
class Buffers:
    after: dict[str, torch.Tensor]  # dtype -> flat θ after the step
    grads: dict[str, torch.Tensor] | None  # dtype -> flat gradient
    after_views: list[torch.Tensor]
    grad_views: list[torch.Tensor] | None
    # CPU runs: all of the above lie back to back in one page-aligned block, in step-file order
    # (per dtype, widest first: after, then grad), followed by TAIL_ROOM spare bytes
    region: Region | None = None


@dataclass
class Region:
    """A page-aligned block of memory: `used` bytes of θ and grads, then spare room."""

    memory: mmap.mmap
    data: Any  # numpy uint8 array over the whole block
    used: int


def _region_flats(layout: FlatLayout, grads: bool) -> tuple[Region, dict, dict | None]:
    """θ and grad vectors carved from one anonymous mmap (page-aligned, returned to the OS
    when dropped), laid out as the step file stores them."""
    import numpy as np

    order = sorted(layout.sizes, key=lambda d: -_dtype(d).itemsize)
    parts = [(kind, d) for d in order for kind in (("after", "grad") if grads else ("after",))]
    used = sum(layout.sizes[d] * _dtype(d).itemsize for _, d in parts)
    memory = mmap.mmap(-1, -(-(used + TAIL_ROOM) // PAGE) * PAGE)
    data = np.frombuffer(memory, dtype=np.uint8)
    after: dict[str, torch.Tensor] = {}
    grad: dict[str, torch.Tensor] = {}
    offset = 0
    for kind, d in parts:
        n = layout.sizes[d]
        flat = torch.frombuffer(memory, dtype=_dtype(d), count=n, offset=offset) if n else torch.empty(0, dtype=_dtype(d))
        (after if kind == "after" else grad)[d] = flat
        offset += n * _dtype(d).itemsize
    return Region(memory, data, used), after, (grad if grads else None)


class BufferPool:
    """At most `size` buffer sets exist; `acquire` blocks (checking `on_wait`) when all are out."""

    def __init__(self, layout: FlatLayout, size: int, grads: bool, pin: bool) -> None:
        self._layout = layout
        self._size = size
        self._grads = grads
        self._pin = pin
        self._made = 0
        self._free: queue.Queue[Buffers] = queue.Queue()

    def _new(self) -> Buffers:
        region = None
        if self._pin:  # CUDA: pinned memory for asynchronous device-to-host copies
            after = self._layout.empty(pin=True)
            grads = self._layout.empty(pin=True) if self._grads else None
        else:
            region, after, grads = _region_flats(self._layout, self._grads)
        views = self._layout.views(grads) if grads is not None else None
        return Buffers(after, grads, self._layout.views(after), views, region)

    def acquire(self, on_wait: Callable[[], None]) -> Buffers:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._size:
            self._made += 1
            return self._new()
        while True:  # back-pressure: wait for the writer, but never past a writer failure
            on_wait()
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                continue

    def release(self, buffers: Buffers) -> None:
        self._free.put(buffers)
