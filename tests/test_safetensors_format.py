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
