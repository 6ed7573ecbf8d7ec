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


def test_aliases_ckpt_recorded_in_safetensors_come_back_tied_in_a_pth(torch, tmp_path):
    from conftest import TiedLM

    model = TiedLM.build()
    torch.save(model.state_dict(), tmp_path / "tied.pth")
    assert _run("convert", tmp_path / "tied.pth", tmp_path / "tied.safetensors").exit_code == 0
    r = _run("convert", tmp_path / "tied.safetensors", tmp_path / "back.pth")
    assert r.exit_code == 0 and "1 tied to their partner" in r.output, r.output
    sd = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(sd) == ["embed.weight", "proj.weight"]
    assert sd["proj.weight"].untyped_storage().data_ptr() == sd["embed.weight"].untyped_storage().data_ptr()
    assert torch.equal(sd["proj.weight"], model.proj.weight)
    fresh = TiedLM.build()
    fresh.load_state_dict(sd, strict=True)
    assert fresh.proj.weight is fresh.embed.weight and torch.equal(fresh.embed.weight, model.embed.weight)
    # renamed with its partner, the alias stays one storage with it
    r = _run("migrate", tmp_path / "tied.safetensors", "--add-prefix", "lm.", "-o", tmp_path / "lm.pth")
    assert r.exit_code == 0, r.output
    sd = torch.load(tmp_path / "lm.pth", weights_only=True)
    assert sd["lm.proj.weight"].untyped_storage().data_ptr() == sd["lm.embed.weight"].untyped_storage().data_ptr()


def test_inspect_counts_values_and_says_which_are_buffers(torch, tmp_path):
    from conftest import tiny_model

    model = tiny_model()  # two BatchNorm layers: running_mean, running_var, num_batches_tracked
    torch.save(model.state_dict(), tmp_path / "cnn.pth")
    parameters = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    data = json.loads(_run("inspect", tmp_path / "cnn.pth", "--json").output)
    assert (data["parameters"], data["buffers"]) == (parameters + buffers, buffers)
    text = _run("inspect", tmp_path / "cnn.pth").output
    summary = dict(line.split(None, 1) for line in text.splitlines()[:8] if line.startswith(("values", "parameters")))
    assert summary == {"values": f"{parameters + buffers:,}"}, text
    assert f"{buffers:,} (running_mean, running_var, num_batches_tracked); {parameters:,} in the others" in text
    assert "params" not in text.splitlines()[text.splitlines().index("") + 1]  # the table's header
