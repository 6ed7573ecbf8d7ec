"""Structural checks of safetensors headers: each defect gets its own precise message."""

from __future__ import annotations

import json
import struct

import pytest

from ckpt_tool.errors import FormatError
from ckpt_tool.formats.safetensors import header_defects, read_safetensors


def write(path, header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.mark.torchfree
def test_valid_file_has_no_defects(tmp_path):
    path = write(
        tmp_path / "ok.safetensors",
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]},
            "__metadata__": {"k": "v"},
        },
        bytes(12),
    )
    header, defects = header_defects(path)
    assert defects == [] and header is not None
    assert list(header.tensors) == ["a", "b"] and header.metadata == {"k": "v"}
    assert header.tensors["b"].dtype == "bfloat16" and header.tensors["b"].offset == header.data_start + 8


@pytest.mark.torchfree
def test_tensors_come_in_the_order_of_their_bytes_whatever_the_headers(tmp_path):
    """Abutting tensors in the header's order are taken as they come; any other layout is sorted,
    and its gaps are found between tensors as well as after the last."""
    entries = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        "b": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]},  # empty, at the end of a
        "c": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    header, defects = header_defects(write(tmp_path / "swapped.safetensors", entries, bytes(16)))
    assert defects == [] and header is not None and list(header.tensors) == ["c", "a", "b"]
    assert header.tensors["a"].offset == header.data_start + 8
    entries["a"]["data_offsets"] = [12, 20]
    header, defects = header_defects(
        write(tmp_path / "gap.safetensors", {**entries, "b": {**entries["b"], "data_offsets": [20, 20]}}, bytes(20))
    )
    assert defects == ["4 bytes before tensor 'a' belong to no tensor (offset 8)"]
    assert list(header.tensors) == ["c", "a", "b"]
    abutting = {
        "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
    }
    header, defects = header_defects(write(tmp_path / "tail.safetensors", abutting, bytes(12)))
    assert defects == ["4 bytes after the last tensor belong to no tensor"] and list(header.tensors) == ["x", "y"]


@pytest.mark.torchfree
@pytest.mark.parametrize(
    "header, data, expected",
    [
        (
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            bytes(8),
            "needs 12 bytes but data_offsets span 8",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "past the 4 bytes of data"),
        ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unknown dtype 'Q9'"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "not a list of non-negative"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "out of order"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "4 bytes before tensor 'a'"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(10), "2 bytes after the last tensor"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"k": 1}},
            bytes(8),
            "__metadata__",
        ),
        ({"a": [1, 2]}, b"", "entry is not an object"),
    ],
)
def test_each_defect_is_named(tmp_path, header, data, expected):
    path = write(tmp_path / "bad.safetensors", header, data)
    _, defects = header_defects(path)
    assert any(expected in d for d in defects), defects
    with pytest.raises(FormatError, match="bad.safetensors: "):
        read_safetensors(path)


@pytest.mark.torchfree
def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    assert "not valid JSON" in header_defects(str(path))[1][0]


@pytest.mark.torchfree
def test_header_longer_than_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    assert "runs past the end" in header_defects(str(path))[1][0]


def test_real_safetensors_file_passes(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.randn(3, 4), "i": torch.arange(5)}, str(tmp_path / "r.safetensors"))
    assert header_defects(str(tmp_path / "r.safetensors"))[1] == []


@pytest.mark.torchfree
def test_deeply_nested_header_is_a_defect_not_a_crash(tmp_path):
    raw = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert header_defects(str(path))[1] == ["header JSON nests too deeply to be a safetensors header"]


def test_dtype_the_installed_safetensors_cannot_load_is_a_defect_but_still_described(tmp_path):
    from safetensors import safe_open

    path = write(
        tmp_path / "c128.safetensors", {"z": {"dtype": "C128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)
    )
    with pytest.raises(Exception):  # noqa: B017 - the library itself refuses it, whatever it raises
        with safe_open(path, framework="pt") as f:
            f.get_tensor("z")
    _, defects = header_defects(path)
    assert defects == ["tensor 'z': dtype C128 cannot be loaded by " + defects[0].split("loaded by ")[1]]
    assert "safetensors" in defects[0]
    assert read_safetensors(path).tensors["z"].dtype == "complex128"


def test_loadable_asks_the_installed_safetensors(tmp_path):
    import safetensors.torch as st
    import torch

    from ckpt_tool.formats.safetensors import loadable

    st.save_file({"x": torch.zeros(1, dtype=torch.float8_e4m3fnuz)}, str(tmp_path / "x.safetensors"))
    assert st.load_file(str(tmp_path / "x.safetensors"))["x"].dtype == torch.float8_e4m3fnuz
    assert loadable("F8_E4M3FNUZ") and loadable("F32") and not loadable("C128") and not loadable("NOPE")


def test_loadable_is_asked_once_per_installed_pair_and_remembered(tmp_path, monkeypatch):
    """The probe imports torch; its answer is kept on disk, so the next process answers torch-free."""
    import subprocess
    import sys

    monkeypatch.setenv("CKPT_CACHE_DIR", str(tmp_path / "cache"))
    code = (
        "import sys\n"
        "from ckpt_tool.formats.safetensors import loadable\n"
        "print(loadable('F8_E4M3'), loadable('C128'), 'torch' in sys.modules)\n"
    )
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["True", "False", "True"]  # asked for real: torch imported
    cached = json.loads((tmp_path / "cache" / "safetensors-dtypes.json").read_text())
    assert cached["body"] == {"F8_E4M3": True, "C128": False}
    assert cached["key"]["installed"].startswith("safetensors ")
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert second.stdout.split() == ["True", "False", "False"]  # the same answers, no torch


@pytest.mark.torchfree
def test_without_safetensors_installed_no_dtype_is_called_unloadable(tmp_path, monkeypatch):
    from ckpt_tool.formats import safetensors as st

    monkeypatch.setattr(st, "_versions", lambda: None)
    monkeypatch.setattr(st, "_LOADABLE", {})
    path = write(tmp_path / "c.safetensors", {"z": {"dtype": "C128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16))
    assert header_defects(path)[1] == []


@pytest.mark.torchfree
def test_memoized_headers_are_parsed_once_and_read_afresh_when_the_file_changes(tmp_path, monkeypatch):
    from ckpt_tool.formats import safetensors as st

    parsed = []
    real = st._header_defects
    monkeypatch.setattr(st, "_header_defects", lambda p: parsed.append(p) or real(p))
    path = write(tmp_path / "a.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    with st.headers_memoized():
        one, _ = header_defects(path)
        two, _ = header_defects(path, check_loadable=False)  # the same parse serves both
        assert len(parsed) == 1 and one is not None and two is not None
        one.tensors.clear()  # a caller's change reaches nobody else
        assert list(header_defects(path)[0].tensors) == ["a"]
        with st.headers_memoized():  # nested: the outer memo
            header_defects(path)
        assert len(parsed) == 1
        write(tmp_path / "a.safetensors", {"b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, bytes(12))
        assert list(header_defects(path)[0].tensors) == ["b"]  # replaced: read afresh
        assert len(parsed) == 2
        others = [
            write(
                tmp_path / f"o{i}.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)
            )
            for i in range(st.MEMO_FILES)
        ]
        for other in others:
            header_defects(other)
        header_defects(path)  # pushed out by the last few files: parsed again
        assert len(parsed) == 2 + st.MEMO_FILES + 1
    header_defects(path)
    header_defects(path)
    assert len(parsed) == 2 + st.MEMO_FILES + 3  # outside a block nothing is kept


def test_loadability_defects_keep_their_place_among_the_others(tmp_path):
    path = write(
        tmp_path / "mixed.safetensors",
        {
            "a": {"dtype": "C128", "shape": [1], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [9], "data_offsets": [16, 20]},
            "c": {"dtype": "C128", "shape": [1], "data_offsets": [20, 36]},
        },
        bytes(36),
    )
    defects = header_defects(path)[1]
    assert [d.split(":")[0] for d in defects[:3]] == ["tensor 'a'", "tensor 'b'", "tensor 'c'"]
    assert "cannot be loaded" in defects[0] and "cannot be loaded" in defects[2]
    assert header_defects(path, check_loadable=False)[1] == [defects[1], *defects[3:]]


@pytest.mark.parametrize(
    "offsets, defect",
    [
        ([8, 24], "tensor 'b' overlaps the bytes of another tensor (offset 8)"),
        ([16, 4000], "tensor 'b': shape [4] of F32 needs 16 bytes but data_offsets span 3984"),
        ([16, 20], "tensor 'b': shape [4] of F32 needs 16 bytes but data_offsets span 4"),
        ([24, 40], "tensor 'c' overlaps the bytes of another tensor (offset 32)"),
    ],
)
def test_one_broken_entry_is_one_defect_not_a_gap_too(tmp_path, offsets, defect):
    """The bytes a misplaced entry should have held are no second defect: the user sees the cause once."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from ckpt_tool.scan import scan_file

    src = tmp_path / "ok.safetensors"
    save_file({"a": torch.randn(4), "b": torch.randn(4), "c": torch.randn(4)}, str(src))
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert [header[k]["data_offsets"] for k in "abc"] == [[0, 16], [16, 32], [32, 48]]
    header["b"]["data_offsets"] = offsets
    path = write(tmp_path / "bad.safetensors", header, raw[8 + n :])
    assert header_defects(path)[1] == [defect]
    assert [(f.name, f.reason) for f in scan_file(path).findings] == [("safetensors", defect)]
    with pytest.raises(SafetensorError, match="offset"):  # safetensors itself refuses the file too
        load_file(path)


@pytest.mark.torchfree
@pytest.mark.parametrize("big", [2**64, -(2**63) - 1, 10**30])
def test_integers_beyond_64_bits_read_as_json_reads_them(big):
    """orjson reads them as floats; a header's and a sharded index's JSON keep them integers."""
    from ckpt_tool.formats.safetensors import parse_json

    raw = json.dumps({"a": {"data_offsets": [0, big]}, "n": 2**64 - 1, "m": -(2**63)}).encode()
    assert parse_json(raw) == json.loads(raw)
    assert type(parse_json(raw)["a"]["data_offsets"][1]) is int


@pytest.mark.torchfree
def test_an_offset_beyond_64_bits_is_named_as_written(tmp_path):
    path = write(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**64]}}, b"")
    assert any(str(2**64) in d for d in header_defects(path)[1])
