"""Every code block of the README is run or, where it needs a cloud, parsed by the real CLI,
so that none of them can go stale (see `tests/readme_blocks.py` for the rules)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from typer.testing import CliRunner

from agentpool.cli import app
from agentpool.simulator.script import parse_directives
from tests.readme_blocks import README, blocks, commands_in, shell_lines
from tests.scenarios import run_scenario

SCENARIOS = [("tests.readme_scenario",)]

ROOT = README.parent
_KINDS = {("python", None), ("bash", None), ("bash", "cloud"), ("bash", "ci"), ("text", None)}


def _parse_agentpool(words: list[str]) -> None:
    """Parses `agentpool ...` with the real command line without running it (`--help` last:
    an unknown command or option still fails first)."""
    done = CliRunner().invoke(app, [*words[1:], "--help"])
    assert done.exit_code == 0, f"`{' '.join(words)}`: {done.output[-1000:]}"


def _parse_ray(words: list[str]) -> None:
    from ray.scripts.scripts import cli

    command: click.Command = cli
    rest = list(words[1:])
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"`ray {' '.join(words[1:])}`: no such command {rest[0]!r}"
        command, rest = sub, rest[1:]


def test_every_block_is_of_a_kind_the_test_knows() -> None:
    found = blocks()
    assert len(found) >= 15
    for block in found:
        assert (block.lang, block.marker) in _KINDS, f"README line {block.line}: {block.lang!r} {block.marker!r}"


def test_the_cloud_blocks_commands_exist() -> None:
    checked = 0
    for block in blocks():
        if block.marker not in ("cloud", "ci"):
            continue
        for line in shell_lines(block.code):
            for words in commands_in(line):
                program = Path(words[0]).name
                if program == "agentpool":
                    _parse_agentpool(words)
                    checked += 1
                elif program == "ray":
                    _parse_ray(words)
                    checked += 1
    assert checked >= 5


def test_the_setup_block_is_what_ci_runs() -> None:
    (setup,) = [b for b in blocks() if b.marker == "ci"]
    lines = shell_lines(setup.code)
    assert lines[1] in (ROOT / ".ci" / "run").read_text().splitlines()  # the test command, verbatim
    assert lines[0].startswith(lines[1].split(" && .venv/bin/python")[0])  # the same set-up for the demo


def test_the_simulator_directives_parse() -> None:
    (block,) = [b for b in blocks() if b.lang == "text" and b.code.startswith("sim: ")]
    fill = {"<name>": "calculator", "<json args>": "{}", "<text>": "hello", "<status>": "529", "<base64>": "aGk="}
    fill |= {"<fraction>": "0.2", "<regex>": "ok"}
    for raw in block.code.splitlines():
        directive = raw.split("  ")[0].strip()
        for placeholder, value in fill.items():
            directive = directive.replace(placeholder, value)
        directive = re.sub(r"<\w+>", "5", re.sub(r"\s*\[[^]]*\]", "", directive))
        parse_directives(directive)  # raises DirectiveError for a directive that is not (or no longer) there


@pytest.mark.timeout(600)
def test_the_python_and_bash_blocks_run() -> None:
    report = run_scenario("tests.readme_scenario", timeout_s=500)
    ran = {int(line) for line in report}
    expected = {
        b.line for b in blocks() if (b.lang == "python" and not b.module_path) or (b.lang, b.marker) == ("bash", None)
    }
    assert ran == expected
    failed = {line: problem for line, problem in report.items() if problem is not None}
    assert not failed, "\n\n".join(f"README line {line}:\n{problem}" for line, problem in failed.items())
