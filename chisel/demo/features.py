"""Name the agent's computations: probe scores over training, and the FeatureSet to attribute.

Features are linear probes fitted on the final agent (one per concept at each actor input
site, named "<concept>@<site>") plus one unit per action at the logits ("<action>@hook_logits"),
so geometry rows read as circuits "trash_adjacent@hook_pi_hidden2→pick_up@hook_logits".
After them come the latents of a small sparse dictionary (a ReLU SAE, `probes.train_sae`)
trained on the same probe states at each actor input site, named "sae<i>@<site>" and labelled
by `probes.label_latents` with the concept they correlate with best (metadata["concept"], or
"unlabelled"); latents never active on those states are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pandas as pd
import torch

import probes
from chisel.agents.ppo import TrashAgent
from chisel.demo.config import ACTION_SITE, ACTOR_INPUT_SITES
from chisel.demo.data import Rollout
from chisel.envs import ACTION_NAMES
from chisel.store.reader import Run

SAE_NAME = "sae"  # latents are named "sae<i>@<site>"


def feature_name(concept: str, site: str) -> str:
    return f"{concept}@{site}"


def checkpoint_steps(run: Run, count: int) -> list[int]:
    """`count` evenly spaced steps from 0 to len(run) inclusive (θ before each; the last is final)."""
    n = len(run)
    return sorted({round(i * n / (count - 1)) for i in range(count)})


def probe_table(
    agent: TrashAgent, run: Run, data: Rollout, sites: Sequence[str], checkpoints: int, seed: int
) -> pd.DataFrame:
    """Held-out probe score per (checkpoint step, site, concept): probes.parquet's rows."""
    labels = {c: data.labels[c] for c in data.usable_concepts()}
    states = [(t, _state_dict(agent, run.params(t))) for t in checkpoint_steps(run, checkpoints)]
    return probes.probe_over_training(agent, states, data.obs, labels, list(sites), seed=seed)


def _state_dict(agent: TrashAgent, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The run's θ as a full state_dict of `agent` (dtype of the agent's own tensors)."""
    own = agent.state_dict()
    return {k: params[k].to(v.dtype) if k in params else v for k, v in own.items()}


def build_features(
    agent: TrashAgent,
    data: Rollout,
    seed: int,
    sites: Sequence[str] = ACTOR_INPUT_SITES,
    *,
    dictionary_latents: int = 0,
) -> probes.FeatureSet:
    """Probes of every usable concept at every actor input site, the action units, then
    `dictionary_latents` SAE latents per site (0: none)."""
    concepts = data.usable_concepts()
    acts = probes.capture(agent, data.obs, list(sites))
    feats: list[probes.Feature] = []
    for site in sites:
        for concept in concepts:
            feats.append(
                probes.fit_probe(
                    acts[site],
                    data.labels[concept],
                    concept=concept,
                    name=feature_name(concept, site),
                    site=site,
                    seed=seed,
                )
            )
    units = probes.neurons(ACTION_SITE, range(len(ACTION_NAMES)), dim=len(ACTION_NAMES))
    for unit, action in zip(units, ACTION_NAMES, strict=True):
        meta = {**unit.metadata, "concept": action}
        feats.append(
            dataclasses.replace(unit, name=feature_name(action, ACTION_SITE), metadata=meta)
        )
    if dictionary_latents:
        labels = {c: data.labels[c] for c in concepts}
        for site in sites:
            named = torch.stack([f.read for f in feats if f.site == site])
            feats.extend(dictionary(acts[site], site, dictionary_latents, labels, seed, named))
    return probes.FeatureSet(feats)


def dictionary(
    acts: torch.Tensor,
    site: str,
    latents: int,
    labels: dict[str, torch.Tensor],
    seed: int,
    named: torch.Tensor | None = None,
) -> probes.FeatureSet:
    """The live latents of an SAE trained on `acts` [N, d], each labelled by its best concept.

    named: read vectors [F, d] of the probes at the site. The SAE is then trained on what they
    leave unexplained (the activations with their span projected out) and its read vectors are
    kept in the complement, so the dictionary adds directions instead of repeating the probes:
    nearly collinear read vectors make the pathway split ill-conditioned (large, opposing
    pathways that only cancel together), which the validation's reversion game then shows as
    interactions. Codes, and so the labels, are those of the projected activations.
    """
    keep = torch.eye(acts.shape[1], dtype=torch.float64)
    if named is not None and len(named):
        d = named.double() / named.double().norm(dim=1, keepdim=True)
        keep = keep - d.T @ torch.linalg.pinv(d @ d.T) @ d  # I − P, [d, d]
    residual = (acts.double() @ keep).to(acts.dtype)  # P symmetric: x(I − P)
    sae = probes.train_sae(residual, latents, site=site, name=SAE_NAME, seed=seed)
    latents_ = probes.label_latents(sae.features(), residual, labels)
    return probes.FeatureSet([
        dataclasses.replace(f, read=(keep @ f.read.double()).to(f.read.dtype)) for f in latents_
    ])


def feature_concepts(features: probes.FeatureSet) -> dict[str, str]:
    """{feature name: concept} for demo.json (action units map to their action's name)."""
    return {f.name: str(f.metadata.get("concept", f.name.split("@")[0])) for f in features}
