"""The count of the fuzz cases tried, with how they ended (the API's status codes, or
whether the core accepted or refused the input), printed at the end of every pytest run that
includes fuzz tests, ``make test`` too. A plugin of the root conftest, so that the controller
of a pytest-xdist run, which collects nothing, has the hooks that add up its workers' counts.
"""

from __future__ import annotations

from collections import Counter, defaultdict

# (group, name) -> cases tried; group is "api" (an operation and a mode) or "core".
CASES: Counter[tuple[str, str]] = Counter()
# (group, name) -> how the cases ended: HTTP status codes, or e.g. "ok" and "refused".
OUTCOMES: defaultdict[tuple[str, str], Counter[int | str]] = defaultdict(Counter)


def count(group: str, name: str, outcome: int | str | None = None) -> None:
    CASES[(group, name)] += 1
    if outcome is not None:
        OUTCOMES[(group, name)][outcome] += 1


def pytest_sessionfinish(session) -> None:
    """In a pytest-xdist worker: hand this worker's counts to the controller, which prints
    the table for the whole run (see ``pytest_testnodedown``)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fuzz_cases"] = [[group, name, n] for (group, name), n in CASES.items()]
        workeroutput["fuzz_outcomes"] = [
            [group, name, outcome, n]
            for (group, name), counter in OUTCOMES.items()
            for outcome, n in counter.items()
        ]


def pytest_testnodedown(node, error) -> None:
    """In the controller of an xdist run: add up the counts a worker handed over."""
    output = getattr(node, "workeroutput", {})
    for group, name, n in output.get("fuzz_cases", []):
        CASES[(group, name)] += n
    for group, name, outcome, n in output.get("fuzz_outcomes", []):
        OUTCOMES[(group, name)][outcome] += n


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
