"""One file in flight: the device writes step t while the writer thread prepares step t + 1.

An `O_DIRECT` write returns only when the device has the bytes (no page cache to absorb it), so
a writer that wrote each file itself would wait out the device's latency every step, and a step
shorter than that latency would fill the queue and stall training. `FileQueue` writes the files
on a thread of its own, in the order they are given, one at a time: `put` hands a prepared file
over and returns at once if the previous one is written, else waits for it. At most one file is
in flight and every file's buffers are released (`done`) only once it is renamed into place, so
the memory bound and the crash consistency (a file appears whole under its name, in step order)
stay those of a writer that writes its own files.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_Job = tuple[Callable[[], None], Callable[[], None] | None]


class FileQueue:
    """Runs write jobs in order on one daemon thread, one at a time; an error stops it and is
    re-raised by `check()` (and by the next `put`) in the caller's thread."""

    def __init__(self, name: str = "chisel-files") -> None:
        self._idle = threading.Semaphore(1)  # held from `put` until its job has finished
        self._ready = threading.Semaphore(0)
        self._job: _Job | None = None
        self._stop = False
        self.error: BaseException | None = None
        self.error_step: int | None = None
        self._step: int | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, write: Callable[[], None], done: Callable[[], None] | None = None, *, step: int | None = None) -> None:
        """Run `write()` on the file thread once the previous job has finished, then `done()`
        (also after a failed write: `done` releases buffers). Raises the failure of an earlier
        job instead (the job is not taken: `done` is then the caller's to call)."""
        self._idle.acquire()
        if self.error is not None:
            self._idle.release()
            self.check()
        self._job, self._step = (write, done), step
        self._ready.release()

    def wait(self) -> None:
        """Block until the job in flight (if any) has finished (`check()` raises its failure)."""
        self._idle.acquire()
        self._idle.release()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Finish the job in flight and stop the thread (idempotent)."""
        if self._thread.is_alive():
            self._idle.acquire()
            self._stop = True
            self._ready.release()
            self._thread.join()
            self._idle.release()

    def _loop(self) -> None:
        while True:
            self._ready.acquire()
            if self._stop:
                return
            job, self._job = self._job, None
            assert job is not None
            write, done = job
            try:
                if self.error is None:
                    write()
            except BaseException as err:  # re-raised in the writer thread by check()
                self.error, self.error_step = err, self._step
            finally:
                try:
                    if done is not None:
                        done()
                finally:
                    self._idle.release()


def run_now(write: Callable[[], None], done: Callable[[], None] | None = None, **_: Any) -> None:
    """The synchronous stand-in for `FileQueue.put`: write in the calling thread."""
    try:
        write()
    finally:
        if done is not None:
            done()
