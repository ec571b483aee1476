"""`qsmlab --help` lists every command and each command's --help explains itself."""

import subprocess
import sys

import pytest

from qsmlab.cli import COMMANDS, build_parser, main


def test_every_command_is_wired():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: qsmlab {cmd}" in out and len(out) > 300  # options and an explanation, not a stub


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "qsmlab.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: qsmlab" in capsys.readouterr().out
