"""`LMDemoConfig`: every knob of `chisel demo --lm`, frozen, validated, saved in lm_demo.json.

Two presets: the default run (a few minutes on a 2-core machine) and `--quick` (well under a
minute, for the tests and a first look). `LMDemoConfig.make(quick=...)` picks one; any field can
be overridden on top.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chisel.errors import ChiselError

SITE = "transformer.h.0:out"  # the residual stream after block 0 (where an SAE would live)
CREDIT_BY: tuple[str, ...] = ("reward", "marker_agrees", "advantage_sign")


class LMDemoConfigError(ChiselError, ValueError):
    """An `LMDemoConfig` field is out of range."""


@dataclass(frozen=True)
class LMDemoConfig:
    """What `chisel demo --lm` trains, probes, attributes and checks."""

    out: Path = Path("runs/demo_lm")
    """Run directory to write (replaced if it holds a run)."""
    seed: int = 0
    """Seeds the model, the prompts, the sampling, the probes and the SAE."""
    quick: bool = False
    """The small preset (set by `LMDemoConfig.make(quick=True)`)."""
    d_model: int = 32
    """Width of the residual stream."""
    layers: int = 2
    """Transformer blocks."""
    heads: int = 2
    """Attention heads per block."""
    completion_len: int = 1
    """Sampled tokens per completion; reward looks at the last one. With 1 the ending is
    chosen at the marker's own position (the marker is in the stream there; the cue must be
    fetched by attention): the shortcut a policy-gradient learner finds first."""
    steps: int = 120
    """GRPO updates (one optimizer step per generation batch)."""
    prompts_per_step: int = 16
    """Prompts per generation batch."""
    group_size: int = 8
    """Completions per prompt (GRPO's group: advantages are normalised within it)."""
    lr: float = 1e-3
    """Adam learning rate."""
    marker_agreement: float = 0.9
    """Training prompts whose marker names the rewarded ending (test prompts: 0.5)."""
    factors_every: int = 8
    """Per-sample factors on every this-many updates; credit runs on those."""
    attribute_every: int = 4
    """Geometry + integrated on every this-many updates (plus every update with factors)."""
    points: int = 8
    """Gauss-Legendre points along each update path."""
    horizon: int = 8
    """Earlier steps whose samples receive credit through Adam's momentum."""
    metric_prompts: int = 256
    """Held-out test prompts of the metric (marker independent of the cue)."""
    probe_prompts: int = 1024
    """Held-out test prompts the probes and the SAE are fitted on."""
    sae_latents: int = 8
    """Latents of the SAE trained on the stream at `SITE` (0: none)."""
    sae_steps: int = 2000
    """Adam steps of the SAE."""
    validation_permutations: int = 16
    """Sampled permutations (each with its reverse) of the Shapley values."""
    curve_every: int = 5
    """Test accuracy (agreeing / conflicting marker) on every this-many updates."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        for name in (
            "d_model", "layers", "heads", "completion_len", "steps", "prompts_per_step",
            "factors_every", "attribute_every", "points", "metric_prompts", "probe_prompts", "sae_steps",
            "validation_permutations", "curve_every",
        ):
            if getattr(self, name) < 1:
                raise LMDemoConfigError(
                    f"LMDemoConfig.{name}={getattr(self, name)!r}: must be >= 1."
                )
        if self.group_size < 2:
            raise LMDemoConfigError(
                f"LMDemoConfig.group_size={self.group_size}: GRPO needs >= 2 completions per "
                "prompt (advantages are centred within the group)."
            )
        if self.d_model % self.heads:
            raise LMDemoConfigError(
                f"LMDemoConfig.d_model={self.d_model} is not a multiple of heads={self.heads}."
            )
        if not 0.0 <= self.marker_agreement <= 1.0:
            raise LMDemoConfigError(
                f"LMDemoConfig.marker_agreement={self.marker_agreement}: a probability in [0, 1]."
            )
        if self.lr <= 0 or self.horizon < 0 or self.sae_latents < 0:
            raise LMDemoConfigError(
                f"LMDemoConfig: lr={self.lr} must be > 0, horizon={self.horizon} and "
                f"sae_latents={self.sae_latents} >= 0."
            )

    @property
    def length(self) -> int:
        """Tokens per sequence (prompt + completion)."""
        from chisel.demo_lm.task import PROMPT_LEN

        return PROMPT_LEN + self.completion_len

    @classmethod
    def make(cls, *, quick: bool = False, **overrides: Any) -> LMDemoConfig:
        """The default preset, or the quick one; `overrides` replace single fields."""
        preset = dict(QUICK) if quick else {}
        return cls(quick=quick, **{**preset, **overrides})

    def replace(self, **changes: Any) -> LMDemoConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out"] = str(self.out)
        return out


QUICK: dict[str, Any] = {
    "steps": 48,
    "factors_every": 8,
    "attribute_every": 8,
    "points": 4,
    "metric_prompts": 128,
    "probe_prompts": 512,
    "validation_permutations": 8,
    "sae_steps": 300,
}
