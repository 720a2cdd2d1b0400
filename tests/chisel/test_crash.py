"""A recording process SIGKILLed at random moments leaves a run whose every reported step is exact.

The training is deterministic (fixed seed, one thread, per-step data seeds), so the test replays
it in-process without recording and compares every reported step bit for bit: Δθ_t, θ_t, the
gradient the optimizer consumed, the tags and the per-sample factors.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
import torch

import chisel

# The training script, written into tmp_path: the subprocess runs it, the test imports it for
# the reference trajectory, so both run the very same code.
CHILD = '''
import os
import sys
import traceback

import torch
from torch import nn

import chisel

OBS, HID, ACT = 8, 32, 4
KEYFRAME_EVERY = 7
RESUMED_STEPS = 25


def make():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(OBS, HID), nn.Tanh(), nn.Linear(HID, HID), nn.Tanh(), nn.Linear(HID, ACT)
    )
    return model, torch.optim.Adam(model.parameters(), lr=3e-3)


def batch(t):
    """The minibatch of step t; its own seed, so a replay can start at any step."""
    gen = torch.Generator().manual_seed(10_000 + t)
    n = 16 + 8 * (t % 3)
    return (
        torch.randn(n, OBS, generator=gen),
        torch.randint(0, ACT, (n,), generator=gen),
        torch.randn(n, generator=gen),
    )


def train_step(model, opt, t, rec=None):
    """One PPO-shaped step; returns (x, unclipped grads, clipped grads)."""
    x, a, adv = batch(t)
    logp = model(x).log_softmax(-1)[torch.arange(len(a)), a]
    loss = -(logp * adv).mean()
    opt.zero_grad()
    loss.backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    clipped = {n: p.grad.clone() for n, p in model.named_parameters()}
    if rec is not None:
        rec.tag(advantage=adv, batch_step=t)
    opt.step()
    return x, raw, clipped


def restore(model, opt, run, k):
    """θ and the Adam state before step k, from the run's keyframe at k."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in run.params(k).items():
            params[name].copy_(value)
    for name, state in run.optimizer_state(k).items():
        opt.state[params[name]] = {key: v.clone() for key, v in state.items()}


def main(run_dir, mode):
    model, opt = make()
    start, stop = 0, 10**9
    if mode == "resume":
        run = chisel.load(run_dir)
        start = len(run)
        k = max(kf for kf in run.keyframes if kf <= start)
        restore(model, opt, run, k)
        for t in range(k, start):  # replay from the checkpoint to where the run stops
            train_step(model, opt, t)
        stop = start + RESUMED_STEPS
    if mode == "compact":  # low-rank updates between exact keyframes
        rec = chisel.record(model, opt, run_dir, compact=True, keyframe_every=KEYFRAME_EVERY)
    else:
        rec = chisel.record(
            model, opt, run_dir, factors=True, keyframe_every=KEYFRAME_EVERY, resume=mode == "resume"
        )
    with rec:
        print("recording", rec.step, os.getpid(), flush=True)
        for t in range(start, stop):
            train_step(model, opt, t, rec)
    print("closed", flush=True)


def serve():
    """Import torch and chisel once, then fork one training process per request on stdin.

    Request: "<mode> <run_dir>". The forked process prints "recording <step> <pid>" once its
    recorder is attached; the server prints "exit <status>" when it ends (or is killed).
    """
    torch.set_num_threads(1)
    model, opt = make()  # the first optimizer costs seconds of lazy imports: pay them once
    train_step(model, opt, 0)
    print("ready", flush=True)
    for line in sys.stdin:
        mode, run_dir = line.split()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                main(run_dir, mode)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("exit", status, flush=True)


if __name__ == "__main__":
    serve()
'''

LAYERS = ("0", "2", "4")  # the Linear modules of the child's MLP


class Server:
    """A `sys.executable` subprocess running the training script's fork server."""

    def __init__(self, script: Path, log: Path) -> None:
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self.log = log
        self._expect("ready")

    def _expect(self, word: str) -> list[str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line and line[0] == word, (line, self.log.read_text())
        return line[1:]

    def _send(self, mode: str, run_dir: Path) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{mode} {run_dir}\n")
        self.proc.stdin.flush()

    def kill_while_recording(
        self, run_dir: Path, delay: float, min_steps: int = 0, mode: str = "crash"
    ) -> None:
        """Start training into `run_dir`; once `min_steps` steps are on disk, let it record for
        `delay` s more, then SIGKILL it."""
        self._send(mode, run_dir)
        step, pid = map(int, self._expect("recording"))
        assert step == 0
        deadline = time.monotonic() + 60
        while len(chisel.load(run_dir)) < min_steps and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        (status,) = map(int, self._expect("exit"))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

    def resume(self, run_dir: Path) -> list[str]:
        """Continue the run in `run_dir` to completion; returns the lines it printed."""
        self._send("resume", run_dir)
        lines = [["recording", *self._expect("recording")]]
        lines.append(self._expect("closed"))
        (status,) = map(int, self._expect("exit"))
        assert status == 0, self.log.read_text()
        return [" ".join(line) for line in lines]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> Iterator[tuple[Server, ModuleType]]:
    """The fork server (torch is imported once, not once per trial) and the script as a module."""
    root = tmp_path_factory.mktemp("crash")
    script = root / "crash_child.py"
    script.write_text(CHILD)
    spec = importlib.util.spec_from_file_location("crash_child", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server = Server(script, root / "server.log")
    try:
        yield server, module
    finally:
        server.close()


@dataclass
class Reference:
    """The unrecorded trajectory: θ_t, batches, unclipped and clipped grads of each step."""

    module: ModuleType
    thetas: list[dict[str, torch.Tensor]] = field(default_factory=list)
    xs: list[torch.Tensor] = field(default_factory=list)
    raw: list[dict[str, torch.Tensor]] = field(default_factory=list)
    clipped: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model, self.opt = self.module.make()
        self.thetas.append(self._theta())

    def _theta(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def extend(self, n_steps: int) -> None:
        """Train until θ_0 … θ_{n_steps} are known."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the child, so the arithmetic is the same
        try:
            while len(self.xs) < n_steps:
                x, raw, clipped = self.module.train_step(self.model, self.opt, len(self.xs))
                self.xs.append(x)
                self.raw.append(raw)
                self.clipped.append(clipped)
                self.thetas.append(self._theta())
        finally:
            torch.set_num_threads(threads)


def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def check_run(run: chisel.Run, ref: Reference) -> int:
    """Every step the run reports equals the reference; returns len(run)."""
    n = len(run)
    ref.extend(n)
    if n:
        steps = run.steps
        assert steps["step"].tolist() == list(range(n))
        assert not steps["skipped"].any()
    for t in range(n):
        before, after = ref.thetas[t], ref.thetas[t + 1]
        _equal(run.params(t), before)
        _equal(run.update(t), {k: after[k].double() - before[k].double() for k in before})
        _equal(run.grads(t), ref.clipped[t])
        tags = run.tags(t)
        assert tags["batch_step"] == t
        _equal({"advantage": tags["advantage"]}, {"advantage": ref.module.batch(t)[2]})
        factors = run.factors(t)
        assert sorted(factors) == list(LAYERS)
        assert torch.equal(factors["0"][0], ref.xs[t])  # the first layer's input is the batch
        for layer in LAYERS:
            x, g = factors[layer]
            assert x.shape[0] == g.shape[0] == len(ref.xs[t])
            torch.testing.assert_close(
                g.double().T @ x.double(),
                ref.raw[t][f"{layer}.weight"].double(),
                rtol=1e-5,
                atol=1e-7,
            )
    _equal(run.params(n), ref.thetas[n])  # θ after the last complete step
    return n


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_leaves_exact_steps(child, tmp_path):
    server, module = child
    ref = Reference(module)
    rng = random.Random(20240607)
    lengths = []
    for trial in range(5):
        run_dir = tmp_path / f"run{trial}"
        min_steps = rng.choice([0, 1, 5, 20])
        server.kill_while_recording(run_dir, rng.uniform(0.0, 0.3), min_steps)
        n = check_run(chisel.load(run_dir), ref)
        assert n >= min_steps
        lengths.append(n)
    assert len(set(lengths)) > 1, lengths  # the kills landed at different moments


def _norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in b)) ** 0.5


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_of_a_compact_recording_leaves_exact_keyframes_and_true_error_bounds(child, tmp_path):
    """Compact mode writes through the same files: a kill at any moment leaves a readable prefix
    whose keyframes are θ bit for bit and whose every step states an error bound that holds
    (the last interval is left open by the kill, the earlier ones closed)."""
    server, module = child
    ref = Reference(module)
    rng = random.Random(20261202)
    lengths = []
    for trial, min_steps in enumerate((1, 5, 2 * module.KEYFRAME_EVERY + 1)):
        run_dir = tmp_path / f"compact{trial}"
        server.kill_while_recording(run_dir, rng.uniform(0.0, 0.3), min_steps, mode="compact")
        run = chisel.load(run_dir)
        n = len(run)
        assert n >= min_steps
        assert run.manifest["config"]["compact"]
        ref.extend(n)
        for k in run.keyframes:
            if k <= n:  # low-rank weights come back in float64, exactly θ's float32 values
                got = run.params(k)
                assert all(torch.equal(got[m].double(), v.double()) for m, v in ref.thetas[k].items())
        for t in range(n):
            true = {k: ref.thetas[t + 1][k].double() - ref.thetas[t][k].double() for k in ref.thetas[t]}
            assert _norm(run.update(t), true) <= run.update_error(t) * (1 + 1e-9) + 1e-12, t
            assert _norm(run.params(t), ref.thetas[t]) <= run.params_error(t) * (1 + 1e-9) + 1e-12, t
        lengths.append(n)
    assert max(run.keyframes) >= 2 * module.KEYFRAME_EVERY  # the last trial closed intervals too
    assert len(set(lengths)) > 1, lengths  # the kills landed at different moments


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_resume_after_sigkill_continues_numbering(child, tmp_path):
    server, module = child
    run_dir = tmp_path / "run"
    server.kill_while_recording(run_dir, delay=0.1, min_steps=2 * module.KEYFRAME_EVERY)
    killed_at = len(chisel.load(run_dir))
    assert killed_at >= 2 * module.KEYFRAME_EVERY  # the resume replays from a keyframe > 0

    out = server.resume(run_dir)
    assert out[0].split()[:2] == ["recording", str(killed_at)]
    assert out[1] == ""  # "closed": the resumed run ended normally

    run = chisel.load(run_dir)
    assert len(run) == killed_at + module.RESUMED_STEPS
    starts = run.manifest["starts"]
    assert [(s["step"], s["resumed"]) for s in starts] == [(0, False), (killed_at, True)]
    assert killed_at in run.keyframes
    assert check_run(run, Reference(module)) == killed_at + module.RESUMED_STEPS
    assert not list(run_dir.glob("*/.tmp-*"))  # leftovers of the kill were cleared


def test_run_readable_before_the_writer_thread_wrote_anything(child, tmp_path, monkeypatch):
    """A process killed just after `record()` returned may have written nothing from its writer
    thread yet. Its run has 0 steps, and θ_0 must be known (`params(len(run))` is the final θ)."""
    import chisel.store.writer as writer_module

    _, module = child
    release = threading.Event()
    write = writer_module.write_tensors

    def stalled_write(*args, **kwargs):  # the writer thread has not got to it yet
        if threading.current_thread() is not threading.main_thread():
            release.wait(timeout=10)
        write(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_tensors", stalled_write)
    model, opt = module.make()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with chisel.record(model, opt, tmp_path / "run", factors=True):
        try:
            run = chisel.load(tmp_path / "run")
            assert len(run) == 0
            _equal(run.params(0), theta0)
        finally:
            release.set()
