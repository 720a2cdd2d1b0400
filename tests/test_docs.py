"""The documentation site builds in strict mode, and the quickstart's code runs as written."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"(<!-- skip[^>]*-->\s*\n)?```python\n(.*?)\n```", re.DOTALL)


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a page, in order; a block right after `<!-- skip … -->` is left out."""
    return [code for skip, code in FENCE.findall(page.read_text(encoding="utf-8")) if not skip]


def nav_pages() -> list[str]:
    """The Markdown files of mkdocs.yml's nav, in order."""
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    return [next(iter(item.values())) for item in config["nav"]]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built in strict mode (any warning fails the build)."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_mkdocs_build_strict(site):
    for page in nav_pages():
        name = page.removesuffix(".md")
        html = site / ("index.html" if name == "index" else f"{name}/index.html")
        assert html.is_file(), f"{page} did not become a page"
    # nothing may be fetched from the network when the site is opened
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        assert not re.search(r"<script[^>]+src=\"https?://", text), html
        assert not re.search(r"<link[^>]+href=\"https?://", text), html
    assert not (site / "hooks").exists()  # the build's own hooks are not published


def test_api_reference_documents_every_public_name(site):
    import chisel
    import probes

    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = []
    for package in (chisel, probes):
        for name in package.__all__:
            if name.startswith("__"):
                continue
            obj = getattr(package, name)
            path = obj.__name__ if inspect.ismodule(obj) else f"{obj.__module__}.{obj.__name__}"
            # mkdocstrings gives each documented object an anchor named by its path
            if f'id="{path}"' not in html:
                missing.append(f"{package.__name__}.{name} ({path})")
    assert missing == []
    # a docstring's own words are on the page (the reference is generated, not a list of names)
    assert "Record every update of" in html


# pages whose formulas are written as mathematics ($…$), with at least this many formulas
MATH_PAGES = {"attribution": 10, "concepts": 150, "online-ledger": 20}


@pytest.mark.parametrize("page", sorted(MATH_PAGES))
def test_formulas_become_mathml_and_code_stays_code(site, page):
    html = (site / page / "index.html").read_text(encoding="utf-8")
    assert html.count("<math ") >= MATH_PAGES[page] and "merror" not in html
    text = re.sub(r"<code>.*?</code>|<math .*?</math>", "", html, flags=re.S)
    assert "$" not in text and not re.search(r"\\(langle|theta|sum|bar|frac|text)\b", text)
    assert "<mi>Δ</mi>" in html or "<mi>&#x00394;</mi>" in html
    # formulas are no longer written as code spans: no Greek-letter maths inside <code>
    assert not re.findall(r"<code>[^<]*[ΔθḡΣ⟨ᵀ∫][^<]*</code>", html)


def test_every_nav_page_exists_and_index_links_them():
    pages = nav_pages()
    assert pages[0] == "index.md" and "quickstart.md" in pages and "cli.md" in pages
    for page in pages:
        assert (DOCS / page).is_file(), page
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in pages:
        if page != "index.md":
            assert f"({page})" in index, f"index.md does not link {page}"


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    blocks = python_blocks(DOCS / "quickstart.md")
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__quickstart__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/quickstart.md[block {i}]", "exec"), namespace)

    run, ledger, credit = namespace["run"], namespace["ledger"], namespace["credit"]
    assert (tmp_path / "runs" / "bandit" / "manifest.json").is_file()
    assert len(run) == 60 and len(run.steps) == 60

    whole = ledger[(ledger.family == "integrated") & (ledger.param == "")]
    errors = whole[whole.quantity == "completeness_error"]["value"].abs()
    assert len(errors) == 60 and errors.max() < 1e-8

    # the known answer of the bandit: reinforcement went through the cue, not the distractor
    final = namespace["reinforced"].iloc[-1]
    assert final["cue"] > 0 and final["cue"] > 5 * abs(final["distractor"]), final
    assert namespace["circuits"].iloc[-1]["cue_probe→arm[1]"] > 0

    # credit closes on the integrated family's total, step by step
    totals = whole[whole.quantity == "attribution_total"].set_index("step")["value"]
    per_step = credit[credit.feature == ""].groupby("step")["value"].sum()
    assert list(per_step.index) == list(range(55, 60))
    assert (per_step - totals.loc[55:59]).abs().max() < 1e-10
    # and momentum hands part of it to the samples of earlier steps, with their tags
    momentum = credit[(credit.part == "momentum") & credit["sample"].notna()]
    assert len(momentum) and (momentum.origin_step < momentum.step).all()
    assert momentum["tag/reward"].notna().all()
