"""Seeded, bounded fuzzing of the readers scan and inspect share: the zip, legacy, pickle and safetensors
readers get mutated real files and must answer with a verdict or a clean error, never a crash.
(The interpreter's and the safetensors header's own properties are in test_properties.py.)"""

from __future__ import annotations

import os
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_tool.errors import CkptError
from ckpt_tool.reader import open_checkpoint
from ckpt_tool.scan import SEVERITY_ORDER, scan_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _seeds() -> dict[str, bytes]:
    def read(name: str) -> bytes:
        with open(os.path.join(ROOT, "fixtures", name), "rb") as f:
            return f.read()

    legacy = b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, 1001, {"little_endian": True}, {"a": 1}, []))
    return {
        "zip.pth": read("tiny_cnn.pth"),
        "model.safetensors": read("tiny_cnn.safetensors"),
        "legacy.pth": legacy,
        "plain.pkl": pickle.dumps({"w": [1.5, 2], "n": "x" * 40, "t": (1, None)}, protocol=4),
    }


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "copy"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            end = draw(st.integers(at, min(len(data), at + 64)))
            data[at:at] = data[at:end]
    return name, bytes(data)


@FUZZ
@given(case=mutated())
def test_mutated_files_get_a_verdict_or_a_clean_error(tmp_path_factory, case):
    name, data = case
    path = str(tmp_path_factory.mktemp("fuzz") / name)
    with open(path, "wb") as f:
        f.write(data)
    assert scan_file(path).verdict in SEVERITY_ORDER
    try:
        open_checkpoint(path)
    except CkptError:
        pass


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_the_unmutated_seeds_are_clean(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(SEEDS[name])
    assert scan_file(str(path)).verdict == "safe"
