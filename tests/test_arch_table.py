"""The shipped torchvision signatures: what the table answers, what it leaves to a build, and that it is true."""

from __future__ import annotations

import warnings

import pytest

from ckpt_tool import arch_table
from ckpt_tool.arch_table import lookup, names, table_version

EXPECTED = {  # a few facts known independently of the table (torchvision's model definitions)
    ("resnet18", "fc.weight"): (1000, 512),
    ("vgg16", "classifier.6.weight"): (1000, 4096),
    ("vit_b_16", "encoder.pos_embedding"): (1, 197, 768),
    ("squeezenet1_1", "classifier.1.weight"): (1000, 512, 1, 1),
}


@pytest.mark.torchfree
def test_every_classification_model_is_in_the_table():
    assert len(names()) >= 80 and {"alexnet", "resnet18", "vgg16", "vit_h_14", "maxvit_t"} <= set(names())
    assert "fasterrcnn_resnet50_fpn" not in names()  # detection: not a classification model
    for (name, key), shape in EXPECTED.items():
        sig = lookup(name, {})
        assert sig is not None and sig.tensors[key].shape == shape and sig.tensors[key].kind == "parameter"
    vgg = lookup("vgg16", {})
    assert vgg is not None and len(vgg.tensors) == 32 and vgg.auto_filled == () and vgg.ties == ()
    r18 = lookup("resnet18", {})
    assert r18 is not None and len(r18.tensors) == 122 and len(r18.auto_filled) == 20
    assert r18.tensors["bn1.num_batches_tracked"] == arch_table.TargetTensor((), "int64", "buffer")


@pytest.mark.torchfree
@pytest.mark.parametrize(
    ("name", "heads"),
    [
        ("resnet18", {"fc.weight": (10, 512), "fc.bias": (10,)}),
        ("squeezenet1_1", {"classifier.1.weight": (10, 512, 1, 1), "classifier.1.bias": (10,)}),
        (
            "inception_v3",
            {"fc.weight": (10, 2048), "fc.bias": (10,), "AuxLogits.fc.weight": (10, 768), "AuxLogits.fc.bias": (10,)},
        ),
        ("maxvit_t", {"classifier.5.weight": (10, 512)}),
    ],
)
def test_num_classes_follows_the_head_rule(name, heads):
    default, ten = lookup(name, {}), lookup(name, {"num_classes": 10, "weights": None})
    assert default is not None and ten is not None and list(ten.tensors) == list(default.tensors)
    for key, shape in heads.items():
        assert ten.tensors[key].shape == shape
    assert {k for k in default.tensors if default.tensors[k] != ten.tensors[k]} == set(heads)
    assert lookup(name, {"num_classes": 1000}) == default


@pytest.mark.torchfree
@pytest.mark.parametrize(
    "args",
    [
        {"num_classes": 0},
        {"num_classes": True},
        {"num_classes": "10"},
        {"dropout": 0.2},
        {"num_classes": 10, "aux_logits": False},
        {"weights": "DEFAULT"},
    ],
)
def test_arguments_the_table_cannot_state_are_left_to_a_build(args):
    assert lookup("inception_v3", args) is None


@pytest.mark.torchfree
def test_user_code_and_another_torchvision_release_are_left_to_a_build(monkeypatch):
    assert lookup("pkg.mod:factory", {}) is None and lookup("timm:resnet18", {}) is None
    monkeypatch.setattr(arch_table, "_installed_torchvision", lambda: "0.1.0")
    assert lookup("resnet18", {}) is None  # the installed library wins
    monkeypatch.setattr(arch_table, "_installed_torchvision", lambda: table_version())
    assert lookup("resnet18", {}) is not None


@pytest.mark.torchfree
def test_the_generated_file_is_small_and_records_its_release():
    import os

    assert os.path.getsize(arch_table.TABLE_PATH) < 200_000
    assert table_version().count(".") == 2 and "+" not in table_version()


@pytest.mark.slow  # builds all 80 models: on the meta device, regnets on the CPU without initialisation
def test_the_table_matches_every_model_of_the_installed_torchvision():
    """So the table can never drift silently: regenerate it with scripts/make_torchvision_signatures.py."""
    import torchvision

    from ckpt_tool.arch import signature_of

    installed = torchvision.__version__.split("+")[0]
    assert installed == table_version(), f"torchvision {installed}, table {table_version()}: regenerate the table"
    listed = sorted(torchvision.models.list_models(module=torchvision.models))
    assert listed == list(names())
    warnings.simplefilter("ignore")
    for name in listed:
        model = arch_table.build_for_signature(name, {})
        tensors, auto = signature_of(model)
        shipped = lookup(name, {})
        assert shipped is not None
        assert list(shipped.tensors) == list(tensors), name
        for key, t in tensors.items():
            assert shipped.tensors[key] == t, (name, key)
        assert shipped.auto_filled == auto and shipped.ties == arch_table.tie_groups(model), name
        del model


@pytest.mark.slow  # six more builds on the meta device
@pytest.mark.parametrize(
    "name", ["resnet18", "googlenet", "inception_v3", "vit_b_16", "mobilenet_v3_small", "densenet121"]
)
def test_the_head_rule_matches_a_build(name):
    from ckpt_tool.arch import build_model, signature_of

    warnings.simplefilter("ignore")
    tensors, auto = signature_of(build_model(name, {"num_classes": 17}, device="meta"))
    shipped = lookup(name, {"num_classes": 17})
    assert shipped is not None and shipped.tensors == tensors and shipped.auto_filled == auto


def test_the_installed_release_is_read_without_importing_torchvision():
    import subprocess
    import sys

    import torchvision

    code = (
        "import sys; from ckpt_tool.arch_table import _installed_torchvision; "
        "print(_installed_torchvision(), 'torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [torchvision.__version__.split("+")[0], "False"], out.stdout + out.stderr
