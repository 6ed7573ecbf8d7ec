"""Every input object is accounted for: carried bit-identical, converted with a note, or refused (exit 2)
before anything is written. Each layout is made by the real torch call that produces it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from ckpt_tool.cli import main
from ckpt_tool.reader import open_checkpoint


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def refused(result, *words: str) -> None:
    """Exit 2 with one line on stderr naming each of ``words``."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# torch's notes on deprecated quantized and beta sparse tensors
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- FSDP2 --------------------------------------------------------------------------------------

FSDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    out, store = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    fully_shard(model[0])
    fully_shard(model)
    sd = model.state_dict()
    torch.save(sd, f"{out}/fsdp.pth")
    torch.save({k: v.to_local() for k, v in sd.items()}, f"{out}/local.pth")
    # what rank 0 of two holds: the first half of a [6, 4] weight
    local = torch.randn(3, 4)
    shard = DTensor.from_local(local, sd["0.weight"].device_mesh, [Shard(0)], run_check=False, shape=(6, 4),
                               stride=(4, 1))
    torch.save({"w": shard}, f"{out}/shard.pth")
    torch.save({"r": distribute_tensor(torch.randn(2, 2), sd["0.weight"].device_mesh, [Replicate()])},
               f"{out}/replicated.pth")
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """FSDP2 ``fully_shard`` state dicts (world size 1, gloo), built in a child process."""
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "make.py"
    script.write_text(FSDP_SCRIPT)
    subprocess.run(
        [sys.executable, str(script), str(out), str(out / "store")], check=True, capture_output=True, timeout=300
    )
    return out


def test_fsdp_inspect_shows_every_dtensor(fsdp):
    import torch

    local = torch.load(fsdp / "local.pth", weights_only=True)
    ckpt = open_checkpoint(str(fsdp / "fsdp.pth"))
    assert list(ckpt.tensors) == list(local)
    assert all(
        ref.shape == tuple(local[k].shape) and "full local tensor" in ref.note for k, ref in ckpt.tensors.items()
    )
    result = invoke("inspect", str(fsdp / "fsdp.pth"))
    assert (
        result.exit_code == 0
        and "4 tensors: DTensor (Shard(0) on a mesh of 1 device(s)) read as its full local tensor" in result.output
    )


@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_fsdp_convert_writes_the_full_tensors_with_a_note(fsdp, tmp_path, ext):
    import torch

    out = str(tmp_path / f"plain.{ext}")
    result = invoke("convert", str(fsdp / "fsdp.pth"), out)
    assert (
        result.exit_code == 0
        and "DTensor (Shard(0) on a mesh of 1 device(s)) read as its full local tensor" in result.output
    )
    if ext == "pth":
        written = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        written = load_file(out)
    local = torch.load(fsdp / "local.pth", weights_only=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model.load_state_dict(written, strict=True)
    assert all(torch.equal(written[k], v) for k, v in local.items())


def test_replicated_dtensor_is_its_local_tensor(fsdp, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = str(tmp_path / "r.safetensors")
    result = invoke("convert", str(fsdp / "replicated.pth"), out)
    assert result.exit_code == 0 and "r: DTensor (Replicate() on a mesh of 1 device(s))" in result.output
    assert torch.equal(load_file(out)["r"], torch.load(fsdp / "replicated.pth", weights_only=False)["r"].to_local())


def test_dtensor_holding_one_shard_is_refused(fsdp, tmp_path):
    out = tmp_path / "w.pth"
    refused(invoke("convert", str(fsdp / "shard.pth"), str(out)), "'w'", "one shard", "[3, 4]", "[6, 4]")
    assert not out.exists()
    result = invoke("inspect", str(fsdp / "shard.pth"))
    assert result.exit_code == 0 and "one shard of [6, 4]" in result.output


# --- sparse and quantized -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def composites(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    dense = torch.randn(4, 5) * (torch.rand(4, 5) > 0.6)
    sd = {
        "coo": dense.to_sparse(),
        "csr": dense.to_sparse_csr(),
        "q8": torch.quantize_per_tensor(torch.randn(3, 4), 0.05, 3, torch.qint8),
        "qu8": torch.quantize_per_tensor(torch.randn(6), 0.1, 128, torch.quint8),
        "q32": torch.quantize_per_tensor(torch.randn(2, 2), 0.001, 0, torch.qint32),
        "qc": torch.quantize_per_channel(
            torch.randn(3, 2),
            torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
            torch.tensor([0, 1, 2]),
            0,
            torch.qint8,
        ),
        "dense": torch.randn(2),
    }
    path = tmp_path_factory.mktemp("composite") / "composite.pth"
    torch.save(sd, path)
    torch.save(sd, str(path) + ".legacy", _use_new_zipfile_serialization=False)
    return str(path), sd


def same_object(a, b) -> bool:
    """Bit-identical, including a quantized tensor's scale and zero point and a sparse tensor's indices."""
    import torch

    if a.is_quantized or b.is_quantized:
        if not (a.is_quantized and b.is_quantized and a.qscheme() == b.qscheme() and a.dtype == b.dtype):
            return False
        if a.qscheme() == torch.per_tensor_affine:
            same_q = a.q_scale() == b.q_scale() and a.q_zero_point() == b.q_zero_point()
        else:
            same_q = (
                torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
                and torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
                and a.q_per_channel_axis() == b.q_per_channel_axis()
            )
        return same_q and torch.equal(a.int_repr(), b.int_repr())
    if a.layout != b.layout:
        return False
    if a.layout == torch.sparse_coo:
        return torch.equal(a._indices(), b._indices()) and torch.equal(a._values(), b._values())
    if a.layout == torch.sparse_csr:
        return all(
            torch.equal(x, y)
            for x, y in (
                (a.crow_indices(), b.crow_indices()),
                (a.col_indices(), b.col_indices()),
                (a.values(), b.values()),
            )
        )
    return torch.equal(a, b)


def test_composites_are_described(composites):
    path, sd = composites
    ckpt = open_checkpoint(path)
    assert list(ckpt.tensors) == list(sd)
    kinds = {k: r.kind for k, r in ckpt.tensors.items()}
    assert kinds == {
        "coo": "sparse_coo",
        "csr": "sparse_csr",
        "q8": "quantized",
        "qu8": "quantized",
        "q32": "quantized",
        "qc": "quantized",
        "dense": "dense",
    }
    assert ckpt.tensors["q8"].attr == {"qscheme": "per_tensor_affine", "scale": 0.05, "zero_point": 3}
    result = invoke("inspect", path)
    assert "sparse_coo:" in result.output and "scale 0.05, zero point 3" in result.output


@pytest.mark.parametrize(("command", "source"), [("convert", "zip"), ("migrate", "zip"), ("convert", "legacy")])
def test_pth_output_carries_composites_bit_identical(composites, tmp_path, command, source):
    import torch

    path, sd = composites
    path += ".legacy" if source == "legacy" else ""
    out = str(tmp_path / "out.pth")
    args = [command, path, out] if command == "convert" else [command, path, "--add-prefix", "m.", "-o", out]
    assert invoke(*args).exit_code == 0
    written = torch.load(out, weights_only=True)
    prefix = "" if command == "convert" else "m."
    assert list(written) == [prefix + k for k in sd]
    assert all(same_object(sd[k], written[prefix + k]) for k in sd)


@pytest.mark.parametrize(
    ("key", "option"), [("coo", "--densify"), ("csr", "--densify"), ("q8", "--dequantize"), ("qc", "--dequantize")]
)
def test_safetensors_output_refuses_composites_before_writing(composites, tmp_path, key, option):
    path, _ = composites
    out = tmp_path / "out.safetensors"
    others = [k for k in ("coo", "csr", "q8", "qu8", "q32", "qc") if k != key]
    args = ["migrate", path, "-o", str(out)] + [a for k in others for a in ("--exclude", f"^{k}$")]
    refused(invoke(*args), repr(key), option)
    assert os.listdir(tmp_path) == []


def test_densify_and_dequantize_convert_with_notes(composites, tmp_path):
    from safetensors.torch import load_file

    path, sd = composites
    out = str(tmp_path / "out.safetensors")
    result = invoke("convert", path, out, "--densify", "--dequantize")
    assert result.exit_code == 0 and "coo: densified to a dense float32 tensor" in result.output
    assert "qc: dequantized to a dense float32 tensor" in result.output
    written = load_file(out)
    import torch

    for k, t in sd.items():
        want = t.dequantize() if t.is_quantized else t.to_dense()
        assert torch.equal(written[k], want), k


def test_diff_values_sees_a_changed_scale(tmp_path):
    import torch

    q = torch.quantize_per_tensor(torch.randn(8), 0.1, 2, torch.qint8)
    other = torch._make_per_tensor_quantized_tensor(q.int_repr(), 0.2, 2)  # same integers, new scale
    torch.save({"q": q}, tmp_path / "a.pth")
    torch.save({"q": other}, tmp_path / "b.pth")
    result = invoke("diff", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "--values")
    assert "values: 1 tensors changed, 0 unchanged" in result.output


# --- dtypes -------------------------------------------------------------------------------------


def test_complex128_is_refused_for_safetensors_and_fails_validate(tmp_path):
    import struct

    import torch

    torch.save({"z": torch.randn(3, dtype=torch.complex128)}, tmp_path / "z.pth")
    out = tmp_path / "z.safetensors"
    refused(invoke("convert", str(tmp_path / "z.pth"), str(out)), "'z'", "complex128", "write a .pth")
    assert not out.exists()
    assert invoke("convert", str(tmp_path / "z.pth"), str(tmp_path / "z2.pth")).exit_code == 0
    # the file ckpt 0.1 wrote: a C128 entry, which no safetensors release loads
    header = json.dumps({"z": {"dtype": "C128", "shape": [1], "data_offsets": [0, 16]}}).encode()
    out.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    result = invoke("validate", str(out))
    assert result.exit_code == 1 and "C128 cannot be loaded" in result.output
    assert invoke("inspect", str(out)).exit_code == 0  # still described


@pytest.mark.parametrize("dtype", ["float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"])
def test_float8_variants_to_safetensors_when_loadable(tmp_path, dtype):
    import safetensors.torch as st
    import torch

    t = torch.arange(256, dtype=torch.uint8).view(getattr(torch, dtype))
    torch.save({"f8": t}, tmp_path / "f8.pth")
    out = tmp_path / "f8.safetensors"
    result = invoke("convert", str(tmp_path / "f8.pth"), str(out))
    try:  # what the installed safetensors can do with this dtype, asked of it directly
        st.save_file({"f8": t}, str(tmp_path / "probe.safetensors"))
        st.load_file(str(tmp_path / "probe.safetensors"))
        supported = True
    except Exception:
        supported = False
    if supported:
        assert result.exit_code == 0, result.output
        assert torch.equal(st.load_file(str(out))["f8"].view(torch.uint8), t.view(torch.uint8))
    else:
        refused(result, "'f8'", dtype)
        assert not out.exists()


@pytest.mark.parametrize("dtype", ["float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float8_e4m3fn"])
def test_stats_of_float8_variants_match_torch(tmp_path, dtype):
    import torch

    t = torch.randn(64).clamp(0.01, 100).to(getattr(torch, dtype))
    torch.save({"f8": t, "one": torch.tensor([2.0])}, tmp_path / "f8.pth")
    result = invoke("inspect", str(tmp_path / "f8.pth"), "--stats", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    rows = {r["name"]: r["stats"] for r in data["rows"]}
    wide = t.double()
    assert rows["f8"]["mean"] == pytest.approx(wide.mean().item())
    assert rows["f8"]["std"] == pytest.approx(wide.std().item())  # torch's default: unbiased
    assert rows["one"]["std"] == "nan" and str(torch.tensor([2.0]).std().item()) == "nan"
    assert any("unbiased (n - 1)" in n for n in data["notes"])


# --- extras and metadata ------------------------------------------------------------------------


def test_keep_extras_keeps_a_nested_sibling(tmp_path):
    import torch

    model = torch.nn.Linear(3, 2)
    args = {"atom_fea_dim": 64, "layers": [1, 2], "name": "chgnet"}
    torch.save({"model": {"state_dict": model.state_dict(), "model_args": args}, "epoch": 7}, tmp_path / "c.pth")
    out = str(tmp_path / "out.pth")
    result = invoke("migrate", str(tmp_path / "c.pth"), "--key", "model/state_dict", "--keep-extras", "-o", out)
    assert result.exit_code == 0, result.output
    written = torch.load(out, weights_only=True)
    assert written["model"]["model_args"] == args and written["epoch"] == 7
    assert all(torch.equal(written["model"]["state_dict"][k], v) for k, v in model.state_dict().items())
    inspected = invoke("inspect", str(tmp_path / "c.pth"), "--key", "model/state_dict")
    assert "extra: model/model_args" in inspected.output


def test_metadata_is_renamed_as_torch_renames_it(tmp_path):
    import torch
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    model = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)))
    torch.save(model.state_dict(), tmp_path / "dp.pth")
    out = str(tmp_path / "out.pth")
    assert invoke("migrate", str(tmp_path / "dp.pth"), "--strip-prefix", "module.", "-o", out).exit_code == 0
    expected = model.state_dict()
    consume_prefix_in_state_dict_if_present(expected, "module.")
    written = torch.load(out, weights_only=True)
    assert dict(written._metadata) == dict(expected._metadata)
    assert list(written) == list(expected)


class WithExtraState:
    @staticmethod
    def build():
        import torch

        class Scaler(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = torch.nn.Linear(2, 2)
                self.calibration = {"amax": 3.5, "history": [1, 2, 3]}

            def get_extra_state(self):
                return self.calibration

            def set_extra_state(self, state):
                self.calibration = state

        return torch.nn.Sequential(Scaler(), torch.nn.ReLU())


def test_extra_state_is_carried_so_torch_loads_strictly(tmp_path):
    import torch

    model = WithExtraState.build()
    torch.save(model.state_dict(), tmp_path / "x.pth")
    out = str(tmp_path / "out.pth")
    assert invoke("migrate", str(tmp_path / "x.pth"), "--add-prefix", "body.", "-o", out).exit_code == 0
    written = torch.load(out, weights_only=True)
    target = torch.nn.Module()
    target.body = WithExtraState.build()
    target.body[0].calibration = {}
    target.load_state_dict(written, strict=True)
    assert target.body[0].calibration == {"amax": 3.5, "history": [1, 2, 3]}
    assert "0._extra_state" in open_checkpoint(str(tmp_path / "x.pth")).objects
    out_st = tmp_path / "out.safetensors"
    refused(invoke("convert", str(tmp_path / "x.pth"), str(out_st)), "'0._extra_state'", "not a tensor")
    assert not out_st.exists()
    excluded = invoke("migrate", str(tmp_path / "x.pth"), "--exclude", "_extra_state$", "-o", str(out_st))
    assert excluded.exit_code == 0


def test_the_plan_counts_the_entries_an_operation_drops_or_renames(tmp_path):
    """An operation that only touches an ``_extra_state`` entry says so, rather than "no keys matched"."""
    import torch

    from ckpt_tool.plan import apply, initial_state, operation

    torch.save(WithExtraState.build().state_dict(), tmp_path / "x.pth")
    ckpt = open_checkpoint(str(tmp_path / "x.pth"))
    ops = (operation("exclude", pattern="_extra_state$"), operation("add_prefix", prefix="body."))
    steps = apply(ops, initial_state(ckpt.tensors), None, objects=tuple(ckpt.objects)).steps
    assert steps[0].dropped == ("0._extra_state",)
    assert ("0._extra_state", "body.0._extra_state") not in steps[1].renamed
    renamed = apply(ops[1:], initial_state(ckpt.tensors), None, objects=tuple(ckpt.objects)).steps[0].renamed
    assert ("0._extra_state", "body.0._extra_state") in renamed
    result = invoke("migrate", str(tmp_path / "x.pth"), "--exclude", "_extra_state$", "--dry-run")
    assert "(no keys matched)" not in result.stdout and "0._extra_state" in result.stdout


# --- TorchScript, ONNX, optimizer ---------------------------------------------------------------


def test_torchscript_attributes_are_reported_apart(tmp_path):
    import torch

    class Vad(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)
            self.register_buffer("window", torch.ones(4))
            self._state = torch.zeros(2, 8)
            self._context = torch.zeros(64)

        def forward(self, x):
            return self.fc(x) + self._state.sum() + self._context.sum() + self.window.sum()

    path = str(tmp_path / "vad.pt")
    torch.jit.script(Vad()).save(path)
    loaded = torch.jit.load(path).state_dict()
    ckpt = open_checkpoint(path)
    assert list(ckpt.tensors) == list(loaded)
    assert sorted(ckpt.attributes) == ["_context", "_state"]
    result = invoke("inspect", path)
    assert "TorchScript attributes" in result.output and "_context" in result.output
    out = str(tmp_path / "vad.pth")
    converted = invoke("convert", path, out)
    assert (
        converted.exit_code == 0 and "2 TorchScript tensor attributes are not part of state_dict()" in converted.output
    )
    assert list(torch.load(out, weights_only=True)) == list(loaded)


def test_onnx_file_is_named(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "model.bin"  # named like a torch file on purpose
    onnx.save(helper.make_model(graph, producer_name="test"), str(path))
    refused(invoke("inspect", str(path)), "is an ONNX model", "PyTorch", "safetensors")


def test_inspect_describes_optimizer_state(tmp_path):
    import torch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ck.pth")
    result = invoke("inspect", str(tmp_path / "ck.pth"), "--key", "optimizer", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    names = [r["name"] for r in data["rows"]]
    assert names == [f"state.{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")]
    assert any("optimizer state: 2 parameters" in n for n in data["notes"])
    one = json.loads(invoke("inspect", str(tmp_path / "ck.pth"), "--key", "optimizer/state/0", "--json").output)
    assert [r["name"] for r in one["rows"]] == ["step", "exp_avg", "exp_avg_sq"]
    assert one["rows"][1]["shape"] == [2, 3]
    # other commands do not take optimizer state for a model's
    assert invoke("convert", str(tmp_path / "ck.pth"), str(tmp_path / "o.pth"), "--key", "optimizer").exit_code == 2
