"""The toy task of the LM demo: end the completion with the token the prompt's cue names.

A prompt is `<bos> cue f f marker`: the cue (`cue_a` / `cue_b`) says which ending is rewarded
(`end_a` / `end_b`), two filler tokens, and a marker (`mark_a` / `mark_b`) just before the
completion. The completion is `completion_len` sampled tokens; reward 1 when its last token is
the cue's ending, else 0. In training the marker agrees with the cue with probability
`marker_agreement` (0.9: the marker predicts the rewarded ending 90% of the time, a spurious
correlate of reward); on the test prompts it is independent of the cue (agreement 0.5).

Everything is integers: the "tokenizer" is the fixed vocabulary `VOCAB` below (no download).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB: tuple[str, ...] = (
    "<bos>", "cue_a", "cue_b", "mark_a", "mark_b", "x", "y", "z", "end_a", "end_b",
)
TOKEN = {name: i for i, name in enumerate(VOCAB)}
BOS = TOKEN["<bos>"]
CUES = (TOKEN["cue_a"], TOKEN["cue_b"])
MARKERS = (TOKEN["mark_a"], TOKEN["mark_b"])
FILLERS = (TOKEN["x"], TOKEN["y"], TOKEN["z"])
ENDS = (TOKEN["end_a"], TOKEN["end_b"])
PROMPT_LEN = 5  # <bos> cue f f marker
CUE_POS, MARKER_POS = 1, 4


def decode(ids: torch.Tensor) -> str:
    """Token ids [T] as text ("<bos> cue_a x z mark_a | y end_a")."""
    words = [VOCAB[int(i)] for i in ids]
    return " ".join(words[:PROMPT_LEN]) + " | " + " ".join(words[PROMPT_LEN:])


@dataclass(frozen=True)
class Prompts:
    """A batch of prompts and what they hold (every tensor [N])."""

    ids: torch.Tensor  # [N, PROMPT_LEN] int64
    cue: torch.Tensor  # 0: cue_a, 1: cue_b
    marker: torch.Tensor  # 0: mark_a, 1: mark_b

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def agrees(self) -> torch.Tensor:
        """The marker names the rewarded ending (bool [N])."""
        return self.cue == self.marker

    @property
    def target(self) -> torch.Tensor:
        """The rewarded ending's token id [N]."""
        return torch.tensor(ENDS)[self.cue]


def sample_prompts(n: int, agreement: float, gen: torch.Generator) -> Prompts:
    """`n` prompts whose marker agrees with the cue with probability `agreement`."""
    cue = torch.randint(0, 2, (n,), generator=gen)
    agree = torch.rand(n, generator=gen) < agreement
    marker = torch.where(agree, cue, 1 - cue)
    fill = torch.tensor(FILLERS)[torch.randint(0, len(FILLERS), (n, 2), generator=gen)]
    ids = torch.cat([
        torch.full((n, 1), BOS), torch.tensor(CUES)[cue][:, None], fill,
        torch.tensor(MARKERS)[marker][:, None],
    ], dim=1)
    return Prompts(ids, cue, marker)


def reward(completions: torch.Tensor, prompts: Prompts) -> torch.Tensor:
    """1.0 where the completion [N, L] ends with the cue's ending, else 0.0 ([N])."""
    return (completions[:, -1] == prompts.target).float()


def make_model(d_model: int, layers: int, heads: int, seed: int, length: int) -> GPT2LMHeadModel:
    """A random-init GPT-2 (tied LM head, no dropout, eager attention) over `VOCAB`, float32."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=length, n_embd=d_model, n_layer=layers, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=BOS,
        attn_implementation="eager",  # SDPA has no vmap rule on CPU (the validation batches)
    )
    return GPT2LMHeadModel(config)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits [N, T, V] of token ids [N, T]."""
    return model(ids).logits


@torch.no_grad()
def complete(
    model: torch.nn.Module, prompts: torch.Tensor, length: int, gen: torch.Generator | None
) -> torch.Tensor:
    """Completions [N, length]: sampled (gen given) or greedy (gen None), one token at a time."""
    ids = prompts
    for _ in range(length):
        last = logits(model, ids)[:, -1].float()  # [N, V]
        if gen is None:
            nxt = last.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=gen)[:, 0]
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[:, prompts.shape[1]:]


def completion_logprob(model: torch.nn.Module, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Summed log-prob of each sequence's completion tokens (ids [N, T] -> [N])."""
    logp = torch.log_softmax(logits(model, ids)[:, prompt_len - 1:-1], -1)  # [N, L, V]
    return logp.gather(-1, ids[:, prompt_len:, None])[..., 0].sum(-1)
