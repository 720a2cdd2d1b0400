"""One forward call of a factor module, paired with its output-gradient, and the search that
gives a broadcast position embedding each sample's own gradient."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from chisel.capture.factor_kinds import NormSpec, norm_sums

_SEARCH_NODES = 64  # autograd nodes searched backwards for a broadcast embedding's consumer


@dataclass
class Call:
    """One forward call: its factor input, and its output-gradient once backward reaches it.

    Norms keep their input until backward, then store (Σ g ⊙ x̂, Σ g) per sample; an embedding
    whose ids are broadcast over the batch (a position embedding) gets its per-sample gradient
    from the broadcasting add (`full`)."""

    x: torch.Tensor
    user_owned: bool  # the input is a tensor of the user's (no grad_fn), which may be reused
    g: torch.Tensor | None = None
    spec: NormSpec | None = None
    src: torch.Tensor | None = None  # a norm's input
    pad: int | None = None  # an embedding's padding_idx
    full: torch.Tensor | None = None
    handles: list[Any] = field(default_factory=list)

    def set_grad(self, grad: torch.Tensor) -> None:
        # a tensor hook must return None, or it would replace the gradient
        grad = grad.detach()
        if self.spec is not None:
            self.x, self.g = norm_sums(self.spec, self.src, grad)
            return
        if self._splits(grad):  # the batch's rows, which sum to this broadcast's gradient
            grad, self.x = self.full, self.x.expand(self.full.shape[0], *self.x.shape[1:])
        if self.pad is not None:
            grad = grad.masked_fill(self.x == self.pad, 0.0)
        self.g = grad

    def _splits(self, grad: torch.Tensor) -> bool:
        full = self.full
        if full is None or full.shape[1:] != grad.shape[1:]:
            return False
        atol = 1e-6 * float(grad.abs().max()) if grad.numel() else 0.0
        return torch.allclose(full.sum(0, keepdim=True), grad, rtol=1e-5, atol=atol)

    def catch_full(self, grad_outputs: tuple) -> None:
        self.full = grad_outputs[0].detach() if grad_outputs and grad_outputs[0] is not None else None


def catch_broadcasts(inputs: tuple, targets: dict[int, Call]) -> None:
    """Find the add that broadcasts a batch-1 embedding output over the batch (GPT-2's
    `inputs_embeds + position_embeds`), searching back from a later module's input, and catch
    the unreduced gradient there: each sample's own gradient of the embedding.

    targets: {id(embedding output's grad_fn): its call}; a target found is popped (caught if
    its consumer is a plain add, else left with its batch-summed gradient).
    """
    queue = deque(t.grad_fn for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn is not None)
    seen: set[int] = set()
    while queue and len(seen) < _SEARCH_NODES and targets:
        node = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            call = targets.pop(id(nxt), None)
            if call is not None and node.name() == "AddBackward0" and getattr(node, "_saved_alpha", 1) == 1:
                call.handles.append(node.register_prehook(call.catch_full))
            queue.append(nxt)
