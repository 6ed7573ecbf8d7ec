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


def _quantized(torch):
    import warnings

    from torch import nn

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), {nn.Linear}, dtype=torch.qint8
        )


def test_quantize_dynamic_packed_params_are_listed_and_refused_by_name(torch, tmp_path):
    model = _quantized(torch)
    sd = model.state_dict()
    path = tmp_path / "qdyn.pth"
    torch.save(sd, path)
    assert sd["0._packed_params._packed_params"][0].dtype == torch.qint8  # (qweight, bias), as torch packs them
    data = json.loads(_run("inspect", path, "--json").output)
    tensors = {k for k, v in torch.load(path, weights_only=True).items() if isinstance(v, torch.Tensor)}
    assert data["state_path"] == "" and {r["name"] for r in data["rows"]} == tensors
    note = next(n for n in data["notes"] if "packed weights of dynamically quantized layers" in n)
    assert "0._packed_params._packed_params (weight qint8 [8, 4], bias float32 [8])" in note, note
    assert "2._packed_params._packed_params (weight qint8 [2, 8], bias float32 [2])" in note, note
    for extra in ([], ["--dequantize"]):
        r = _run("migrate", path, *extra, "-o", tmp_path / "out.pth")
        assert r.exit_code == 2 and not (tmp_path / "out.pth").exists(), r.output
        assert (
            r.output.count("\n") == 1 and "0._packed_params._packed_params, 2._packed_params._packed_params" in r.output
        )
    # leaving them out is explicit, and what is left loads as torch saved it
    r = _run("migrate", path, "--exclude", "_packed_params", "-o", tmp_path / "out.pth")
    assert r.exit_code == 0, r.output
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(out) == tensors and all(torch.equal(out[k], sd[k]) for k in tensors)


def test_a_pickled_quantize_dynamic_model_says_why_its_weights_are_not_listed(torch, tmp_path):
    torch.save(_quantized(torch), tmp_path / "model.pth")
    r = _run("inspect", tmp_path / "model.pth")
    assert r.exit_code == 0 and "its packed weights are torch.ScriptObjects that only torch can unpack" in r.output


def test_a_quantized_lstms_state_dict_is_found_though_its_weights_are_objects(torch, tmp_path):
    """quantize_dynamic's LSTM keeps its weights as ScriptObjects (``_all_weight_values.N.param``),
    more of them than plain tensors: the dict is still the state dict, as torch's loader reads it."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 8, num_layers=3, bidirectional=True)
            self.fc = nn.Linear(16, 2)

    q = torch.ao.quantization.quantize_dynamic(Net(), {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    sd = q.state_dict()
    assert sum(isinstance(v, torch.Tensor) for v in sd.values()) * 2 < len(sd)  # objects outnumber tensors
    path = tmp_path / "qlstm.pth"
    torch.save(sd, path)
    data = json.loads(_run("inspect", path, "--json").output)
    assert data["state_path"] == "" and data["tensors"] >= 1, data
    assert "described consistently" in _run("validate", path).output  # the load check (scan judges the objects)


def test_settings_with_a_tensor_are_no_second_state_dict_but_read_when_alone(torch, tmp_path):
    """EarlyStopping's state (counters and one score tensor) beside a model is not offered as a
    state dict; a file holding nothing better is still read."""
    from ckpt_tool.reader import open_checkpoint

    weights = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}
    early = {"wait_count": 0, "stopped_epoch": 0, "best_score": torch.tensor(0.5), "patience": 3}
    torch.save({"state_dict": weights, "callbacks": {"EarlyStopping": early}}, tmp_path / "run.pth")
    assert [c.path for c in open_checkpoint(str(tmp_path / "run.pth")).candidates] == ["state_dict"]
    torch.save({"weight": torch.ones(3), "step": 10, "lr": 0.1}, tmp_path / "alone.pth")
    alone = open_checkpoint(str(tmp_path / "alone.pth"))
    assert [c.path for c in alone.candidates] == [""] and set(alone.tensors) == {"weight"}
