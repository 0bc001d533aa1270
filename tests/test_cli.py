"""What `quantbench --help` and `--version` tell a new user, and the help of every argument."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from runner import cli

COMMANDS = ("run", "validate", "collect", "report")


def help_text(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        cli.main([*args, "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def test_help_lists_each_command_on_one_line_the_exit_codes_and_the_docs(capsys):
    out = help_text(capsys)
    lines = out.splitlines()
    for command in COMMANDS:
        (line,) = [line for line in lines if line.split()[:1] == [command]]
        assert len(line.split()) > 2, line  # the command, then what it does
    for code in ("0", "1", "2", "130", "141"):
        assert any(line.split()[:1] == [code] for line in lines), code
    for doc in ("docs/commands.md", "docs/job-file.md", "docs/results.md", "docs/report.md"):
        assert doc in out and (REPO / doc).is_file()


def test_version_prints_the_installed_package_s_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out == f"quantbench {version('quantbench')}\n"


def test_version_works_as_a_command_a_user_types():
    done = subprocess.run(
        [sys.executable, "-m", "runner.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("quantbench "), done.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_positional_argument_has_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # each help on one line, whatever the terminal
    commands = _subparsers(cli._parser())
    assert set(commands) == set(COMMANDS)
    for name, parser in commands.items():
        positionals = [a for a in parser._actions if not a.option_strings]
        assert positionals, name
        for action in positionals:
            assert action.help, f"quantbench {name}: {action.dest} has no help"
            assert action.help in help_text(capsys, name)


def test_a_command_without_arguments_still_exits_2(capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["collect"])
    assert stopped.value.code == cli.EXIT_USAGE
    code, _, err = run_cli(capsys, "collect", tmp_path / "missing")
    assert code == cli.EXIT_USAGE and "no such folder" in err
