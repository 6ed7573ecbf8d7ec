"""What ckpt says about a file is what torch says of it: counts, entries, ties, checked against torch."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ckpt_tool.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_a_bare_tensor_is_one_tensor_in_inspect_scan_and_validate(torch, tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(torch.randn(3, 4), path)
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded, torch.Tensor)
    data = json.loads(_run("inspect", path, "--json").output)
    assert data["tensors"] == 1 and [(r["name"], r["shape"], r["dtype"]) for r in data["rows"]] == [
        ("<tensor>", list(loaded.shape), "float32")
    ]
    r = _run("validate", path)
    assert r.exit_code == 0 and "1 tensors described consistently" in r.output, r.output
    assert json.loads(_run("scan", path, "--json").output)["files"][0]["verdict"] == "safe"
    # a tensor is no state dict: migrate and convert say so, and write nothing
    r = _run("convert", path, tmp_path / "out.safetensors")
    assert r.exit_code == 2 and "holds one bare tensor, not a state dict" in r.output, r.output
    assert not (tmp_path / "out.safetensors").exists()
