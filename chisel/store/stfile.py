"""Writing a safetensors file with one `writev`: the tensors' own memory goes to the kernel.

The safetensors library's `save_file` builds the whole file in its own buffer before writing it
(one more copy of every byte, on the writer thread). The format is simple enough to write
directly: 8 bytes little-endian header length, a JSON header, then the tensors' bytes back to
back (https://github.com/huggingface/safetensors#format). Files written here are read by
`safetensors.safe_open` like any other (tested against it), so the run format is unchanged.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

try:  # the same CRC32 as zlib's, ~15x faster (PCLMUL/VPCLMULQDQ); both release the GIL
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # a platform without a zlib-ng wheel: the standard library's, slower
    _crc32 = zlib.crc32

_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_IOV_MAX = 512  # well below every platform's IOV_MAX (1024 on Linux)
_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of this
STAGING = 8 << 20  # bytes: files larger than this are staged piece by piece
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor as a flat uint8 array (a view when it is contiguous)."""
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    return data.contiguous().reshape(-1).view(torch.uint8).numpy()


def crc32(data: Any) -> int:
    """CRC32 (zlib's polynomial, the run format's `crc32`) of a byte buffer: zlib-ng's
    hardware-accelerated one where installed (a core dependency), else the standard library's;
    both give the same value and release the GIL on large buffers."""
    return _crc32(data)


def encode_header(
    tensors: Mapping[str, torch.Tensor], data: Mapping[str, np.ndarray], metadata: dict[str, str]
) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces to a multiple of 8 bytes so
    that the data (laid out widest dtype first) is aligned for every dtype."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _CODES:
            raise TypeError(f"tensor {key!r} has dtype {tensor.dtype}, which chisel does not store")
        end = offset + data[key].nbytes
        header[key] = {"dtype": _CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return len(raw).to_bytes(8, "little") + raw


def ordered(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors in the given order if every one lands at an offset aligned for its dtype,
    else widest dtype first (then by key), as safetensors orders them."""
    offset = 0
    for value in tensors.values():
        if offset % value.element_size():
            return dict(sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0])))
        offset += value.numel() * value.element_size()
    return dict(tensors)


def write_file(path: str | os.PathLike, parts: list[Any]) -> None:
    """Create `path` and write the byte buffers `parts` to it, all of them (writev, retried on a
    short write)."""
    fd = os.open(path, _FLAGS, 0o666)
    try:
        views = [memoryview(p).cast("B") for p in parts if len(memoryview(p).cast("B"))]
        while views:
            batch = views[:_IOV_MAX]
            written = os.writev(fd, batch)
            if written <= 0:
                raise OSError(f"writev wrote nothing to {path}")
            done = 0
            while done < len(batch) and written >= len(batch[done]):
                written -= len(batch[done])
                done += 1
            views = views[done:]
            if written and views:
                views[0] = views[0][written:]
    finally:
        os.close(fd)


class DirectFiles:
    """Writes files with O_DIRECT from one page-aligned staging buffer, reused for every file.

    The page cache is bypassed: the kernel neither allocates pages for the bytes nor copies them
    (on a virtual machine, first-touched page-cache pages cost ~2 ms of CPU per MB); the device
    reads the staging buffer directly. Where O_DIRECT is unavailable (no `os.O_DIRECT`, a file
    system that refuses it) every file is written through the page cache instead (`direct`
    turns False).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.direct = enabled and hasattr(os, "O_DIRECT")
        self._buf: mmap.mmap | None = None
        self.counts = {"in place": 0, "staged": 0, "page cache": 0}  # files written each way

    @property
    def staging_bytes(self) -> int:
        return len(self._buf) if self._buf is not None else 0

    def _staging(self, size: int) -> np.ndarray:
        if self._buf is None or len(self._buf) < size:
            if self._buf is not None:
                self._buf.close()
            self._buf = mmap.mmap(-1, size)  # anonymous: page-aligned
        return np.frombuffer(self._buf, dtype=np.uint8, count=size)

    def write(self, path: str | os.PathLike, parts: list[Any], block: np.ndarray | None = None) -> None:
        """Write `parts` (the header, then the data) to a new file `path`.

        If the data parts lie back to back from the start of `block` (page-aligned uint8
        memory with room for the page padding after them), the data is written from where it
        lies: only the header is staged, padded with spaces to a whole page."""
        if not self.direct:
            self.counts["page cache"] += 1
            write_file(path, parts)
            return
        arrays = [np.frombuffer(p, dtype=np.uint8) for p in parts]
        total = sum(a.nbytes for a in arrays)
        data = _block(arrays[1:], block)
        if data is not None:
            header = _pad_header(bytes(arrays[0]))
            staging = self._staging(len(header))
            staging[:] = np.frombuffer(header, dtype=np.uint8)
            size = len(header) + data.nbytes  # the file's exact length
            assert block is not None
            iov = [staging, block[: -(-data.nbytes // _ALIGN) * _ALIGN]]
            self._direct(path, [iov], size, parts, "in place")
            return
        staging = self._staging(min(-(-total // _ALIGN) * _ALIGN, STAGING))
        self._direct(path, _chunks(arrays, staging), total, parts, "staged")

    def _direct(self, path: str | os.PathLike, writes: Any, size: int, parts: list[Any], how: str) -> None:
        """Write `size` bytes to `path` with O_DIRECT: `writes` yields lists of page-aligned
        buffers (whole pages), each list one `writev`; the file is then cut to `size`."""
        try:
            fd = os.open(path, _FLAGS | os.O_DIRECT, 0o666)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            self.direct = False  # the file system refuses O_DIRECT: the page cache it is
            self.counts["page cache"] += 1
            write_file(path, parts)
            return
        complete = True
        try:
            for iov in writes:
                want = sum(a.nbytes for a in iov)
                if os.writev(fd, iov) != want:
                    complete = False  # short: the rest would start unaligned
                    break
            if complete:
                os.ftruncate(fd, size)  # the file ends where its data ends
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            complete = False
            self.direct = False  # an alignment this device does not accept
        finally:
            os.close(fd)
        if not complete:  # write the whole file again, through the page cache
            self.counts["page cache"] += 1
            write_file(path, parts)
            return
        self.counts[how] += 1


def _block(data: list[np.ndarray], block: np.ndarray | None) -> np.ndarray | None:
    """The data parts as one page-aligned array over their memory, if they lie back to back
    from the start of `block` (a page-aligned buffer with room for the page padding)."""
    if block is None or not data or block.ctypes.data % _ALIGN:
        return None
    end = block.ctypes.data
    for a in data:
        if a.ctypes.data != end:
            return None
        end += a.nbytes
    used = end - block.ctypes.data
    if -(-used // _ALIGN) * _ALIGN > block.nbytes:
        return None
    return block[:used]


def _pad_header(header: bytes) -> bytes:
    """An encoded header (8-byte length + JSON) padded with spaces to a multiple of a page,
    so the data after it starts page-aligned in the file (JSON allows trailing spaces)."""
    n = int.from_bytes(header[:8], "little")
    pad = -len(header) % _ALIGN
    return (n + pad).to_bytes(8, "little") + header[8:] + b" " * pad


def _chunks(arrays: list[np.ndarray], staging: np.ndarray) -> Any:
    """The bytes of `arrays`, back to back, copied through `staging` (whole pages): yields
    [staging] each time it is full, then the last piece padded with zeros to a page."""
    pos = 0
    for a in arrays:
        done = 0
        while done < a.nbytes:
            n = min(a.nbytes - done, staging.nbytes - pos)
            staging[pos : pos + n] = a[done : done + n]
            pos, done = pos + n, done + n
            if pos == staging.nbytes:
                yield [staging]
                pos = 0
    if pos:
        end = -(-pos // _ALIGN) * _ALIGN
        staging[pos:end] = 0
        yield [staging[:end]]
