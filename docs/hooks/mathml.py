"""mkdocs hook: `$…$` and `$$…$$` in the docs become MathML when the site is built.

Browsers draw MathML themselves, so the site shows formulas with no script and nothing fetched
from the network. latex2mathml does the conversion; this file only finds the formulas (after code
spans, so `$` inside backticks stays code).
"""

from __future__ import annotations

import re

from latex2mathml.converter import convert
from markdown import Extension, Markdown
from markdown.inlinepatterns import InlineProcessor

# $$…$$ (display) or $…$ (inline); an inline formula neither starts nor ends with a space and is
# not followed by a digit, so "costs $5 and $6" is left alone
_DISPLAY = r"\$\$(.+?)\$\$"
_INLINE = r"(?<![\\$])\$(?=\S)(.+?)(?<=\S)\$(?![\d$])"


class _Math(InlineProcessor):
    def __init__(self, pattern: str, md: Markdown, display: str) -> None:
        super().__init__(pattern, md)
        self.display = display

    def handleMatch(self, m: re.Match, data: str) -> tuple[str, int, int]:
        html = convert(m.group(1).strip(), display=self.display)
        return self.md.htmlStash.store(html), m.start(0), m.end(0)


class MathMLExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:
        # backticks are priority 190: code spans are taken first
        md.inlinePatterns.register(_Math(_DISPLAY, md, "block"), "mathml_display", 186)
        md.inlinePatterns.register(_Math(_INLINE, md, "inline"), "mathml_inline", 185)


def on_config(config):
    config.markdown_extensions.append(MathMLExtension())
    return config


