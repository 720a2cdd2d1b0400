"""Stage 1: GRPO on the toy task inside `chisel.record`, tagging every completion.

Each update: `prompts_per_step` training prompts, `group_size` sampled completions each, reward
1 for the cue's ending; the advantage is the reward centred and scaled within its group
(GRPO: (r − mean_group) / (std_group + 1e-4)), the loss −mean(A · log π(completion)). One
optimizer step per generation batch (on-policy, so no ratio clipping is needed).

Tags, one value per completion: reward, advantage, advantage_sign (+1 / 0 / −1), marker_agrees
(1: the prompt's marker names the rewarded ending), cue, group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import chisel
from chisel.demo_lm import task as T
from chisel.demo_lm.config import LMDemoConfig

TEST_AGREEMENT = 0.5  # test prompts: the marker is independent of the cue
CURVE_PROMPTS = 256


@dataclass
class Trained:
    model: torch.nn.Module
    curve: list[dict]  # per curve point: update, train reward, test accuracies


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO's advantage: reward centred and scaled within each group of `group_size` ([N])."""
    r = rewards.reshape(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, prompts: T.Prompts, completion_len: int) -> dict:
    """Greedy completions on test prompts: reward rate where the marker agrees with the cue and
    where it conflicts, and how often a conflicting prompt's completion follows the marker."""
    ends = T.complete(model, prompts.ids, completion_len, None)[:, -1]
    right = ends == prompts.target
    follows = ends == torch.tensor(T.ENDS)[prompts.marker]
    agree = prompts.agrees
    return {
        "accuracy_agree": float(right[agree].float().mean()),
        "accuracy_conflict": float(right[~agree].float().mean()),
        "follows_marker_conflict": float(follows[~agree].float().mean()),
    }


def train_recorded(cfg: LMDemoConfig) -> Trained:
    """Train inside `chisel.record` (float64, factors of every Linear / Conv1D)."""
    model = T.make_model(cfg.d_model, cfg.layers, cfg.heads, cfg.seed, cfg.length).double()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    test = T.sample_prompts(CURVE_PROMPTS, TEST_AGREEMENT, torch.Generator().manual_seed(cfg.seed + 7))
    curve: list[dict] = []
    meta = {"lm_demo": cfg.to_json(), "vocab": list(T.VOCAB)}
    with chisel.record(
        model, opt, cfg.out, factors=True, factors_every=cfg.factors_every, overwrite=True,
        metadata=meta, dtype="float64",
    ) as rec:
        for step in range(cfg.steps):
            prompts = T.sample_prompts(cfg.prompts_per_step, cfg.marker_agreement, gen)
            ids = prompts.ids.repeat_interleave(cfg.group_size, 0)  # [P*G, PROMPT_LEN]
            batch = T.Prompts(ids, prompts.cue.repeat_interleave(cfg.group_size),
                              prompts.marker.repeat_interleave(cfg.group_size))
            comp = T.complete(model, ids, cfg.completion_len, gen)
            r = T.reward(comp, batch)
            adv = group_advantages(r, cfg.group_size)
            seqs = torch.cat([ids, comp], 1)  # [P*G, length]
            loss = -(adv.double() * T.completion_logprob(model, seqs, T.PROMPT_LEN)).mean()
            loss.backward()
            rec.tag(
                reward=r, advantage=adv, advantage_sign=torch.sign(adv),
                marker_agrees=batch.agrees.float(), cue=batch.cue.float(),
                group=(step * cfg.prompts_per_step + torch.arange(len(r)) // cfg.group_size).float(),
            )
            opt.step()
            opt.zero_grad()
            if step % cfg.curve_every == 0 or step == cfg.steps - 1:
                point = {"update": step, "train_reward": float(r.mean())}
                point.update(test_accuracy(model, test, cfg.completion_len))
                curve.append(point)
    return Trained(model, curve)
