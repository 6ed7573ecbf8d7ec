"""Seeded, bounded fuzzing of the readers scan and inspect share: the zip, legacy, pickle and safetensors
readers get mutated real files and must answer with a verdict or a clean error, never a crash; and
property tests of the pickle interpreter and the safetensors header checks."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_tool.errors import CkptError, FormatError
from ckpt_tool.formats.pickle_vm import PickleVM
from ckpt_tool.formats.safetensors import header_defects
from ckpt_tool.reader import open_checkpoint
from ckpt_tool.scan import SEVERITY_ORDER, scan_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
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


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_never_break_the_interpreter(data):
    try:
        PickleVM().load(io.BytesIO(data), len(data))
    except FormatError:
        pass


_PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(value=_PLAIN, protocol=st.integers(0, 5))
def test_interpreter_reads_plain_data_as_pickle_does(value, protocol):
    data = pickle.dumps(value, protocol=protocol)
    assert PickleVM().load(io.BytesIO(data), len(data)) == pickle.loads(data)


_DTYPES = {"F32": 4, "F16": 2, "I64": 8, "U8": 1, "BOOL": 1}


@FUZZ
@given(shapes=st.lists(st.tuples(st.sampled_from(sorted(_DTYPES)), st.lists(st.integers(0, 5), max_size=3)),
                       min_size=1, max_size=4),
       damage=st.sampled_from(["none", "offset", "short", "length"]))
def test_safetensors_header_checks_find_every_inconsistency(tmp_path_factory, shapes, damage):
    header, cursor = {}, 0
    for i, (dtype, shape) in enumerate(shapes):
        size = math.prod(shape) * _DTYPES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + size]}
        cursor += size
    data = b"\x01" * cursor
    if damage == "offset":
        header["t0"]["data_offsets"][1] += 1
    elif damage == "short":
        data = data[:-1] if data else data
    raw = json.dumps(header).encode()
    length = len(raw) + (10**6 if damage == "length" else 0)
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    parsed, defects = header_defects(str(path))
    broken = damage == "offset" or damage == "length" or (damage == "short" and cursor > 0)
    assert bool(defects) == broken, (damage, defects)
    if not broken:
        assert parsed is not None and list(parsed.tensors) == [k for k in header if True]


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_the_unmutated_seeds_are_clean(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(SEEDS[name])
    assert scan_file(str(path)).verdict == "safe"
