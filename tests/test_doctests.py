"""The ``>>>`` examples of the package's docstrings and of the docs pages run, in a copy of the docs' example inputs."""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import shutil
import sys

import pytest
from conftest import ROOT

import ckpt_tool

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
DOC_PAGES = ["docs/api.md"]


def _modules() -> list[str]:
    names = ["ckpt_tool"] + [m.name for m in pkgutil.walk_packages(ckpt_tool.__path__, "ckpt_tool.")]
    return sorted(names)


def _tests() -> list[tuple[str, doctest.DocTest]]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        for test in finder.find(module):
            if test.examples and test.name.startswith(name):
                found.append((test.name, test))
    return found


TESTS = _tests()


@pytest.fixture()
def in_examples(example_inputs, tmp_path, monkeypatch):
    work = tmp_path / "ckpt-examples"
    shutil.copytree(example_inputs, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("CKPT_CACHE_DIR", str(work / ".cache"))
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    import examples

    with examples.one_torch_thread():
        yield work


def test_docstring_examples_exist():
    assert len(TESTS) >= 10, [name for name, _ in TESTS]


@pytest.mark.parametrize("name", [name for name, _ in TESTS])
def test_docstring_example(name, in_examples):
    test = dict(TESTS)[name]
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    test.globs = dict(test.globs)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_python_examples(page, in_examples):
    """The hand-written sessions of a page (its generated part, the docstrings, is covered above)."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read().split("<!-- [[[cog", 1)[0]
    test = doctest.DocTestParser().get_doctest(text, {}, page, page, 0)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert test.examples and runner.failures == 0, "".join(report)
