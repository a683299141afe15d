"""The README stays a five-minute read, keeps the two set-up commands CI and users copy, and every documented
command line (README and docs/*.md) still parses with the real ``persim-bench`` argument parser."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from persim_bench.cli import build_parser, parse_args

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
SETUP_COMMANDS = [
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && "
    "persim-bench run --grid smoke",
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    "pip install -c constraints.txt -e \".[test]\" && python -m pytest -q",
]
SEPARATORS = {"&&", "||", ";", "|", "--"}


def subcommands() -> set[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return set(actions[0].choices)


def commands_table_rows() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `persim-bench")]


def documented_invocations(page: Path) -> list[list[str]]:
    """Every ``persim-bench ...`` invocation in the page's bash blocks: continuation lines joined, comments
    dropped, and also those after ``&&``, ``;``, ``|`` or ``--`` (``ray job submit ... -- persim-bench run``)."""
    found = []
    for block in BASH_BLOCK.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            starts = [i + 1 for i, tok in enumerate(tokens) if tok in SEPARATORS] + [0]
            for start in sorted(starts):
                if start < len(tokens) and tokens[start] == "persim-bench":
                    end = next((j for j in range(start, len(tokens)) if tokens[j] in SEPARATORS - {"--"}),
                               len(tokens))
                    found.append(tokens[start + 1:end])
    return found


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("command", SETUP_COMMANDS)
def test_readme_keeps_the_setup_commands_byte_for_byte(command):
    assert f"```bash\n{command}\n```" in README.read_text()


def test_commands_table_names_every_subcommand_and_only_real_ones():
    named = [re.match(r"\| `persim-bench ([\w-]+)", row).group(1) for row in commands_table_rows()]
    assert named, "no `persim-bench <command>` rows in the README's Commands table"
    real = subcommands()
    assert set(named) <= real, f"not sub-commands of persim-bench: {sorted(set(named) - real)}"
    assert set(named) == real, f"sub-commands missing from the README's table: {sorted(real - set(named))}"
    assert len(named) == len(set(named)), "one row per sub-command"


def test_the_readme_and_every_docs_page_are_checked():
    invocations = {page.name: documented_invocations(page) for page in PAGES}
    assert ["run", "--grid", "smoke"] in invocations["README.md"]  # from the set-up command
    assert any("--storage" in argv for argv in invocations["cluster.md"])  # from `ray job submit ... --`


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_command_lines_parse(page, capsys):
    for argv in documented_invocations(page):
        try:
            parse_args(argv)
        except SystemExit as exit_:
            err = capsys.readouterr().err
            pytest.fail(f"{page.name}: `persim-bench {shlex.join(argv)}` does not parse (exit {exit_.code}): {err}")


YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)


def documented_grids(page: Path) -> list[str]:
    """The YAML blocks of a page that are whole grids (``extends:`` a shipped one), not a section's snippet."""
    return [block for block in YAML_BLOCK.findall(page.read_text()) if re.search(r"^extends:", block, re.M)]


@pytest.mark.parametrize("page", [p for p in PAGES if documented_grids(p)], ids=lambda p: p.name)
def test_documented_grids_load(page, tmp_path):
    """Every grid a page shows is a valid grid: the fields it names exist and their values pass validation."""
    from persim_bench.config import load_grid

    for i, block in enumerate(documented_grids(page)):
        path = tmp_path / f"grid{i}.yaml"
        path.write_text(block)
        assert load_grid(path).name, f"{page.name}: grid {i} has no name"
