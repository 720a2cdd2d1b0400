"""Stage 2: name computations in the residual stream after block 0 (`SITE`).

Two linear probes fitted on the final model at the position that picks the ending (the last
prompt token, for one-token completions), on held-out test prompts where cue and marker are
independent (so the two concepts can be told apart; in training they agree 90% of the time):
- "cue_b@<site>": the task concept, which ending the cue asks for;
- "marker_b@<site>": the spurious correlate, which ending the marker names.
Then the live latents of a small ReLU SAE trained in-process on the same activations
(`probes.train_sae`, on what the probes leave unexplained, as the TrashWorld demo does), each
labelled by `probes.label_latents` with the concept it matches best.
"""

from __future__ import annotations

import dataclasses

import torch

import probes
from chisel.demo_lm import task as T
from chisel.demo_lm.config import SITE

TASK, SPURIOUS = "cue_b", "marker_b"


def feature_name(concept: str, site: str = SITE) -> str:
    return f"{concept}@{site}"


def concept_labels(prompts: T.Prompts) -> dict[str, torch.Tensor]:
    """{concept: 0/1 label [N]} of the prompts."""
    return {TASK: prompts.cue.clone(), SPURIOUS: prompts.marker.clone()}


def stream(model: torch.nn.Module, ids: torch.Tensor, site: str = SITE) -> torch.Tensor:
    """The activation [N, d] at `site`, last position (where the ending is chosen)."""
    return probes.capture(model, ids, [site], positions=-1)[site]


def dictionary(
    acts: torch.Tensor, latents: int, labels: dict[str, torch.Tensor], seed: int,
    named: torch.Tensor, steps: int,
) -> probes.FeatureSet:
    """The live latents of an SAE trained on `acts` [N, d] with the probes' read vectors
    `named` [F, d] projected out (so the latents add directions instead of repeating the
    probes, as `chisel.demo.features.dictionary` explains), each labelled by its best concept."""
    d = named.double() / named.double().norm(dim=1, keepdim=True)
    keep = torch.eye(acts.shape[1], dtype=torch.float64) - d.T @ torch.linalg.pinv(d @ d.T) @ d
    residual = (acts.double() @ keep).to(acts.dtype)  # x (I − P), [N, d]
    sae = probes.train_sae(residual, latents, site=SITE, name="sae", seed=seed, steps=steps)
    found = probes.label_latents(sae.features(), residual, labels)
    return probes.FeatureSet([
        dataclasses.replace(f, read=(keep @ f.read.double()).to(f.read.dtype)) for f in found
    ])


def build_features(
    model: torch.nn.Module, data: T.Prompts, seed: int, *, sae_latents: int, sae_steps: int
) -> tuple[probes.FeatureSet, dict]:
    """The probes, then the SAE's live latents; and a summary (probe accuracy, SAE stats)."""
    acts = stream(model, data.ids)  # [N, d]
    labels = concept_labels(data)
    feats = [
        probes.fit_probe(acts, labels[c], concept=c, name=feature_name(c), site=SITE, seed=seed)
        for c in (TASK, SPURIOUS)
    ]
    info: dict = {
        "probe_accuracy": {
            f.name: float(f.metadata["accuracy"]) for f in feats
        },
        "cosine_task_spurious": float(
            torch.nn.functional.cosine_similarity(feats[0].read.double(), feats[1].read.double(), 0)
        ),
    }
    if sae_latents:
        named = torch.stack([f.read for f in feats])
        latents = dictionary(acts, sae_latents, labels, seed, named, sae_steps)
        feats.extend(latents)
        info["sae_latents"] = {
            f.name: str(f.metadata.get("concept", "unlabelled")) for f in latents
        }
    return probes.FeatureSet(feats), info
