"""The dtype tables of the checkpoint description, against torch and safetensors themselves."""

from __future__ import annotations

import io

import pytest

from ckpt_tool.checkpoint import DTYPES, SAFETENSORS_TO_DTYPE, TORCH_DTYPE_ALIASES, TORCH_DTYPES, is_floating, itemsize
from ckpt_tool.formats.pickle_vm import TORCH_DTYPE_NAMES, GlobalRef, PickleVM, TorchDType
from ckpt_tool.scan.policy import ALLOWED, TORCH_WEIGHTS_ONLY


def _torch_dtypes():
    import torch

    names: dict[str, list[str]] = {}
    for attr in dir(torch):
        value = getattr(torch, attr)
        if isinstance(value, torch.dtype):
            names.setdefault(str(value).removeprefix("torch."), []).append(attr)
    return torch, names


def test_every_torch_dtype_and_alias_is_in_the_table():
    torch, names = _torch_dtypes()
    assert set(TORCH_DTYPES) == set(names)
    aliases = {alias: name for name, attrs in names.items() for alias in attrs if alias != name}
    assert TORCH_DTYPE_ALIASES == aliases


def test_the_dtypes_ckpt_reads_have_torchs_sizes_and_safetensors_codes():
    torch, _ = _torch_dtypes()
    from safetensors import torch as st

    for name in DTYPES:
        dtype = getattr(torch, name)
        assert (itemsize(name), is_floating(name)) == (dtype.itemsize, dtype.is_floating_point), name
    for code, dtype in getattr(st, "_TYPES", {}).items():  # the codes the installed safetensors knows
        assert SAFETENSORS_TO_DTYPE[code] == str(dtype).removeprefix("torch."), code


@pytest.mark.torchfree
def test_the_reader_and_the_scanner_take_their_names_from_the_one_table():
    assert TORCH_DTYPE_NAMES == TORCH_DTYPES | set(TORCH_DTYPE_ALIASES)
    # every name torch writes is allowed as torch's weights_only loader allows it; its aliases are not
    assert all(f"torch.{name}" in TORCH_WEIGHTS_ONLY for name in TORCH_DTYPES)
    assert not {f"torch.{alias}" for alias in TORCH_DTYPE_ALIASES} & set(ALLOWED)

    def load(name: str):
        data = b"\x80\x02ctorch\n" + name.encode() + b"\n."
        return PickleVM(None).load(io.BytesIO(data), len(data))

    assert load("half") == TorchDType("float16") and load("uint4") == TorchDType("uint4")
    assert load("bits8") == TorchDType("bits8") and load("chalf") == TorchDType("complex32")
    assert isinstance(load("not_a_dtype"), GlobalRef)
