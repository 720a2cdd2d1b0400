"""The background writer: turns StepPackets into files, off the training thread."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from chisel import _names as N
from chisel.capture.buffers import FlatLayout
from chisel.capture.config import RecordConfig, torch_dtype
from chisel.capture.packet import Keyframe, StepPacket
from chisel.errors import WriterError
from chisel.store.compact import CompactEncoder, plan
from chisel.store.filequeue import FileQueue
from chisel.store.layout import RunLayout, write_tensors
from chisel.store.norms import SegmentNorms, total
from chisel.store.stfile import DirectFiles

_EXACT_IN: dict[torch.dtype, set[torch.dtype]] = {
    torch.float64: {torch.float64, torch.float32, torch.bfloat16, torch.float16},
    torch.float32: {torch.float32, torch.bfloat16, torch.float16},
    torch.bfloat16: {torch.bfloat16},
    torch.float16: {torch.float16},
}


def encoding_for(param_dtype: torch.dtype, storage: torch.dtype) -> str:
    """EXACT when the storage dtype holds every value of the parameter's dtype, else LOSSY."""
    exact = param_dtype in _EXACT_IN.get(storage, set()) or not param_dtype.is_floating_point
    return N.EXACT if exact else N.LOSSY


def _pack(
    item: StepPacket, head: dict[str, torch.Tensor], rest: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], Any]:
    """The step's tensors in file order, and the packet's region (a page-aligned uint8 array)
    when they lie back to back from its start (else None).

    When θ and the grads are the packet's page-aligned region, in file order, the small
    tensors (tags) are copied into the region's spare room right after them: the whole data
    section is then one block of memory, written without a staging copy."""
    region = item.region
    if region is None or not head:
        return {**rest, **head}, None
    order = {d: i for i, d in enumerate(sorted(item.after or {}, key=lambda d: -torch_dtype(d).itemsize))}
    keys = sorted(head, key=lambda k: (order.get(k.split("/", 1)[1], -1), not k.startswith(N.AFTER)))
    start = head[keys[0]].data_ptr()
    end = start
    for k in keys:  # exactly the region's layout? (lossy deltas and cast grads are not in it)
        if head[k].data_ptr() != end:
            return {**rest, **head}, None
        end += head[k].numel() * head[k].element_size()
    if start != region.data.ctypes.data or end - start != region.used:
        return {**rest, **head}, None
    tail = sorted(rest.items(), key=lambda kv: -kv[1].element_size())
    offset = region.used
    placed: dict[str, torch.Tensor] = {}
    for key, value in tail:
        n = value.numel() * value.element_size()
        if offset % value.element_size() or offset + n > len(region.data) or value.device.type != "cpu":
            return {**rest, **head}, None
        view = region.data[offset : offset + n]
        view[:] = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        placed[key] = torch.from_numpy(view).view(value.dtype).view(value.shape)
        offset += n
    return {**{k: head[k] for k in keys}, **placed}, region.data


# step files at least this large are written by the file thread (store.filequeue): the device's
# wait for an O_DIRECT write (measured 0.3 ms for 0.4 MB, 2.7 ms for 2.7 MB, 21 ms for 21 MB)
# then overlaps the next step's work; smaller ones cost less written on the writer thread
QUEUED_FILE_BYTES = 1 << 20


class RunWriter:
    """Consumes packets from a bounded queue in a daemon thread; failures are re-raised by
    `check()` in the training thread (at the next step, or at `close()`)."""

    def __init__(self, layout: RunLayout, flat: FlatLayout, config: RecordConfig):
        self.layout = layout
        self.flat = flat
        self.config = config
        self._storage = torch_dtype(config.dtype)
        self._factor_dtype = torch_dtype(config.factor_dtype) if config.factor_dtype else None
        self.encodings = {
            n: encoding_for(torch_dtype(d), self._storage) for n, d in zip(flat.names, flat.dtypes)
        }
        self._group_encoding = {d: encoding_for(torch_dtype(d), self._storage) for d in flat.sizes}
        self._compact: CompactEncoder | None = None
        if config.compact is not None:  # low-rank updates with error feedback: chisel/store/compact.py
            entries = plan(flat.names, flat.shapes, flat.dtypes, config.compact)
            self._compact = CompactEncoder(entries, config.compact)
            self.encodings = self._compact.encodings
        # per dtype group: parameter sizes and names, in flat order
        self._segments: dict[str, list[tuple[str, int]]] = {d: [] for d in flat.sizes}
        for name, shape, dtype in zip(flat.names, flat.shapes, flat.dtypes):
            numel = 1
            for s in shape:
                numel *= s
            self._segments[dtype].append((name, numel))
        self._bounds: dict[str, list[tuple[int, int]]] = {}  # dtype -> [(start, end)] per param
        for dtype, segs in self._segments.items():
            starts = np.cumsum([0] + [n for _, n in segs]).tolist()
            self._bounds[dtype] = list(itertools.pairwise(starts))
        self._norms = {d: SegmentNorms(b) for d, b in self._bounds.items()}  # store.norms
        self._diff: dict[str, torch.Tensor] = {}  # θ_{t+1} − θ_t per dtype, for step_deltas only
        self._prev: dict[str, torch.Tensor] = {}  # θ before the step being written (flat)
        self._recon: dict[str, torch.Tensor] = {}  # θ̂ in float64 for LOSSY groups (flat)
        self._files = DirectFiles()  # used by the file thread only (and before it starts)
        # the device writes one step while this thread prepares the next (store.filequeue)
        self._io = FileQueue()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._error: BaseException | None = None
        self._error_step: int | None = None
        self.steps_written = 0
        # called in this thread with (record, tags) of each step once its file is written
        # (the recorder's TensorBoard view); set before the first step is submitted
        self.on_step: Callable[..., None] | None = None
        # on_step also gets the step's update per parameter ({name: tensor}) when this is set
        self.step_deltas = False
        self._deltas: dict[str, torch.Tensor] = {}
        self._thread = threading.Thread(target=self._loop, name="chisel-writer", daemon=True)
        self._thread.start()

    # -- training-thread side ------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        """The writer stopped on an error (`check()` raises it)."""
        return self._error is not None

    def check(self) -> None:
        if self._io.error is not None and self._error is None:
            self._error, self._error_step = self._io.error, self._io.error_step
        if self._error is not None:
            where = f" while writing step {self._error_step}" if self._error_step is not None else ""
            raise WriterError(
                f"chisel's writer failed{where}: {self._error!r}. Steps before it are on disk in "
                f"{self.layout.root}; fix the cause (disk space, permissions), then continue with "
                "chisel.record(..., resume=True)."
            ) from self._error

    def submit(self, item: StepPacket | Keyframe) -> None:
        while True:  # back-pressure: block while the queue is full, unless the writer died
            self.check()
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def write_keyframe_now(self, keyframe: Keyframe) -> None:
        """Write a keyframe in the calling thread (before any step is queued)."""
        assert self._queue.empty()
        self._write_keyframe(keyframe, now=True)

    def flush(self) -> None:
        """Block until every queued item is written (or the writer failed: then raise)."""
        while self._thread.is_alive() and self._queue.unfinished_tasks:
            self.check()
            with self._queue.all_tasks_done:
                if self._queue.unfinished_tasks:
                    self._queue.all_tasks_done.wait(timeout=0.05)
        self._io.wait()  # the last file may still be in flight
        self.check()

    def close(self) -> None:
        """Write everything queued, stop the thread, raise a writer failure if there was one."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._io.close()
        self.check()

    # -- writer-thread side --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            self._handed = False  # _write sets it once the file thread owns the packet's release
            try:
                if self._error is None and self._io.error is None:
                    self._write(item)
            except BaseException as err:  # surfaced by check(); later packets are only released
                if self._io.error is None:  # else put() re-raised the file thread's failure
                    self._error = err
                    self._error_step = item.step
            finally:
                if isinstance(item, StepPacket) and not self._handed:
                    item.release()
                self._queue.task_done()

    def _write(self, item: StepPacket | Keyframe) -> None:
        if isinstance(item, Keyframe):
            self._write_keyframe(item)
            return
        if item.keyframe is not None:
            self._write_keyframe(item.keyframe)
        done: dict[str, Any] = {}  # what the writer adds to the capture's record
        tensors: dict[str, torch.Tensor] = {}
        if item.factors:
            factors, index = self._factors(item)
            tensors.update(factors)
            done.update(index)
        head: dict[str, torch.Tensor] = {}  # θ and grads: in the packet's region, if it has one
        if item.after is not None:
            if self._compact is not None:  # before _encode moves θ_t on to θ_{t+1}
                compact, done["compact"] = self._compact.encode(
                    item.step, self.flat.split(self._prev), self.flat.split(item.after)
                )
                head.update(compact)
            encoded, done["update_norms"], done["update_norm"] = self._encode(item.after)
            head.update(encoded)
        if item.grads is not None:
            if item.record.grad_norm is None:
                norms = [n for d, flat in item.grads.items() for n in self._norms[d](flat)]
                done["grad_norm"] = total(norms)
            head.update({N.GRAD + d: flat.to(self._storage) for d, flat in item.grads.items()})
        if item.state is not None:
            tensors.update({N.STATE + k: v for k, v in item.state.items()})
        done["tags"] = {}
        for name, value in item.tags.items():
            if isinstance(value, torch.Tensor):
                tensors[N.TAG + name] = value
                done["tags"][name] = {"len": len(value)}
            else:
                done["tags"][name] = value
        record = replace(item.record, **done)
        tensors, block = _pack(item, head, tensors)
        # written here, after the file in flight: a small file (the device's wait is short and
        # the hand-over to the file thread would cost more), or one the live view reads now
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        now = self.on_step is not None or nbytes < QUEUED_FILE_BYTES
        if now:
            self._io.wait()
        write_tensors(
            self.layout.step_file(item.step),
            tensors,
            record.to_json(),
            fsync=self.config.fsync,
            files=self._files,
            block=block,
            queue=None if now else self._io,
            written=self._written,
            release=None if now else item.release,
            step=item.step,
        )
        self._handed = not now  # the file thread releases the packet once its file is written
        if self.on_step is not None:
            if self.step_deltas:
                self.on_step(record, item.tags, self._deltas if item.after is not None else None)
            else:
                self.on_step(record, item.tags)

    def _written(self) -> None:  # on the file thread, once a step file is in place
        self.steps_written += 1

    def _encode(
        self, after: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
        """The step's θ tensors as stored (exact, or deltas with the rounding error fed back),
        the update's norm per parameter and in total."""
        out, norms = {}, {}
        for dtype, value in after.items():
            diff = self._diff.get(dtype) if self.step_deltas else None
            values = self._norms[dtype].diff(value, self._prev[dtype], diff)
            norms.update(zip((name for name, _ in self._segments[dtype]), values))
            if self._compact is not None:  # stored by the compact encoder
                continue
            if self._group_encoding[dtype] == N.EXACT:
                out[N.AFTER + dtype] = value
                continue
            # store θ_{t+1} − θ̂_t and advance θ̂ by exactly what the reader will add back, so the
            # rounding error of one step is fed into the next instead of accumulating
            delta = (value.double() - self._recon[dtype]).to(self._storage)
            self._recon[dtype] += delta.double()
            out[N.DELTA + dtype] = delta
        if self.step_deltas:
            self._deltas = self.flat.split(self._diff)  # {param: its update}, views of the diffs
        return out, {n: norms[n] for n in self.flat.names}, total(list(norms.values()))

    def _write_keyframe(self, kf: Keyframe, now: bool = False) -> None:
        tensors = {N.PARAM + n: p for n, p in kf.params.items()}
        tensors.update({N.STATE + k: v for k, v in kf.state.items()})
        meta = {"step": kf.step, "reason": kf.reason}
        if self._compact is not None:  # θ̂ ← θ; does the last step end here (compact_read.py)?
            previous = self.flat.split(self._prev) if self._prev else None
            meta["continues"] = self._compact.reset(kf.params, previous)
        write_tensors(
            self.layout.keyframe_file(kf.step), tensors, meta, fsync=self.config.fsync,
            files=self._files, queue=None if now else self._io, step=kf.step,
        )
        for dtype, segments in self._segments.items():
            flat = self._prev.get(dtype)
            if flat is None:  # the first keyframe; later ones are copied in place (no transient)
                flat = self._prev[dtype] = torch.empty(self.flat.sizes[dtype], dtype=torch_dtype(dtype))
            for (name, _), (lo, hi) in zip(segments, self._bounds[dtype]):
                flat[lo:hi].copy_(kf.params[name].reshape(-1))
            if self.step_deltas and dtype not in self._diff:  # the live view reads each update
                self._diff[dtype] = torch.empty_like(flat)
            if self._group_encoding[dtype] == N.LOSSY:
                if dtype in self._recon:
                    self._recon[dtype].copy_(flat)
                else:
                    self._recon[dtype] = flat.to(torch.float64, copy=True)  # never an alias of prev

    def _factors(self, item: StepPacket) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """All factors of a step packed into one flat vector per dtype (few tensors per file:
        safetensors spends Python time per tensor, and the writer shares the GIL with training)."""
        calls: dict[str, int] = {}
        aliases: dict[str, str] = {}  # key -> key of the identical tensor stored once
        seen: dict[tuple, str] = {}
        parts: dict[str, list[torch.Tensor]] = {}
        layout: dict[str, list] = {}
        offsets: dict[str, int] = {}
        for module, pairs in item.factors.items():
            calls[module] = len(pairs)
            for k, (x, g) in enumerate(pairs):
                for key, value in ((f"{N.FACTOR_X}{module}/{k}", x), (f"{N.FACTOR_G}{module}/{k}", g)):
                    view = (value.untyped_storage().data_ptr(), value.storage_offset(),
                            tuple(value.shape), tuple(value.stride()), value.dtype)
                    if view in seen:  # e.g. one observation batch read by actor and critic
                        aliases[key] = seen[view]
                        continue
                    seen[view] = key
                    # a compact factor_dtype is for activations and gradients; token ids
                    # (Embedding factors) keep their integer dtype, exact at any vocabulary size
                    floating = value.is_floating_point() and self._factor_dtype is not None
                    stored = value.to("cpu", self._factor_dtype if floating else value.dtype)
                    stored = stored.reshape(-1)
                    dtype = str(stored.dtype).removeprefix("torch.")
                    layout[key] = [dtype, offsets.get(dtype, 0), list(value.shape)]
                    offsets[dtype] = offsets.get(dtype, 0) + stored.numel()
                    parts.setdefault(dtype, []).append(stored)
        tensors = {N.FACTORS + d: torch.cat(p) for d, p in parts.items()}
        return tensors, {"factor_calls": calls, "factor_aliases": aliases, "factor_layout": layout}
