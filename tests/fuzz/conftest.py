"""Shared by the fuzz tests: how many examples to try (the count of the cases tried is
``tests/fuzz/cases.py``).

``FUZZ_EXAMPLES=N`` sets the number of generated examples per test (per operation and mode
for the API fuzz), e.g. ``FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/fuzz`` for a
long run.
"""

from __future__ import annotations

import os

from hypothesis import settings

# In CI (CI=true) the same cases every run, so a landing never depends on the draw; runs on a
# developer's machine draw new cases each time and find new bugs.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")


def examples(default: int) -> int:
    """Examples per test: ``default``, or FUZZ_EXAMPLES when set (for longer runs)."""
    value = os.environ.get("FUZZ_EXAMPLES", "").strip()
    return int(value) if value else default
