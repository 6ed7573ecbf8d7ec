"""The collector pause around bulk reads, and the freeze the ``ckpt`` executable adds to it."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from ckpt_tool import bulk

pytestmark = pytest.mark.torchfree


def test_the_pause_restores_the_collector_and_freezes_nothing_in_a_library_caller():
    frozen = gc.get_freeze_count()
    with bulk.gc_paused():
        assert not gc.isenabled()
        with bulk.gc_paused():  # nested: still paused, and the outer block restores it
            pass
        assert not gc.isenabled()
        made = [{"i": i} for i in range(1000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen  # a long-lived process keeps collecting what it built
    del made


def test_the_executable_freezes_what_a_bulk_read_built():
    code = (
        "import gc, sys\n"
        "from ckpt_tool import bulk\n"
        "before = gc.get_freeze_count()\n"
        "bulk.freeze_after_bulk()\n"
        "with bulk.gc_paused():\n"
        "    made = [{'i': i} for i in range(10000)]\n"
        "assert gc.isenabled()\n"
        "print(gc.get_freeze_count() - before >= 10000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_the_console_script_and_python_m_go_through_run():
    from importlib.metadata import entry_points

    from ckpt_tool import __main__, cli

    assert __main__.run is cli.run
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ckpt"]
    assert script.value == "ckpt_tool.cli:run"
