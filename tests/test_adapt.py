"""``--adapt-input-conv`` and ``--resample-pos-embed``: proposed by diff, applied by migrate, equal to timm's own
functions, verified by value, recorded in the provenance, usable inline in finetune-check."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from migrate_helpers import resnet_fixture, same_bytes, signature_cache_fixture  # noqa: F401

from ckpt_tool.cli import main
from ckpt_tool.diff import diff_paths
from ckpt_tool.errors import UsageError
from ckpt_tool.migrate import migrate
from ckpt_tool.plan import Plan, operation, operation_from_flag, plan_from_json

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

VIT = "timm:vit_tiny_patch16_224"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def load(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A 2-block timm ViT-Tiny for 32x32 images (a 2x2 grid of 16x16 patches plus the class token)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10)
    path = str(tmp_path_factory.mktemp("vit") / "vit32.pth")
    torch.save(model.state_dict(), path)
    return path


# --- the input conv --------------------------------------------------------------------------------


@pytest.mark.parametrize("in_chans", [1, 4])
def test_diff_proposes_adapt_and_migrate_equals_timm(resnet, tmp_path, in_chans):
    """torchvision resnet18 weights into timm's resnet18 with 1 or 4 input channels: diff proposes the adaptation,
    migrate writes timm's adapt_input_conv of the trained filters, bit for bit, and everything else unchanged."""
    report = diff_paths(resnet, arch="timm:resnet18", arch_args={"in_chans": in_chans})
    assert [s.operation for s in report.plan.steps] == [{"op": "adapt_input_conv", "module": "conv1"}]
    assert report.plan.resolves
    out = str(tmp_path / "adapted.safetensors")
    result = migrate(report.plan.plan, out)
    assert result.ok and result.verification.loads and not result.verification.differ
    assert result.plan.steps[0].adapted == ("conv1.weight",)
    assert [(a.key, a.origin_shape, a.shape) for a in result.plan.adapted] == [
        ("conv1.weight", (64, 3, 7, 7), (64, in_chans, 7, 7))
    ]
    src, got = torch.load(resnet, weights_only=True), load(out)
    assert same_bytes(got["conv1.weight"], timm.models.adapt_input_conv(in_chans, src["conv1.weight"]))
    assert not same_bytes(got["conv1.weight"][:, :1], src["conv1.weight"][:, :1])
    assert all(same_bytes(got[k], v) for k, v in src.items() if k != "conv1.weight")
    model = timm.create_model("resnet18", in_chans=in_chans)
    model.load_state_dict(got, strict=True)


def test_explicit_channels_without_arch_and_half_precision(tmp_path):
    """`conv1=4` needs no --arch; a float16 conv is computed in float32 and cast back, as timm does."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).half()
    out = str(tmp_path / "out.pth")
    wrapped = str(tmp_path / "named.pth")
    torch.save({f"stem.{k}": v for k, v in conv.state_dict().items()}, wrapped)
    result = invoke("migrate", wrapped, "--adapt-input-conv", "stem=4", "-o", out)
    assert result.exit_code == 0, result.output
    assert "from [8, 3, 3, 3]" in result.output and "adapt_input_conv 3 -> 4 channels" in result.output
    # a computed tensor is not "identical to its source": the summary says what it is
    assert "verified: re-read, 2 tensors as planned (1 from the checkpoint, 1 computed from it)" in result.output
    got = torch.load(out, weights_only=True)["stem.weight"]
    assert got.dtype == torch.float16
    assert same_bytes(got, timm.models.adapt_input_conv(4, conv.weight.detach()))


def test_verification_catches_a_wrong_adapted_value(resnet, tmp_path, monkeypatch):
    """Verification expects the adapted values: bytes that differ from them are reported, not passed."""
    import ckpt_tool.migrate as migrate_mod

    real = migrate_mod.computed_chunks
    calls = []

    def corrupt_first_write(e, files, chunk_bytes=4 << 20):
        calls.append(e.key)
        chunks = list(real(e, files, chunk_bytes))
        if len(calls) == 1:  # the write; verification's own call gets the true values
            chunks[0] = bytes([chunks[0][0] ^ 1]) + chunks[0][1:]
        return iter(chunks)

    monkeypatch.setattr(migrate_mod, "computed_chunks", corrupt_first_write)
    plan = Plan(
        resnet,
        arch="timm:resnet18",
        arch_args={"in_chans": 1},
        operations=(operation("adapt_input_conv", module="conv1"),),
    )
    result = migrate(plan, str(tmp_path / "bad.safetensors"))
    assert result.verification.differ == ("conv1.weight",)
    assert not result.ok


def test_provenance_and_plan_file_record_the_adaptation(resnet, tmp_path):
    plan_path = str(tmp_path / "plan.json")
    out = str(tmp_path / "one.safetensors")
    diff = invoke("diff", resnet, "--arch", "timm:resnet18", "--arch-arg", "in_chans=1", "--plan-out", plan_path)
    assert diff.exit_code == 1
    assert "--adapt-input-conv conv1" in diff.output and "summed over RGB" in diff.output
    saved = json.load(open(plan_path))
    assert saved["operations"] == [{"op": "adapt_input_conv", "module": "conv1"}]
    result = invoke("migrate", "--plan", plan_path, "-o", out)
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        ops = json.loads(f.metadata()["ckpt.operations"])
    assert ops == [{"op": "adapt_input_conv", "module": "conv1"}]


def test_diff_against_a_checkpoint_proposes_the_explicit_size(resnet, tmp_path):
    """With a checkpoint as the target there is no architecture to read the channel count from: it is spelled out."""
    torch.manual_seed(1)
    target = str(tmp_path / "gray.pth")
    torch.save(timm.create_model("resnet18", in_chans=1).state_dict(), target)
    report = diff_paths(resnet, target)
    assert {"op": "adapt_input_conv", "module": "conv1", "in_chans": 1} in [s.operation for s in report.plan.steps]
    assert "--adapt-input-conv conv1=1" in report.plan.command


def test_finetune_inline_adapt(resnet):
    """finetune-check's inline operations compute the same adapted tensor."""
    from ckpt_tool.finetune.load import _migrated_state
    from ckpt_tool.finetune.options import FinetuneOptions
    from ckpt_tool.reader import open_checkpoint

    model = timm.create_model("resnet18", in_chans=1)
    opts = FinetuneOptions(operations=(operation("adapt_input_conv", module="conv1"),))
    tensors, described, initialised = _migrated_state(open_checkpoint(resnet), opts, model)
    src = torch.load(resnet, weights_only=True)
    assert described == ("--adapt-input-conv conv1",) and initialised == ()
    assert same_bytes(tensors["conv1.weight"], timm.models.adapt_input_conv(1, src["conv1.weight"]))
    model.load_state_dict(tensors, strict=True)


# --- the position embedding -------------------------------------------------------------------------


def test_diff_proposes_resample_and_migrate_equals_timm(vit, tmp_path):
    report = diff_paths(vit, arch=VIT, arch_args={"img_size": 48, "depth": 2, "num_classes": 10})
    assert [s.operation for s in report.plan.steps] == [{"op": "resample_pos_embed", "key": "pos_embed"}]
    assert "2x2 grid, the target a 3x3 one (1 prefix token)" in report.plan.steps[0].reason
    out = str(tmp_path / "vit48.pth")
    result = migrate(report.plan.plan, out)
    assert result.ok, result.verification
    src, got = torch.load(vit, weights_only=True), load(out)
    from timm.layers import resample_abs_pos_embed

    want = resample_abs_pos_embed(src["pos_embed"], [3, 3], num_prefix_tokens=1)
    assert got["pos_embed"].shape == (1, 10, 192)
    assert same_bytes(got["pos_embed"], want)
    assert same_bytes(got["pos_embed"][:, :1], src["pos_embed"][:, :1])  # the class token's embedding is kept
    model = timm.create_model("vit_tiny_patch16_224", img_size=48, depth=2, num_classes=10)
    model.load_state_dict(got, strict=True)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_resample_explicit_grid_keeps_the_dtype(tmp_path, dtype):
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16, 8).to(getattr(torch, dtype))
    src = str(tmp_path / "pos.safetensors")
    from safetensors.torch import save_file

    save_file({"pos_embed": pos}, src)
    out = str(tmp_path / "out.safetensors")
    result = invoke("migrate", src, "--resample-pos-embed", "pos_embed=1+2x3", "-o", out)
    assert result.exit_code == 0, result.output
    from timm.layers import resample_abs_pos_embed

    got = load(out)["pos_embed"]
    assert same_bytes(got, resample_abs_pos_embed(pos, [2, 3], num_prefix_tokens=1))


def test_plan_json_and_argv_round_trip():
    for flag, value in (
        ("--adapt-input-conv", "conv1"),
        ("--adapt-input-conv", "stem.conv=4"),
        ("--resample-pos-embed", "pos_embed"),
        ("--resample-pos-embed", "pos_embed=2x3"),
        ("--resample-pos-embed", "pos_embed=1+3x3"),
    ):
        op = operation_from_flag(flag, value)
        assert op.to_argv() == [flag, value]
        again = plan_from_json(Plan("a.pth", operations=(op,)).to_json())
        assert again.operations == (op,)
    assert operation_from_flag("--resample-pos-embed", "pos_embed=1+3x3").params == {
        "key": "pos_embed",
        "grid": [3, 3],
        "prefix_tokens": 1,
    }


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapt-input-conv", "stem=1"], "matches no key"),
        (["--adapt-input-conv", "conv1"], "need the target (--arch)"),
        (["--adapt-input-conv", "conv1=x"], "give MODULE or MODULE=N"),
        (["--adapt-input-conv", "conv1=0"], "give MODULE or MODULE=N"),
        (["--adapt-input-conv", "fc=2"], "is not a convolution weight"),
        (["--resample-pos-embed", "pos=3"], "give KEY, KEY=HxW or KEY=P+HxW"),
        (["--resample-pos-embed", "fc.weight=2x2"], "is not a [1, tokens, dim] position embedding"),
        (["--adapt-input-conv", "conv1=2", "--adapt-input-conv", "conv1=4"], "only 3 (RGB) filters"),
    ],
)
def test_bad_adaptations_are_one_line_exit_2(resnet, tmp_path, args, message):
    result = invoke("migrate", resnet, *args, "-o", str(tmp_path / "o.pth"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.pth").exists()


def test_bad_plan_fields_are_input_errors():
    from ckpt_tool.errors import InputError

    with pytest.raises(InputError, match="'grid' as"):
        plan_from_json({"operations": [{"op": "resample_pos_embed", "key": "p", "grid": [3]}]})
    with pytest.raises(InputError, match="'in_chans' as a int"):
        plan_from_json({"operations": [{"op": "adapt_input_conv", "module": "conv1", "in_chans": "4"}]})
    with pytest.raises(UsageError, match="needs a 'grid'"):
        operation("resample_pos_embed", key="p", prefix_tokens=1)


def test_a_one_channel_conv_is_not_adapted_to_three(tmp_path):
    torch.manual_seed(0)
    gray = str(tmp_path / "g.pth")
    torch.save(timm.create_model("resnet18", in_chans=1).state_dict(), gray)
    with pytest.raises(UsageError, match="only 3 \\(RGB\\) filters"):
        migrate(
            Plan(gray, arch="timm:resnet18", operations=(operation("adapt_input_conv", module="conv1"),)), dry_run=True
        )
