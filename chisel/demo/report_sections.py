"""The TrashWorld demo's report sections, registered into chisel's report on import.

`chisel demo` names this module in demo.json ("report_sections"); the report imports it for such
a run (`chisel.report.scenario`) and every section here is limited to the runs naming it. On
those runs the demo's versions stand in for the generic summary (with the returns, concept
groups, blue-wall correlate and causal drops), credit (by reward event and advantage sign),
comparison summary and timelines; it adds the choice test ("Is this agent a reward optimizer?"),
counterfactual retraining, probe scores (noted when missing), the causal check and, in a
comparison, the concept groups side by side. Report order: summary, reward-optimizer, timeline,
validation, coverage, counterfactual, probes, circuits, credit, completeness, causal, missing.
"""

from __future__ import annotations

from chisel.demo import report_choice as RC
from chisel.demo import report_compare as RM
from chisel.demo import report_counterfactual as RF
from chisel.demo import report_credit as RD
from chisel.demo import report_summary as RS
from chisel.report import sections as S
from chisel.report.registry import (
    RunFacts,
    register_comparison_section,
    register_run_facts,
    register_section,
)
from chisel.report.scenario import for_scenario

ME = __name__
CURVES = (  # the training curve's columns drawn under the timeline (demo.json)
    ("mean_return", "mean return"),
    ("reward_trash", "reward: trash"),
    ("reward_button", "reward: button"),
)
mine = for_scenario(ME)


def _either(arts) -> bool:
    return any(mine(a) for a in arts)


def facts(art) -> RunFacts:
    d = art.demo or {}
    subtitle = [f"seed {d.get('seed', '?')}", f"button {d.get('button', '?')}"]
    if d.get("metric"):
        subtitle.append(f"metric: {d['metric']}")
    return RunFacts(
        tuple(subtitle), f"button {d['button']}" if "button" in d else "", CURVES,
        "log p(chosen action)",
    )


register_run_facts(facts, when=lambda art: mine(art) and bool(art.demo))
register_section("demo-summary", lambda i: RS.summary(i.art, i.summary), when=mine,
                 replaces="summary")
register_section("reward-optimizer", lambda i: RC.reward_optimizer_section(i.art), when=mine,
                 after="summary")
register_section("counterfactual", lambda i: RF.counterfactual_section(i.art, i.figs), when=mine,
                 after="coverage")
register_section("demo-probes", lambda i: S.probes_section(i.art, i.figs), when=mine,
                 replaces="probes")
register_section("demo-credit", lambda i: RD.credit_section(i.art, i.figs), when=mine,
                 replaces="credit")
register_section("causal", lambda i: RS.causal_section(i.art, i.summary), when=mine,
                 before="missing")
register_comparison_section("demo-summaries", RM.summaries_section, when=_either,
                            replaces="summaries")
register_comparison_section("groups", RM.groups_section, when=_either, after="timelines")
