"""The README is the manual: every command and every option must be documented in it."""

from __future__ import annotations

import os
import re

import click
import pytest
from conftest import ROOT

from ckpt_tool.cli import COMMAND_MODULES, main

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def _manual(name: str) -> str:
    """The README, plus the command's own page under docs/commands/ where it has one."""
    page = os.path.join(ROOT, "docs", "commands", f"{name}.md")
    return README + (open(page, encoding="utf-8").read() if os.path.exists(page) else "")


def _command(name: str) -> click.Command:
    command = main.get_command(click.Context(main), name)
    assert command is not None
    return command


@pytest.mark.parametrize("name", sorted(COMMAND_MODULES))
def test_every_command_has_a_section_and_an_example(name):
    assert re.search(rf"^#{{1,2}} .*`ckpt {re.escape(name)}`", _manual(name), re.M), f"no README section for ckpt {name}"
    assert f"$ ckpt {name} " in _manual(name), f"no worked example of ckpt {name}"


@pytest.mark.parametrize("name", sorted(COMMAND_MODULES))
def test_every_option_is_documented(name):
    missing = [
        opt
        for param in _command(name).params
        if isinstance(param, click.Option)
        for opt in param.opts
        if opt.startswith("--") and opt != "--help" and not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", _manual(name))
    ]
    assert missing == [], f"ckpt {name}: options missing from README: {missing}"


def test_setup_commands_come_first():
    setup = README.split("## Set-up", 1)[1]
    block = setup.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block == ["pip install -e '.[test]'", "pytest"]
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "\npip install -e '.[test]'\n" in ci and "\npytest\n" in ci
