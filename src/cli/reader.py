"""Reading user input for the CLI: one message per line, or several lines when asked.

- A line ending in a backslash continues on the next line.
- A line that is just three double quotes starts a block that ends at the next such line.
"""

from __future__ import annotations

from collections.abc import Callable

BLOCK_MARK = '"""'


def read_message(read_line: Callable[[str], str], prompt: str, more_prompt: str) -> str:
    """Read one message; raises EOFError at end of input (Ctrl-D)."""
    first = read_line(prompt)
    if first.strip() == BLOCK_MARK:
        lines = []
        while (line := read_line(more_prompt)).strip() != BLOCK_MARK:
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(read_line(more_prompt))
        except EOFError:
            break
    return "\n".join(lines)
