"""The pickle interpreter: same data as pickle for plain values, inert for everything else."""

from __future__ import annotations

import io
import os
import pickle
import struct

import pytest

from ckpt_tool.errors import FormatError
from ckpt_tool.formats.pickle_vm import GlobalRef, PickleVM, Placeholder, Trace

pytestmark = pytest.mark.torchfree  # CI runs these in a core-only environment too

PLAIN = {
    "ints": [0, 1, -1, 255, 256, 65535, 65536, -(2**31), 2**31, 2**70, -(2**70)],
    "floats": [0.0, 1.5, -2.25e-300, float("inf")],
    "text": ["", "ascii", "ünïcødé", "x" * 300],
    "bytes": [b"", b"\x00\xff", b"y" * 300],
    "nested": {"a": (1, 2), "b": (), "c": (1,), "d": (1, 2, 3), "e": (1, 2, 3, 4), "f": [[], {}]},
    "flags": [True, False, None],
    "frozen": frozenset({1, 2}),
}


def vm_load(data: bytes, trace: Trace | None = None):
    return PickleVM(None, trace).load(io.BytesIO(data), len(data))


def normalise(obj):
    if isinstance(obj, dict):
        return {k: normalise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(normalise(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return ("set", sorted(obj))
    return obj


@pytest.mark.parametrize("protocol", range(0, 6))
def test_plain_data_matches_pickle(protocol):
    data = pickle.dumps(PLAIN, protocol=protocol)
    assert normalise(vm_load(data)) == normalise(pickle.loads(data))


@pytest.mark.parametrize("protocol", range(0, 6))
def test_shared_references_survive_the_memo(protocol):
    shared = [1, 2]
    data = pickle.dumps({"a": shared, "b": shared}, protocol=protocol)
    out = vm_load(data)
    assert out["a"] is out["b"]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /nonexistent-marker",))


@pytest.mark.parametrize("protocol", range(0, 6))
def test_calls_become_placeholders_and_are_traced(protocol):
    trace = Trace()
    out = vm_load(pickle.dumps({"x": Evil()}, protocol=protocol), trace)
    assert isinstance(out["x"], Placeholder)
    assert out["x"].name in ("posix.system", "os.system", "nt.system")
    assert out["x"].args == ("touch /nonexistent-marker",)
    assert [e.name for e in trace.calls] == [out["x"].name]
    assert trace.globals[0].name == out["x"].name and trace.globals[0].resolved


def test_objects_keep_their_state_inert():
    import argparse

    trace = Trace()
    out = vm_load(pickle.dumps(argparse.Namespace(lr=0.1, name="x"), protocol=2), trace)
    assert isinstance(out, Placeholder) and out.name == "argparse.Namespace"
    assert out.state == {"lr": 0.1, "name": "x"}
    assert any(e.opcode == "BUILD" for e in trace.calls)


def test_unresolvable_stack_global_is_flagged():
    # STACK_GLOBAL whose module name is itself the result of a call
    data = b"\x80\x04" + b"\x8c\x08builtins\x8c\x03str\x93" + b")R" + b"\x8c\x06system\x93" + b"."
    trace = Trace()
    out = vm_load(data, trace)
    assert isinstance(out, GlobalRef) and out.module == "?"
    assert any(not e.resolved for e in trace.globals)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "truncated|past the end"),
        (b"\x80\x02", "truncated|past the end"),
        (b"\x80\x02.", "empty stack"),
        (b"\x80\x02a.", "underflow"),
        (b"\x80\x02h\x05.", "memo entry 5"),
        (b"\x80\x02\xff.", "unknown pickle opcode"),
        (b"\x80\x09.", "protocol 9"),
        (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b".", "claims"),
        (b"\x80\x02X" + struct.pack("<I", 1 << 31) + b".", "claims"),
        (b"\x80\x02\x8b" + struct.pack("<i", 1 << 30) + b".", "LONG4"),
        (b"\x80\x02(K\x01d.", "odd number"),
        (b"I12345", "unterminated"),
        (b"\x80\x05\x97.", "out-of-band"),
    ],
)
def test_hostile_or_broken_streams_fail_cleanly(data, message):
    with pytest.raises(FormatError, match=message):
        vm_load(data)


def test_huge_text_integer_is_refused_not_hung():
    with pytest.raises(FormatError):
        vm_load(b"I" + b"9" * 100_000 + b"\n.")


def test_every_call_rebuilt_as_data_is_listed():
    """REBUILT_AS_DATA (what inspect does not list as an object) names exactly what _reduce_known handles."""
    import inspect as pyinspect
    import re

    from ckpt_tool.formats import pickle_vm

    source = pyinspect.getsource(pickle_vm._reduce_known)
    handled = set(re.findall(r'"((?:torch|collections|builtins|__builtin__|_codecs)\.[\w.]+)"', source))
    assert handled == set(pickle_vm.REBUILT_AS_DATA)


def test_invalid_utf8_string_is_a_format_error():
    data = b"\x80\x02X" + struct.pack("<I", 2) + b"\xff\xfe."
    with pytest.raises(FormatError, match="not UTF-8"):
        vm_load(data)


def test_malformed_arguments_to_known_calls_are_format_errors():
    # _rebuild_tensor_v2 called with an integer instead of its argument tuple's contents
    data = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x01tR."
    with pytest.raises(FormatError, match="malformed pickle|tensor"):
        vm_load(data)


# SHORT_BINUNICODE's 5 bytes run past a 4-byte frame: the C unpickler drops "xy" and reads "abcC\x03", then
# BININT1 7; read straight on (pickletools, pickle.loads of bytes) it is "xyabc", then SHORT_BINBYTES b"K\x07."
DESYNC = b"\x80\x04\x95" + struct.pack("<Q", 4) + b"\x8c\x05xy" + b"abcC\x03K\x07.."


def test_frames_are_read_as_the_c_unpickler_reads_a_stream():
    trace = Trace()
    assert PickleVM(None, trace).load(io.BytesIO(DESYNC)) == pickle.load(io.BytesIO(DESYNC)) == 7
    assert trace.desync == [13]  # where the readings part: the frame's dropped bytes "xy"
    straight = Trace()
    assert PickleVM(None, straight, frames="sequential").load(io.BytesIO(DESYNC)) == pickle.loads(DESYNC) == b"K\x07."
    assert straight.desync == []


@pytest.mark.parametrize("protocol", [4, 5])
def test_honest_frames_read_the_same_both_ways(protocol):
    data = pickle.dumps({"x": list(range(20000)), "s": "y" * 70000, "b": b"z" * 100}, protocol=protocol)
    trace = Trace()
    assert normalise(PickleVM(None, trace).load(io.BytesIO(data))) == normalise(pickle.loads(data))
    assert trace.desync == []


@pytest.mark.parametrize(
    "line, value",
    [
        (b"I0x10\n", 16),
        (b"I010\n", 8),
        (b"I-0x1f\n", -31),
        (b"I0b101\n", 5),
        (b"I1_000\n", 1000),
        (b"I01\n", True),
        (b"I 7\n", 7),
        (b"L0o17L\n", 15),
        (b"L0x10\n", 16),
        (b"I99999999999999999999\n", 99999999999999999999),
    ],
)
def test_int_and_long_literals_are_read_as_cpython_reads_them(line, value):
    data = line + b"."
    got = vm_load(data)
    assert got == pickle.loads(data) == value and type(got) is type(pickle.loads(data))


def test_unhashable_dict_key_fails_at_once_like_pickle():
    # a 40-level list whose every level holds the one below twice: repr() of it takes 2**40 steps
    body = b"]q\x000"
    for level in range(1, 41):
        body += b"](h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"eq" + bytes([level]) + b"0"
    data = b"\x80\x02}" + body + b"h\x28K\x01s."
    with pytest.raises(TypeError):
        pickle.loads(data)
    with pytest.raises(FormatError, match="dict key"):
        vm_load(data)


def test_work_is_bounded_by_the_stored_size():
    from ckpt_tool.formats.pickle_stream import WorkLimit

    data = b"\x80\x02" + b"N0" * 1000 + b"N."
    assert vm_load(data) is None
    with pytest.raises(WorkLimit, match="stopped after 500 opcodes at byte"):
        PickleVM(None, None, budget=500).load(io.BytesIO(data))


def test_joblib_array_bytes_are_stepped_over():
    import joblib
    import numpy as np

    buf = io.BytesIO()
    joblib.dump({"w": np.arange(6, dtype=np.int16), "z": "after"}, buf)
    trace = Trace()
    out = vm_load(buf.getvalue(), trace)
    assert out["z"] == "after" and out["w"].name == "numpy.ndarray" and out["w"].args[0] == (6,)
