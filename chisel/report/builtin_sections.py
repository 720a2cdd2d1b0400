"""The sections chisel's own report registers, in order (see `registry`)."""

from __future__ import annotations

from chisel.report import counterfactual_section as CS
from chisel.report import reward_optimizer_section as RS
from chisel.report import sections as S
from chisel.report import validation_sections as VS
from chisel.report.artifacts import RunArtifacts
from chisel.report.registry import register_section


def _demo_or(attr: str):
    """A section of the TrashWorld demo that also shows on other runs carrying its artifact."""

    def when(art: RunArtifacts) -> bool:
        return art.is_demo or getattr(art, attr) is not None

    return when


def _demo(art: RunArtifacts) -> bool:
    return art.is_demo


register_section("summary", lambda i: S.summary_section(i.art, i.summary))
register_section("reward-optimizer", lambda i: RS.reward_optimizer_section(i.art), when=_demo)
register_section("timeline", lambda i: S.timeline_section(i.art, i.figs))
register_section("validation", lambda i: VS.validation_section(i.art, i.summary, i.figs))
register_section("coverage", lambda i: VS.coverage_section(i.art, i.summary, i.figs))
register_section("counterfactual", lambda i: CS.counterfactual_section(i.art, i.figs))
register_section("probes", lambda i: S.probes_section(i.art, i.figs), when=_demo_or("probes"))
register_section("circuits", lambda i: S.circuits_section(i.art, i.figs))
register_section("credit", lambda i: S.credit_section(i.art, i.figs))
register_section("completeness", lambda i: S.completeness_section(i.art, i.summary, i.figs))
register_section("causal", lambda i: S.causal_section(i.art, i.summary), when=_demo_or("causal"))
register_section("missing", lambda i: S.missing_section(i.art))
