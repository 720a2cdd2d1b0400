"""unwrap_optimizer: accelerate's and Lightning-style wrappers give their inner optimizer; an
optimizer that is itself hookable is kept; a real accelerate loop with gradient accumulation
records exactly its real steps when hooked through it."""

from __future__ import annotations

import pytest
import torch

import chisel
from chisel.errors import RecordConfigError
from chisel.integrations.optimizers import unwrap_optimizer
from tests.chisel.helpers import mlp, optimizer_hook_count, snapshot


class LightningLike:
    """Not an Optimizer: keeps the real one as `_optimizer` (like LightningOptimizer)."""

    def __init__(self, optimizer) -> None:
        self._optimizer = optimizer


class Lookahead(torch.optim.Optimizer):
    """A working optimizer that wraps another: its own step is the whole update."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_plain_wrapped_and_hookable_wrappers():
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    assert unwrap_optimizer(opt) is opt
    assert unwrap_optimizer(LightningLike(LightningLike(opt))) is opt
    look = Lookahead(opt)
    assert unwrap_optimizer(look) is look
    with pytest.raises(RecordConfigError, match="LightningLike → dict is not a torch optimizer"):
        unwrap_optimizer(LightningLike({}))


def test_accelerate_loop_with_accumulation_records_the_real_steps(tmp_path):
    import accelerate  # a dev dependency: CI runs this test
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = mlp()
        prepared_model, prepared = accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-2))
        assert type(prepared).__name__ == "AcceleratedOptimizer"
        inner = unwrap_optimizer(prepared)
        assert inner is prepared.optimizer
        initial, observed, before = snapshot(model), [], {}
        inner.register_step_pre_hook(lambda *_: before.update(snapshot(model)))
        inner.register_step_post_hook(lambda *_: observed.append(
            {n: p.detach().double() - before[n].double() for n, p in model.named_parameters()}))
        gen = torch.Generator().manual_seed(0)
        # the wrapper itself is accepted: chisel.record hooks the optimizer inside it
        with chisel.record(prepared_model, prepared, tmp_path / "run") as rec:
            for _ in range(6):  # 6 micro-batches, accumulated in pairs: 3 optimizer steps
                with accelerator.accumulate(prepared_model):
                    loss = prepared_model(torch.randn(8, 6, generator=gen)).pow(2).mean()
                    accelerator.backward(loss)
                    rec.tag(weight=torch.ones(8))
                    prepared.step()
                    prepared.zero_grad()
        run = chisel.load(tmp_path / "run")
        assert len(run) == len(observed) == 3
        assert all(torch.equal(run.params(0)[n], initial[n]) for n in initial)
        for t in range(3):
            assert all(torch.equal(run.update(t)[n], observed[t][n]) for n in initial)
            assert len(run.tags(t)["weight"]) == 16  # both micro-batches of the step
        assert optimizer_hook_count(inner) == 2  # the test's own; chisel's are gone
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
