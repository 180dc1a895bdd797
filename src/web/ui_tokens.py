"""A learner's view of sampling: each token of a reply, shaded by how likely the model found
it, with the likeliest alternatives in its tooltip (the web UI's "Show token probabilities")."""

from __future__ import annotations

import html
import math

from src.chat.deltas import TokenInfo

TOP_ALTERNATIVES = 5  # shown in each token's tooltip


def probability(logprob: float | None) -> float:
    return 1.0 if logprob is None else math.exp(logprob)


def tokens_html(tokens: list[TokenInfo]) -> str:
    """One ``<span>`` per token: darker means less likely; the tooltip lists the token's
    probability and the alternatives the model weighed."""
    if not tokens:
        return ""
    spans = []
    for token in tokens:
        chance = probability(token.logprob)
        alternatives = " · ".join(
            f"{text!r} {probability(logprob):.1%}" for text, _, logprob in token.top
        )
        tooltip = f"{token.token!r}: {chance:.1%}" + (f" | {alternatives}" if alternatives else "")
        # Unlikely tokens get a strong orange; near-certain ones stay almost white.
        shade = f"rgba(255, 140, 0, {0.1 + 0.8 * (1 - chance):.2f})"
        text = html.escape(token.token).replace("\n", "↵<br>")
        spans.append(
            f'<span class="token" title="{html.escape(tooltip)}" '
            f'style="background:{shade};border-radius:3px;padding:0 1px">{text}</span>'
        )
    legend = (
        "<p><small>Each token of the last reply, shaded by how unlikely the model found it "
        "(darker = less likely; the model's own probabilities, before temperature and the "
        "other sampling settings). Hover over a token for its alternatives.</small></p>"
    )
    return f'{legend}<div id="token-view" style="line-height:1.9">{"".join(spans)}</div>'
