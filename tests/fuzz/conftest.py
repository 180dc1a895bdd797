"""Shared by the fuzz tests: how many examples to try, and a count of the cases tried (with
how they ended: the API's status codes, or whether the core accepted or refused the input)
printed at the end of every pytest run that includes them,
``make test`` too.

``FUZZ_EXAMPLES=N`` sets the number of generated examples per test (per operation and mode
for the API fuzz), e.g. ``FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/fuzz`` for a
long run.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

from hypothesis import settings

# In CI (CI=true) the same cases every run, so a landing never depends on the draw; runs on a
# developer's machine draw new cases each time and find new bugs.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")

# (group, name) -> cases tried; group is "api" (an operation and a mode) or "core".
CASES: Counter[tuple[str, str]] = Counter()
# (group, name) -> how the cases ended: HTTP status codes, or e.g. "ok" and "refused".
OUTCOMES: defaultdict[tuple[str, str], Counter[int | str]] = defaultdict(Counter)


def examples(default: int) -> int:
    """Examples per test: ``default``, or FUZZ_EXAMPLES when set (for longer runs)."""
    value = os.environ.get("FUZZ_EXAMPLES", "").strip()
    return int(value) if value else default


def count(group: str, name: str, outcome: int | str | None = None) -> None:
    CASES[(group, name)] += 1
    if outcome is not None:
        OUTCOMES[(group, name)][outcome] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not CASES:
        return
    writer = terminalreporter
    writer.section("fuzz cases tried")
    for group in sorted({group for group, _ in CASES}):
        names = sorted(name for g, name in CASES if g == group)
        width = max(len(name) for name in names)
        for name in names:
            line = f"{group:4}  {name:<{width}}  {CASES[group, name]:6}"
            outcomes = sorted(OUTCOMES.get((group, name), {}).items(), key=str)
            if outcomes:
                line += "  (" + ", ".join(f"{key}: {n}" for key, n in outcomes) + ")"
            writer.write_line(line)
        total = sum(n for (g, _), n in CASES.items() if g == group)
        writer.write_line(f"{group:4}  {'total':<{width}}  {total:6}")
    writer.write_line(f"all cases: {sum(CASES.values())} (FUZZ_EXAMPLES=N sets examples per test)")
