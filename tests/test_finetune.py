"""finetune.py: loading against torch's own load_state_dict, heads, freezing, data, and every check failing when broken."""

from __future__ import annotations

import os
import textwrap
from dataclasses import replace

import pytest

from ckpt_tool.errors import ArchError, InputError, OutputError, UsageError
from ckpt_tool.finetune import (
    FAIL,
    INFO,
    PASS,
    SKIP,
    FinetuneOptions,
    expand_pattern,
    find_head,
    finetune_check,
    matches,
    replace_head,
    select_trainable,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGEFOLDER = os.path.join(ROOT, "fixtures", "imagefolder")
# small and quick: every run below takes a second or two on a laptop CPU
FAST = FinetuneOptions(image_size=32, batch_size=4, max_steps=2, eval_batches=1, lr=0.01)

USER_MODELS = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self, num_classes=4, in_features=32):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class SneakyTrains(Small):
    """Changes a weight behind the optimiser's back: a frozen layer that trains."""

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.features[0].weight.add_(1e-3)
        return super().forward(x)


class LeaksGrad(Small):
    """Turns gradients back on for a layer the user froze."""

    def forward(self, x):
        self.features[0].weight.requires_grad_(True)
        return super().forward(x)


class Unused(Small):
    """Holds a layer the forward pass never uses: no gradient reaches it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.spare = nn.Linear(3, 3)


class Segmenter(Small):
    def forward(self, x):
        return self.features(x)


def small(**kw):
    return Small(**kw)


def sneaky(**kw):
    return SneakyTrains(**kw)


def leaks(**kw):
    return LeaksGrad(**kw)


def unused(**kw):
    return Unused(**kw)


def segmenter(**kw):
    return Segmenter(**kw)
'''


def write_user_models(directory) -> str:
    path = os.path.join(str(directory), "user_models.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(USER_MODELS))
    return path


def save_state(torch, model, path) -> str:
    torch.save(model.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """resnet18, squeezenet1_0 and the user models, saved once for the module."""
    import torch
    import torchvision

    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    user = write_user_models(root)
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_models_for_tests", user)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {
        "root": root,
        "resnet": save_state(torch, resnet, root / "resnet18.pth"),
        "resnet_state": {k: v.clone() for k, v in resnet.state_dict().items()},
        "squeezenet": save_state(torch, torchvision.models.squeezenet1_0(weights=None), root / "squeezenet.pth"),
        "user": user,
        "small": save_state(torch, mod.Small(), root / "small.pth"),
        "unused": save_state(torch, mod.Unused(), root / "unused.pth"),
    }


def check(report, name):
    return next(c for c in report.checks if c.name == name)


def statuses(report):
    return {c.name: c.status for c in report.checks}


# ---- loading: our report against torch's own load_state_dict ----------------------------------------------------


def test_load_report_matches_torch_load_state_dict(files, tmp_path, torch):
    import torchvision

    state = torch.load(files["resnet"], weights_only=True)
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(7, 512)
    path = str(tmp_path / "edited.pth")
    torch.save(state, path)
    report = finetune_check(path, "resnet18", FAST)
    load = report.load

    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(state, strict=False)
    assert "size mismatch for fc.weight" in str(err.value)
    filtered = {k: v for k, v in state.items() if k != "fc.weight"}
    result = model.load_state_dict(filtered, strict=False)
    assert set(load.missing) == set(result.missing_keys) - {"fc.weight"}
    assert set(load.unexpected) == set(result.unexpected_keys) == {"extra.weight"}
    assert [(m.key, m.shape, m.target_shape) for m in load.mismatched] == [("fc.weight", (7, 512), (1000, 512))]
    assert load.loaded == len(filtered) - 1
    loaded = check(report, "weights loaded")
    assert loaded.status == FAIL
    assert "layer1.0.conv1.weight" in loaded.detail and "fc.weight [7, 512] vs [1000, 512]" in loaded.detail


def test_loaded_values_are_the_checkpoints_and_frozen_ones_survive_training(files, tmp_path, torch):
    from safetensors.torch import load_file

    out = str(tmp_path / "tuned.safetensors")
    report = finetune_check(files["resnet"], "resnet18", replace(FAST, num_classes=10, trainable=("fc",), save=out))
    assert report.passed, report.failed
    assert report.saved == out
    tuned = load_file(out)
    original = files["resnet_state"]
    for key, value in original.items():
        if key.startswith("fc."):
            continue
        if "running_" in key or "num_batches" in key:  # BatchNorm stats move in training mode, as reported
            continue
        assert torch.equal(tuned[key], value), key
    assert tuned["fc.weight"].shape == (10, 512)
    assert check(report, "frozen BatchNorm stats").status == INFO
    assert "20/20" in check(report, "frozen BatchNorm stats").detail


def test_every_check_passes_on_a_healthy_run(files):
    report = finetune_check(files["resnet"], "resnet18", replace(FAST, num_classes=10, freeze=("layer1-2",)))
    assert statuses(report) == {
        "weights loaded": PASS,
        "forward pass": PASS,
        "training runs": PASS,
        "loss finite": PASS,
        "overfit one batch": PASS,
        "frozen unchanged": PASS,
        "trainable changed": PASS,
        "gradients": PASS,
        "frozen BatchNorm stats": INFO,
        "epoch loss": INFO,
        "held-out accuracy": INFO,
        "throughput": INFO,
        "peak memory": INFO,
    }
    assert report.head.module == "fc" and report.num_classes == 10
    assert len(report.losses) == 2 and report.images_per_s > 0 and report.peak_rss_bytes > 10 * 2**20
    rows = {p.module: (p.trainable, p.frozen) for p in report.params}
    assert rows["layer1"] == (0, 147968) and rows["layer2"][0] == 0 and rows["layer3"][1] == 0
    assert rows["fc"] == (5130, 0)


def test_strip_prefix_and_nested_key(files, tmp_path, torch):
    state = torch.load(files["resnet"], weights_only=True)
    path = str(tmp_path / "wrapped.pth")
    torch.save({"epoch": 3, "model": {"module." + k: v for k, v in state.items()}}, path)
    bare = finetune_check(path, "resnet18", replace(FAST, key="model"))
    assert check(bare, "weights loaded").status == FAIL
    assert "--strip-prefix module." in check(bare, "weights loaded").detail
    fixed = finetune_check(path, "resnet18", replace(FAST, key="model", strip_prefix=("module.",)))
    assert check(fixed, "weights loaded").status == PASS
    assert fixed.load.loaded == len(state) and fixed.load.operations == ("--strip-prefix module.",)


def test_plan_file_is_applied(files, tmp_path, torch):
    import json

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "operations": [{"op": "reinit_mismatched"}]}))
    report = finetune_check(files["resnet"], "resnet18", replace(FAST, arch_args={"num_classes": 5}, plan=str(plan)))
    assert report.load.mismatched == () and set(report.load.initialised) == {"fc.weight", "fc.bias"}
    assert check(report, "weights loaded").status == PASS


def test_strict_fails_on_unexpected_keys(files, tmp_path, torch):
    state = torch.load(files["resnet"], weights_only=True)
    state["aux.weight"] = torch.ones(2)
    path = str(tmp_path / "extra.pth")
    torch.save(state, path)
    assert check(finetune_check(path, "resnet18", FAST), "weights loaded").status == PASS
    strict = finetune_check(path, "resnet18", replace(FAST, strict=True))
    assert check(strict, "weights loaded").status == FAIL and "aux.weight" in check(strict, "weights loaded").detail


def test_safetensors_input(files, tmp_path, torch):
    from safetensors.torch import save_file

    path = str(tmp_path / "r.safetensors")
    save_file(files["resnet_state"], path)
    report = finetune_check(path, "resnet18", replace(FAST, num_classes=3))
    assert report.passed and report.load.loaded == 120


# ---- heads ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, path",
    [
        ("resnet18", "fc"),
        ("regnet_y_400mf", "fc"),
        ("shufflenet_v2_x0_5", "fc"),
        ("googlenet", "fc"),
        ("vgg11", "classifier.6"),
        ("alexnet", "classifier.6"),
        ("densenet121", "classifier"),
        ("mobilenet_v3_small", "classifier.3"),
        ("efficientnet_b0", "classifier.1"),
        ("squeezenet1_0", "classifier.1"),
        ("vit_b_16", "heads.head"),
        ("swin_t", "head"),
        ("inception_v3", "fc"),
    ],
)
def test_head_replacement_per_family(arch, path):
    from ckpt_tool.arch import build_model

    # regnet's init copies tensors, which the meta device cannot do: it is small enough to build for real
    model = build_model(arch, {}, device="cpu" if arch.startswith("regnet") else "meta")
    change = replace_head(model, 7, None)
    assert change.module == path
    layer = model.get_submodule(path)
    assert getattr(layer, "out_features", getattr(layer, "out_channels", None)) == 7
    aux = {"googlenet": ("aux1.fc2", "aux2.fc2"), "inception_v3": ("AuxLogits.fc",)}.get(arch, ())
    assert change.aux == aux
    assert all(model.get_submodule(a).out_features == 7 for a in aux)


def test_auxiliary_classifiers_train_with_the_head(tmp_path, torch):
    import torchvision

    path = save_state(torch, torchvision.models.googlenet(weights=None, init_weights=False), tmp_path / "g.pth")
    report = finetune_check(path, "googlenet", replace(FAST, num_classes=3, max_steps=1, overfit_steps=3))
    assert check(report, "gradients").status == PASS and check(report, "trainable changed").status == PASS
    assert len(report.load.mismatched) == 6 and check(report, "weights loaded").status == PASS
    assert "(head aux1.fc2, aux2.fc2, fc replaced)" in check(report, "weights loaded").detail


def test_head_named_by_user_and_errors():
    from torch import nn

    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 8))
    model.add_module("out", nn.Sequential(nn.ReLU(), nn.Linear(8, 3)))
    assert find_head(model, None) == ""
    with pytest.raises(UsageError, match="no classification head found"):
        replace_head(model, 2, None)
    assert replace_head(model, 2, "out").module == "out.1"
    assert model.out[1].out_features == 2
    with pytest.raises(UsageError, match="--head nope: the model has no such module"):
        replace_head(model, 2, "nope")
    model.add_module("act", nn.ReLU())
    with pytest.raises(UsageError, match="holds no Linear or Conv2d"):
        replace_head(model, 2, "act")


# ---- freezing ---------------------------------------------------------------------------------------------------


def test_patterns():
    assert expand_pattern("features.0-2") == ["features.0", "features.1", "features.2"]
    assert expand_pattern("layer1-3") == ["layer1", "layer2", "layer3"]
    assert expand_pattern("fc") == ["fc"]
    with pytest.raises(UsageError, match="runs backwards"):
        expand_pattern("features.5-2")
    assert matches("features.3.weight", "features.3") and not matches("features.30.weight", "features.3")
    assert matches("layer4.0.conv1.weight", "layer4.*") and matches("layer4.0.bn1.bias", "re:bn\\d\\.bias$")
    assert not matches("layer4.0.conv1.weight", "re:^fc")


def test_freeze_first_equals_range():
    from ckpt_tool.arch import build_model

    model = build_model("squeezenet1_0", {}, device="meta")
    first = select_trainable(model, freeze_first=10)
    ranged = select_trainable(model, freeze=("features.0-9",))
    assert first == ranged
    assert not any(n.startswith(("features.0.", "features.9.")) for n in first)
    assert any(n.startswith("features.10.") for n in first)
    assert select_trainable(model, trainable=("classifier",)) == {"classifier.1.weight", "classifier.1.bias"}
    with pytest.raises(UsageError, match="has only 13 layers"):
        select_trainable(model, freeze_first=50)


def test_freezing_errors():
    from ckpt_tool.arch import build_model

    model = build_model("resnet18", {}, device="meta")
    with pytest.raises(UsageError, match="--freeze 'layr1' matches no parameter .*layer1"):
        select_trainable(model, freeze=("layr1",))
    with pytest.raises(UsageError, match="bad regular expression"):
        select_trainable(model, trainable=("re:(",))


def test_everything_frozen_fails_the_run(files):
    report = finetune_check(files["small"], files["user"] + ":small", replace(FAST, freeze=("*",)))
    assert not report.passed
    assert (
        check(report, "training runs").status == FAIL
        and "every parameter is frozen" in check(report, "training runs").detail
    )
    assert check(report, "overfit one batch").status == FAIL


def test_freeze_epochs_trains_head_then_everything(files, tmp_path, torch):
    from safetensors.torch import load_file

    out = str(tmp_path / "sched.safetensors")
    report = finetune_check(
        files["resnet"], "resnet18", replace(FAST, num_classes=4, epochs=2, freeze_epochs=1, save=out, freeze_bn=True)
    )
    assert [p.name for p in report.phases] == ["frozen", "unfrozen"]
    assert report.phases[0].trainable == 2052 and report.phases[1].frozen == 0
    assert report.phases[1].lr == pytest.approx(0.001)
    assert report.passed, report.failed
    # the body's BatchNorm layers were frozen (and kept in eval mode) in the first phase only
    assert len(report.frozen_bn) == 20 and report.frozen_bn_updated == ()
    assert sum(p.images for p in report.phases) == 16 and report.images_per_s > 0
    tuned = load_file(out)
    assert not torch.equal(tuned["conv1.weight"], files["resnet_state"]["conv1.weight"])  # unfrozen, then trained


def test_freeze_bn_keeps_running_stats(files):
    report = finetune_check(files["resnet"], "resnet18", replace(FAST, trainable=("fc",), freeze_bn=True))
    assert report.frozen_bn_updated == () and len(report.frozen_bn) == 20
    assert "unchanged" in check(report, "frozen BatchNorm stats").detail


# ---- each check fails when its condition is broken --------------------------------------------------------------


def test_frozen_layer_that_trains_fails(files):
    report = finetune_check(files["small"], files["user"] + ":sneaky", replace(FAST, freeze=("features",)))
    frozen = check(report, "frozen unchanged")
    assert frozen.status == FAIL and "features.0.weight" in frozen.detail
    assert not report.passed


def test_gradient_reaching_a_frozen_layer_fails(files):
    report = finetune_check(files["small"], files["user"] + ":leaks", replace(FAST, freeze=("features.0",)))
    grads = check(report, "gradients")
    assert grads.status == FAIL and "frozen tensors got gradients: features.0.weight" in grads.detail


def test_unused_trainable_layer_fails(files):
    report = finetune_check(files["unused"], files["user"] + ":unused", FAST)
    assert check(report, "gradients").status == FAIL and "spare.weight" in check(report, "gradients").detail
    assert check(report, "trainable changed").status == FAIL


def test_nan_loss_from_huge_lr_fails(files):
    report = finetune_check(
        files["resnet"], "resnet18", replace(FAST, lr=1e8, optimizer="sgd", num_classes=3, max_steps=4)
    )
    finite = check(report, "loss finite")
    assert finite.status == FAIL and "loss is nan" in finite.detail
    assert check(report, "overfit one batch").status == FAIL


def test_model_that_cannot_learn_fails_overfit(files):
    report = finetune_check(files["small"], files["user"] + ":small", replace(FAST, lr=1e-9))
    overfit = check(report, "overfit one batch")
    assert (
        overfit.status == FAIL and "needs batch accuracy >= 50% and the loss below 70% of the first" in overfit.detail
    )


def test_head_with_wrong_input_size_names_both_modules(files, torch):
    report = finetune_check(files["small"], files["user"] + ":small", replace(FAST, arch_args={"in_features": 50}))
    forward = check(report, "forward pass")
    assert forward.status == FAIL
    assert (
        "features outputs [2, 8, 2, 2], but classifier (Linear) expects 50 input features and receives [2, 32]"
        in forward.detail
    )
    assert check(report, "training runs").status == SKIP and not report.passed
    # the load report sees the head's shape differ too
    assert [m.key for m in report.load.mismatched] == ["classifier.weight"]


def test_non_logit_output_fails_forward(files):
    report = finetune_check(files["small"], files["user"] + ":segmenter", FAST)
    assert "not [batch, classes] logits" in check(report, "forward pass").detail


# ---- data ------------------------------------------------------------------------------------------------------


def test_synthetic_data_is_deterministic(files):
    a = finetune_check(files["small"], files["user"] + ":small", FAST)
    b = finetune_check(files["small"], files["user"] + ":small", FAST)
    c = finetune_check(files["small"], files["user"] + ":small", replace(FAST, seed=1))
    assert a.losses == b.losses and a.losses != c.losses


def test_imagefolder_fixture_learns(files):
    report = finetune_check(
        files["resnet"],
        "resnet18",
        replace(FAST, data="imagefolder:" + IMAGEFOLDER, num_classes=3, max_steps=None, epochs=2),
    )
    assert report.passed, report.failed
    assert report.phases[0].steps == 6  # 12 training images (3 held out) in batches of 4, twice
    assert report.accuracy_after is not None


def test_data_errors(files, tmp_path):
    with pytest.raises(UsageError, match="has 3 classes but the model outputs 2"):
        finetune_check(files["resnet"], "resnet18", replace(FAST, data="imagefolder:" + IMAGEFOLDER, num_classes=2))
    with pytest.raises(InputError, match="CIFAR-10 not found"):
        finetune_check(files["small"], files["user"] + ":small", replace(FAST, data=f"cifar10:{tmp_path}"))
    with pytest.raises(InputError, match="no such directory"):
        finetune_check(files["small"], files["user"] + ":small", replace(FAST, data=f"imagefolder:{tmp_path}/x"))
    with pytest.raises(InputError, match="one sub-directory of images per class|Couldn't find any class"):
        finetune_check(files["small"], files["user"] + ":small", replace(FAST, data=f"imagefolder:{tmp_path}"))
    with pytest.raises(UsageError, match="expected synthetic"):
        finetune_check(files["small"], files["user"] + ":small", replace(FAST, data="mnist"))


# ---- options and inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"lr": -1.0}, "--lr must be a positive number"),
        ({"optimizer": "rmsprop"}, "--optimizer must be adam or sgd"),
        ({"freeze_epochs": 1}, "leaves no epoch to train unfrozen"),
        ({"unfreeze_lr": 0.1}, "--unfreeze-lr only applies with --freeze-epochs"),
        ({"amp": True, "device": "cpu"}, "--amp needs a CUDA device"),
        ({"device": "tpu"}, "--device must be auto, cpu or cuda"),
        ({"save": "out.pth"}, "must be a .safetensors file"),
    ],
)
def test_bad_options(files, change, message):
    with pytest.raises(UsageError, match=message):
        finetune_check(files["small"], files["user"] + ":small", replace(FAST, **change))


def test_bad_inputs(files, tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        finetune_check(str(empty), "resnet18", FAST)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(files["resnet"], "rb").read()[:100_000])
    with pytest.raises(InputError):
        finetune_check(str(truncated), "resnet18", FAST)
    with pytest.raises(ArchError, match="not a torchvision model"):
        finetune_check(files["resnet"], "resnet1888", FAST)
    from ckpt_tool.errors import KeyPathError

    with pytest.raises(KeyPathError):
        finetune_check(files["resnet"], "resnet18", replace(FAST, key="nope"))


def test_save_refuses_existing_file_and_the_input(files, tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="exists"):
        finetune_check(files["small"], files["user"] + ":small", replace(FAST, save=str(out)))
    assert out.read_bytes() == b"keep"


def test_plot_without_matplotlib_is_a_clear_error(files, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(UsageError, match="--plot needs matplotlib"):
        finetune_check(files["small"], files["user"] + ":small", replace(FAST, plot="loss.png"))


def test_plot_is_drawn(files, tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "loss.png")
    report = finetune_check(files["small"], files["user"] + ":small", replace(FAST, plot=out))
    assert report.plot == out and os.path.getsize(out) > 1000


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="no CUDA device on this machine")
def test_cuda_with_amp(files):
    report = finetune_check(files["resnet"], "resnet18", replace(FAST, device="cuda", amp=True, num_classes=10))
    assert report.device.startswith("cuda") and report.peak_cuda_bytes > 0
    assert check(report, "forward pass").status == PASS and check(report, "frozen unchanged").status == PASS


def test_head_option_names_the_head_for_freeze_epochs(files):
    report = finetune_check(
        files["small"], files["user"] + ":small", replace(FAST, head="classifier", epochs=2, freeze_epochs=1, lr=0.1)
    )
    assert report.head is None and report.load.clean
    assert report.phases[0].trainable == 32 * 4 + 4 and report.phases[0].frozen > 0
    assert report.phases[1].frozen == 0 and report.passed, report.failed


def test_imagefolder_fixture_script(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "fixtures"))
    try:
        import make_imagefolder
    finally:
        sys.path.pop(0)
    root = make_imagefolder.make(str(tmp_path / "imgs"))
    assert sorted(os.listdir(root)) == ["blue", "green", "red"]
    assert all(len(os.listdir(os.path.join(root, c))) == 5 for c in os.listdir(root))
    assert sorted(os.listdir(IMAGEFOLDER)) == ["blue", "green", "red"]


def test_overfit_check_leaves_the_model_as_loaded(files):
    # training after 2 or 8 overfit steps starts from the same weights, so it sees the same losses
    short = finetune_check(files["small"], files["user"] + ":small", replace(FAST, overfit_steps=2))
    long = finetune_check(files["small"], files["user"] + ":small", replace(FAST, overfit_steps=8))
    assert len(short.overfit_losses) == 2 and len(long.overfit_losses) == 8
    assert short.losses == long.losses and short.accuracy_after == long.accuracy_after
