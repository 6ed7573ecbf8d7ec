"""``--grow-blocks`` and ``--shrink-blocks``: torchvision ResNets, a timm ViT and a tiny transformers BERT, proposed by
diff, applied by migrate, loaded strictly; trained tensors bit-identical in their (renumbered) places."""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner
from migrate_helpers import resnet_fixture, same_bytes, signature_cache_fixture  # noqa: F401

from ckpt_tool.arch import TargetTensor
from ckpt_tool.cli import main
from ckpt_tool.depth import blocks, identity_keys
from ckpt_tool.diff import diff_paths
from ckpt_tool.errors import UsageError
from ckpt_tool.migrate import migrate
from ckpt_tool.plan import Plan, apply, initial_state, operation, operation_from_flag, plan_from_json

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

BERT_FACTORY = """
def bert(num_hidden_layers=4):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=num_hidden_layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, type_vocab_size=2)
    return BertModel(config, add_pooling_layer=False).eval()
"""


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(checkpoint of a 4-layer tiny BERT, the factory spec)."""
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("bert")
    factory = directory / "bert_factory.py"
    factory.write_text(textwrap.dedent(BERT_FACTORY))
    import importlib.util

    spec = importlib.util.spec_from_file_location("bert_factory", factory)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    path = str(directory / "bert4.pth")
    torch.save(module.bert(4).state_dict(), path)
    return path, f"{factory}:bert", module.bert


def _plan(source, arch, op, policy, **arch_args):
    return Plan(source, arch=arch, arch_args=arch_args, operations=(operation(op, policy=policy),))


# --- ResNet ------------------------------------------------------------------------------------------


def test_resnet18_into_resnet34_nearest(resnet, tmp_path):
    """diff proposes --grow-blocks; every resnet18 tensor stays bit-identical in its place, each new block is a
    copy of the last trained block of its stage, and the file loads strictly into torchvision's resnet34."""
    report = diff_paths(resnet, arch="resnet34")
    assert [s.operation for s in report.plan.steps] == [{"op": "grow_blocks", "policy": "nearest"}]
    assert "layer3 2 -> 6" in report.plan.steps[0].reason
    out = str(tmp_path / "r34.safetensors")
    result = migrate(report.plan.plan, out)
    assert result.ok and result.verification.loads
    from safetensors.torch import load_file

    src, got = torch.load(resnet, weights_only=True), load_file(out)
    assert all(same_bytes(got[k], v) for k, v in src.items())
    assert same_bytes(got["layer3.5.conv2.weight"], src["layer3.1.conv2.weight"])
    assert same_bytes(got["layer1.2.bn1.running_var"], src["layer1.1.bn1.running_var"])
    assert len(got) == len(torchvision.models.resnet34().state_dict())
    torchvision.models.resnet34().load_state_dict(got, strict=True)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_identity_growth_computes_the_resnet18_function(resnet, tmp_path):
    """With --grow-blocks identity, resnet34 in eval gives resnet18's outputs (each new block adds a zero residual
    to a post-ReLU input); with nearest it does not, so the check can fail."""
    src = torch.load(resnet, weights_only=True)
    r18 = torchvision.models.resnet18()
    r18.load_state_dict(src)
    for m in r18.modules():  # trained-looking statistics, so that BN in eval is not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    trained = str(tmp_path / "r18.pth")
    torch.save(r18.state_dict(), trained)
    x = torch.randn(2, 3, 64, 64)
    want = _logits(r18, x)
    outputs = {}
    for policy in ("identity", "nearest"):
        out = str(tmp_path / f"{policy}.pth")
        result = migrate(_plan(trained, "resnet34", "grow_blocks", policy), out)
        assert result.ok
        r34 = torchvision.models.resnet34()
        written = torch.load(out, weights_only=True)
        assert "layer1.1.bn2" in written._metadata  # a copied block's module versions stay with it
        r34.load_state_dict(written, strict=True)
        outputs[policy] = _logits(r34, x)
    assert torch.equal(outputs["identity"], want)
    assert not torch.allclose(outputs["nearest"], want, atol=1e-3)


def test_resnet34_into_resnet18_shrinks(resnet, tmp_path):
    r34 = torchvision.models.resnet34()
    src = str(tmp_path / "r34.pth")
    torch.save(r34.state_dict(), src)
    sd = r34.state_dict()
    report = diff_paths(src, arch="resnet18")
    assert [s.operation for s in report.plan.steps] == [{"op": "shrink_blocks", "policy": "first"}]
    for policy, kept in (("first", 1), ("every-k", 3)):  # layer3: 6 blocks -> 2, k = 3
        out = str(tmp_path / f"{policy}.pth")
        assert migrate(_plan(src, "resnet18", "shrink_blocks", policy), out).ok
        got = torch.load(out, weights_only=True)
        assert same_bytes(got["layer3.1.conv1.weight"], sd[f"layer3.{kept}.conv1.weight"])
        assert same_bytes(got["layer3.0.downsample.0.weight"], sd["layer3.0.downsample.0.weight"])
        torchvision.models.resnet18().load_state_dict(got, strict=True)


# --- transformers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy, kept", [("first", (0, 1)), ("every-k", (0, 2))])
def test_bert_4_layers_into_2(bert, tmp_path, policy, kept):
    path, spec, factory = bert
    out = str(tmp_path / "bert2.safetensors")
    result = migrate(_plan(path, spec, "shrink_blocks", policy, num_hidden_layers=2), out)
    assert result.ok, result.verification
    from safetensors.torch import load_file

    src, got = torch.load(path, weights_only=True), load_file(out)
    for new, old in enumerate(kept):
        for rest in ("attention.self.query.weight", "output.LayerNorm.bias"):
            assert same_bytes(got[f"encoder.layer.{new}.{rest}"], src[f"encoder.layer.{old}.{rest}"])
    assert same_bytes(got["embeddings.word_embeddings.weight"], src["embeddings.word_embeddings.weight"])
    assert not any(k.startswith(("encoder.layer.2.", "encoder.layer.3.")) for k in got)
    factory(2).load_state_dict(got, strict=True)


def test_bert_diff_proposes_shrink_and_grow(bert):
    path, spec, _ = bert
    shrink = diff_paths(path, arch=spec, arch_args={"num_hidden_layers": 2})
    assert [s.operation for s in shrink.plan.steps] == [{"op": "shrink_blocks", "policy": "first"}]
    assert "encoder.layer 4 -> 2" in shrink.plan.steps[0].reason
    grow = diff_paths(path, arch=spec, arch_args={"num_hidden_layers": 6})
    assert [s.operation for s in grow.plan.steps] == [{"op": "grow_blocks", "policy": "nearest"}]
    assert "--grow-blocks nearest" in grow.plan.command


def test_bert_4_layers_into_6(bert, tmp_path):
    """nearest copies layer 3 into 4 and 5; identity zeroes the output projections, so each new post-norm layer
    computes its two LayerNorms of its input."""
    path, spec, factory = bert
    src = torch.load(path, weights_only=True)
    near = str(tmp_path / "near.pth")
    assert migrate(_plan(path, spec, "grow_blocks", "nearest", num_hidden_layers=6), near).ok
    got = torch.load(near, weights_only=True)
    assert all(same_bytes(got[k], v) for k, v in src.items())
    assert same_bytes(
        got["encoder.layer.5.intermediate.dense.weight"], src["encoder.layer.3.intermediate.dense.weight"]
    )
    ident = str(tmp_path / "ident.pth")
    result = migrate(_plan(path, spec, "grow_blocks", "identity", num_hidden_layers=6), ident)
    assert result.ok
    got = torch.load(ident, weights_only=True)
    for i in (4, 5):
        for rest in (
            "attention.output.dense.weight",
            "attention.output.dense.bias",
            "output.dense.weight",
            "output.dense.bias",
        ):
            assert not got[f"encoder.layer.{i}.{rest}"].any()
    model = factory(6)
    model.load_state_dict(got, strict=True)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        layer = model.encoder.layer[4]
        want = layer.output.LayerNorm(layer.attention.output.LayerNorm(hidden[4]))
    assert torch.allclose(hidden[5], want, atol=1e-5)


def test_vit_identity_growth_is_the_identity(tmp_path):
    """A pre-norm transformer: identity blocks (attn.proj and mlp.fc2 zeroed) leave the output unchanged."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    small = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5).eval()
    path = str(tmp_path / "vit2.pth")
    torch.save(small.state_dict(), path)
    out = str(tmp_path / "vit3.pth")
    args = {"img_size": 32, "depth": 3, "num_classes": 5}
    report = diff_paths(path, arch="timm:vit_tiny_patch16_224", arch_args=args)
    assert [s.operation for s in report.plan.steps] == [{"op": "grow_blocks", "policy": "nearest"}]
    assert migrate(_plan(path, "timm:vit_tiny_patch16_224", "grow_blocks", "identity", **args), out).ok
    big = timm.create_model("vit_tiny_patch16_224", **args).eval()
    big.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(big(x), small(x))


# --- the rules, and bad input -------------------------------------------------------------------------


def test_repeated_blocks_are_numbered_from_zero():
    keys = [
        "layer1.0.conv1.weight",
        "layer1.1.conv1.weight",
        "layer1.0.downsample.0.weight",
        "features.0.weight",
        "features.3.weight",
        "model.layers.0.mlp.down_proj.weight",
    ]
    found = blocks(keys)
    assert set(found) == {"layer1", "model.layers"}  # features 0, 3: a Sequential with gaps, not blocks
    assert found["layer1"][0] == {
        "conv1.weight": "layer1.0.conv1.weight",
        "downsample.0.weight": "layer1.0.downsample.0.weight",
    }
    assert identity_keys(["conv1.weight", "bn1.weight", "bn3.weight", "bn3.bias", "downsample.1.weight"]) == [
        "bn3.weight",
        "bn3.bias",
    ]
    assert identity_keys(["self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"]) == [
        "self_attn.o_proj.weight",
        "mlp.down_proj.weight",
    ]


def _tensors(**shapes):
    return {k.replace("__", "."): TargetTensor(s, "float32", "parameter") for k, s in shapes.items()}


def test_growth_refuses_what_it_cannot_do(tmp_path):
    from ckpt_tool.checkpoint import TensorRef

    state = initial_state({"s.0.w": TensorRef("s.0.w", "float32", (4, 2), (2, 1), "0", 0, 32, 0, "x.pth")})
    target = _tensors(s__0__w=(4, 2), s__1__w=(4, 4))
    with pytest.raises(UsageError, match="no trained block of s has the keys and shapes of s.1"):
        apply([operation("grow_blocks", policy="nearest")], state, target)
    with pytest.raises(UsageError, match="s.1 has no last norm"):
        apply([operation("grow_blocks", policy="identity")], state, target)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grow-blocks", "random"], "choose one of nearest, identity"),
        (["--shrink-blocks", "last"], "choose one of first, every-k"),
        (["--grow-blocks", "nearest"], "need the target (--arch)"),
    ],
)
def test_bad_depth_options_are_one_line_exit_2(resnet, tmp_path, args, message):
    result = invoke("migrate", resnet, *args, "-o", str(tmp_path / "o.pth"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o.pth").exists()


def test_depth_operations_round_trip():
    for flag, value in (
        ("--grow-blocks", "nearest"),
        ("--grow-blocks", "identity"),
        ("--shrink-blocks", "first"),
        ("--shrink-blocks", "every-k"),
    ):
        op = operation_from_flag(flag, value)
        assert op.to_argv() == [flag, value] and op.needs_target
        assert plan_from_json(Plan("a.pth", operations=(op,)).to_json()).operations == (op,)


def test_dry_run_shows_the_copies(resnet):
    result = invoke("migrate", resnet, "--arch", "resnet34", "--grow-blocks", "nearest", "--dry-run")
    assert result.exit_code == 0, result.output
    assert (
        "computed: layer1.2.conv1.weight [64, 64, 3, 3] from layer1.1.conv1.weight [64, 64, 3, 3] "
        "(grow_blocks nearest: copy of layer1.1.conv1.weight)" in result.output
    )
    assert "against resnet34: loads with strict=True" in result.output
