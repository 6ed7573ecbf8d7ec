"""The documentation cannot drift from the code: its examples run, its generated pages are current,
every command and option is documented, and the site builds.

Regenerate after a change in output: ``python docs/examples.py --update`` (see docs/contributing.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import click
import pytest
from conftest import ROOT

from ckpt_tool.cli import COMMAND_MODULES, main

sys.path.insert(0, os.path.join(ROOT, "docs"))
import examples  # noqa: E402  (docs/examples.py)

PAGES = examples.pages()
# the page documenting each command; convert shares migrate's
PAGE_OF = {
    name: os.path.join(ROOT, "docs", "commands", ("migrate" if name == "convert" else name) + ".md")
    for name in COMMAND_MODULES
}
INTERACTIVE = {"browse"}  # a terminal UI: documented with screenshots, not runnable examples


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _command(name: str) -> click.Command:
    command = main.get_command(click.Context(main), name)
    assert command is not None
    return command


def _options(name: str) -> set[str]:
    return {
        opt
        for p in _command(name).params
        if isinstance(p, click.Option)
        for opt in p.opts
        if opt.startswith("--") and opt != "--help"
    }


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_examples_print_what_the_page_says(page, example_inputs):
    problems = examples.stray_examples(page) + examples.check_page(page, example_inputs)
    assert problems == [], "\n\n".join(problems) + "\n\n(python docs/examples.py --update rewrites the pages)"


def test_example_checker_catches_a_wrong_output(tmp_path, example_inputs):
    page = tmp_path / "page.md"
    page.write_text(
        "```console\n$ ckpt inspect fixtures/tiny_cnn.pth --filter fc2.bias\nformat  pickle\n```\n"
        "$ ckpt scan outside-a-block\n"
    )
    problems = examples.check_page(str(page), example_inputs)
    assert len(problems) == 1 and "prints something else" in problems[0]
    assert len(examples.stray_examples(str(page))) == 1


def test_masking_hides_only_run_to_run_noise():
    page = "throughput  INFO  1352.3 images/s\npeak memory  INFO  RSS 691.5 MB"
    run = "throughput  INFO  99.0 images/s\npeak memory  INFO  RSS 1.2 GB"
    assert examples.masked(page) == examples.masked(run)
    assert examples.masked("loss 1.4530 -> 0.9705") != examples.masked("loss 1.4530 -> 0.9706")
    table = "phase  lr     epoch mean loss  images/s\n-----  -----  ---------------  --------\ntrain  0.001  2.3055           {}\n"
    assert examples.masked(table.format("433.3")) == examples.masked(table.format("1352.0"))
    assert examples.masked(table.format("433.3").replace("2.3055", "2.3056")) != examples.masked(table.format("433.3"))


@pytest.mark.parametrize("name", sorted(COMMAND_MODULES))
def test_every_command_has_a_page_with_an_example(name):
    assert os.path.exists(PAGE_OF[name]), f"no page docs/commands/ for ckpt {name}"
    nav = _read(os.path.join(ROOT, "mkdocs.yml"))
    assert os.path.relpath(PAGE_OF[name], os.path.join(ROOT, "docs")) in nav, f"ckpt {name}'s page is not in the nav"
    if name not in INTERACTIVE:
        blocks = examples.BLOCK.findall(_read(PAGE_OF[name]))
        assert any(f"$ ckpt {name} " in b for b in blocks), f"no runnable example of ckpt {name} on its page"


# options whose page text is written (in the change that added them) but not yet on the page: remove them then
PAGE_PENDING: dict[str, set[str]] = {}


@pytest.mark.parametrize("name", sorted(set(COMMAND_MODULES) - INTERACTIVE))
def test_every_option_is_explained_on_its_page(name):
    text = _read(PAGE_OF[name])
    missing = sorted(
        o
        for o in _options(name) - PAGE_PENDING.get(name, set())
        if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)
    )
    assert missing == [], f"ckpt {name}: options missing from {os.path.relpath(PAGE_OF[name], ROOT)}: {missing}"


@pytest.mark.parametrize("page", sorted(set(PAGE_OF.values())))
def test_documented_options_exist(page):
    """An option in a page's option table that no command of the page has is a stale row."""
    if not os.path.exists(page):
        pytest.skip("page not written yet")
    names = [n for n, p in PAGE_OF.items() if p == page]
    known = set().union(*(_options(n) for n in names))
    rows = re.findall(r"^\| `(--[\w-]+)", _read(page), re.M)
    assert sorted(set(rows) - known) == []


def test_generated_pages_are_current():
    pages = examples.cog_pages()
    assert {os.path.basename(p) for p in pages} >= {"cli.md", "api.md", "formats.md"}
    result = subprocess.run(
        [sys.executable, "-m", "cogapp", "-I", os.path.join(ROOT, "docs"), "--check", *pages],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (
        result.stdout + result.stderr + "\n(python docs/examples.py --update regenerates them)"
    )


def test_api_signatures_read_as_the_source_writes_them():
    """Annotations as written (``position: int``), also for named tuples' fields, which come as
    ``ForwardRef('int')`` from ``inspect.signature``."""
    text = _read(os.path.join(ROOT, "docs", "api.md"))
    assert "class ZipEntry(name: str, header_offset: int," in text
    assert "ForwardRef(" not in text


def test_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_setup_commands_come_first():
    readme = _read(os.path.join(ROOT, "README.md"))
    setup = readme.split("## Set-up", 1)[1]
    block = setup.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block == ["python3 -m venv .venv && . .venv/bin/activate", "pip install -e '.[test]'", "pytest"]
    assert readme.index("## Set-up") < readme.index("```")
    ci = _read(os.path.join(ROOT, ".ci", "run"))
    assert "\npip install -e '.[test]'\n" in ci and "\npytest\n" in ci


def test_every_python_name_in_the_docs_exists():
    """`ckpt_tool.module.name` in a page must import: a module moved or renamed breaks this, not a reader."""
    import importlib

    missing = []
    for page in PAGES:
        for dotted in sorted(set(re.findall(r"`(ckpt_tool(?:\.\w+)+)`", _read(page)))):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(f"{os.path.relpath(page, ROOT)}: {dotted}")
                break
            else:
                missing.append(f"{os.path.relpath(page, ROOT)}: {dotted}")
    assert missing == []
