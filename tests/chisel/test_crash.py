"""A recording process SIGKILLed at random moments leaves a run whose every reported step is exact.

The training is deterministic (fixed seed, one thread, per-step data seeds), so the test replays
it in-process without recording and compares every reported step bit for bit: Δθ_t, θ_t, the
gradient the optimizer consumed, the tags and the per-sample factors.
"""

from __future__ import annotations

import importlib.util
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
import torch

import chisel

# The training script, written into tmp_path: the subprocess runs it, the test imports it for
# the reference trajectory, so both run the very same code.
CHILD = '''
import sys

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
    torch.set_num_threads(1)
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
    rec = chisel.record(
        model, opt, run_dir, factors=True, keyframe_every=KEYFRAME_EVERY, resume=mode == "resume"
    )
    with rec:
        print("recording", rec.step, flush=True)
        for t in range(start, stop):
            train_step(model, opt, t, rec)
    print("closed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
'''

LAYERS = ("0", "2", "4")  # the Linear modules of the child's MLP


@pytest.fixture
def child(tmp_path: Path) -> tuple[Path, ModuleType]:
    script = tmp_path / "crash_child.py"
    script.write_text(CHILD)
    spec = importlib.util.spec_from_file_location("crash_child", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return script, module


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
    assert list(got) == list(want)
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


def _start(script: Path, run_dir: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(run_dir), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_while_recording(script: Path, run_dir: Path, delay: float) -> None:
    """Start the child, wait until it records, let it train `delay` s, then SIGKILL it."""
    proc = _start(script, run_dir, "crash")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("recording"), (line, proc.stderr.read() if proc.stderr else "")
        time.sleep(delay)
        assert proc.poll() is None, "the child stopped on its own"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_exact_steps(child, tmp_path):
    script, module = child
    ref = Reference(module)
    rng = random.Random(20240607)
    lengths = []
    for trial in range(5):
        run_dir = tmp_path / f"run{trial}"
        _kill_while_recording(script, run_dir, delay=rng.uniform(0.05, 0.6))
        lengths.append(check_run(chisel.load(run_dir), ref))
    # the kills landed at different moments, and training had got going in most trials
    assert len(set(lengths)) > 1, lengths
    assert sum(n > 0 for n in lengths) >= 3, lengths


@pytest.mark.slow
def test_resume_after_sigkill_continues_numbering(child, tmp_path):
    script, module = child
    run_dir = tmp_path / "run"
    _kill_while_recording(script, run_dir, delay=0.4)
    killed_at = len(chisel.load(run_dir))
    assert killed_at > module.KEYFRAME_EVERY  # the resume replays from a keyframe before the end

    proc = _start(script, run_dir, "resume")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == [f"recording {killed_at}", "closed"]

    run = chisel.load(run_dir)
    assert len(run) == killed_at + module.RESUMED_STEPS
    starts = run.manifest["starts"]
    assert [(s["step"], s["resumed"]) for s in starts] == [(0, False), (killed_at, True)]
    assert killed_at in run.keyframes
    assert check_run(run, Reference(module)) == killed_at + module.RESUMED_STEPS
    assert not list(run_dir.glob("*/.tmp-*"))  # leftovers of the kill were cleared
