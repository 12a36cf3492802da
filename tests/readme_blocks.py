"""The README's fenced code blocks, and how each is checked (`tests/test_readme.py`).

A block is run unless an HTML comment right above it says otherwise:

- `python`: run, in order, in one namespace (a block starting `# myapp/tools.py` is that
  module's file instead, importable by the others and by the pool's actors);
- `bash`: each line run by bash (a line that follows or waits, `--follow` or `BLOCK`, may
  still be running at its time-out);
- `<!-- readme-test: cloud ... -->` above a bash block: needs a cloud account; each
  `agentpool` and `ray` command in it is parsed by the real CLI instead;
- `<!-- readme-test: ci ... -->`: the set-up commands `.ci/run` itself runs;
- `text`: output or a diagram, shown not run (the simulator's directives are parsed).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"<!--\s*readme-test:\s*(\w+)")
MODULE_HEADER = re.compile(r"^#\s*([\w/]+\.py)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its language tag, its text, the README line it starts on, and the
    `readme-test` marker above it, if any."""

    lang: str
    code: str
    line: int
    marker: str | None

    @property
    def module_path(self) -> str | None:
        """`myapp/tools.py` for a block that is that file."""
        first = self.code.splitlines()[0] if self.code else ""
        match = MODULE_HEADER.match(first)
        return match.group(1) if match else None


def blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README, in order."""
    lines = (README.read_text() if text is None else text).splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opened = _FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        above = lines[i - 1] if i > 0 else ""
        marker = _MARKER.search(above)
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        code = "\n".join(lines[i + 1 : end])
        found.append(Block(opened.group(1), code, i + 1, marker.group(1) if marker else None))
        i = end + 1
    return found


def shell_lines(code: str) -> list[str]:
    """A bash block's command lines, comments and blank lines dropped."""
    out = []
    for raw in code.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def commands_in(line: str) -> list[list[str]]:
    """The commands of one shell line (split on `&&`, `|`, `;`), as words, with the
    commands quoted inside `ray exec ... '...'` too."""
    words = shlex.split(line, comments=True)
    commands: list[list[str]] = [[]]
    for word in words:
        if word in ("&&", "|", ";", "||"):
            commands.append([])
        else:
            commands[-1].append(word)
    out = [c for c in commands if c]
    for command in list(out):
        if command[:2] == ["ray", "exec"] and len(command) >= 4:
            out.extend(commands_in(command[3]))
    return out
