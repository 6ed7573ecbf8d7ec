"""Property-based tests (hypothesis) for the two parsers that meet untrusted bytes first.

- The pickle interpreter gives what ``pickle.loads`` gives for plain data, at every protocol, and on
  any other bytes either returns or raises ``FormatError``: never another exception.
- The safetensors header checks accept every file ``safetensors`` writes, describing each tensor as
  written, and report a damaged or truncated file as defects: never an exception.

Examples are derandomized, so a run explores the same cases on every machine; a failure prints
the smallest input that shows it.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pickle_vm import normalise, vm_load

from ckpt_tool.errors import FormatError
from ckpt_tool.formats.safetensors import header_defects, read_safetensors

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
plain = st.recursive(
    scalars | st.frozensets(st.integers(), max_size=4) | st.sets(st.integers(), max_size=4),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.tuples(inner)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    ),
    max_leaves=20,
)


@SETTINGS
@given(value=plain, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_plain_data_reads_as_pickle_reads_it(value, protocol):
    data = pickle.dumps(value, protocol=protocol)
    assert normalise(vm_load(data)) == normalise(pickle.loads(data))


def _only_format_errors(data: bytes) -> None:
    try:
        vm_load(data)
    except FormatError:
        pass


@SETTINGS
@given(data=st.binary(max_size=300))
def test_any_bytes_parse_or_fail_as_a_format_error(data):
    _only_format_errors(data)


@SETTINGS
@given(
    value=plain,
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
    where=st.floats(0, 1),
    byte=st.integers(0, 255),
    cut=st.booleans(),
)
def test_a_damaged_pickle_fails_as_a_format_error(value, protocol, where, byte, cut):
    data = bytearray(pickle.dumps(value, protocol=protocol))
    i = min(int(where * len(data)), len(data) - 1)
    if cut:
        del data[i:]
    else:
        data[i] = byte
    _only_format_errors(bytes(data))


DTYPES = ["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]
arrays = st.dictionaries(
    st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)),
    min_size=1,
    max_size=5,
)


def _save(tmp_path, spec) -> tuple[str, dict[str, np.ndarray]]:
    from safetensors.numpy import save_file

    tensors = {k: np.zeros(shape, dtype=dtype) for k, (dtype, shape) in spec.items()}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"note": "property test"})
    return path, tensors


@SETTINGS
@given(spec=arrays)
def test_every_file_safetensors_writes_is_described_as_written(spec, tmp_path):
    path, tensors = _save(tmp_path, spec)
    header, defects = header_defects(path)
    assert defects == [] and header is not None
    assert {k: (r.dtype, r.shape) for k, r in header.tensors.items()} == {
        k: (str(a.dtype), tuple(a.shape)) for k, a in tensors.items()
    }
    assert header.metadata == {"note": "property test"}


@SETTINGS
@given(spec=arrays, where=st.floats(0, 1), byte=st.integers(0, 255), cut=st.booleans())
def test_a_damaged_safetensors_file_is_reported_not_raised(spec, where, byte, cut, tmp_path):
    path, _ = _save(tmp_path, spec)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    i = min(int(where * len(data)), len(data) - 1)
    if cut:
        del data[i:]
    else:
        data[i] = byte
    with open(path, "wb") as f:
        f.write(bytes(data))
    header, defects = header_defects(path)
    if cut:  # a file is exactly its header and its data: any truncation is a defect
        assert defects
    if defects:
        with pytest.raises(FormatError):
            read_safetensors(path)
    else:
        assert header is not None
