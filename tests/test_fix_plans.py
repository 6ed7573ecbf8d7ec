"""Fix plans beyond prefixes and module renames: leaf renames of known equivalences and remap by position.

Each plan diff proposes is applied by the real ``ckpt migrate`` command; the output is loaded into
the real model with ``strict=True`` and compared, tensor by tensor and bit for bit, with the source
tensor it was paired with.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from hf_configs import tiny_bert_config
from plan_helpers import apply_suggested, models_env, random_state, run
from torch import nn

from ckpt_tool.diff import diff_paths
from ckpt_tool.diff.align import POSITION, SEQUENCE_DIFF, align
from ckpt_tool.plan import load_plan

MODELS = textwrap.dedent('''
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel


    def bert_tiny():
        return BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=24, max_position_embeddings=32))


    class Scaled(nn.Module):
        """A LayerScale ``gamma`` that is a gamma on both sides, beside a norm whose weight was once called gamma."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.norm = nn.LayerNorm(6)
            self.ls = nn.Module()
            self.ls.gamma = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return self.norm(self.fc(x)) * self.ls.gamma


    def bn_net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
''')


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = nn.BatchNorm2d(cout)
        self.proj = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )


class ResNet18Port(nn.Module):
    """torchvision's resnet18 re-implemented under other names: the same layers, registered in the same order."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.stem_norm = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_Block(cin, cout, stride), _Block(cout, cout, 1)))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(512, classes)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from models_env(tmp_path_factory, "fixplans", MODELS)


# --- leaf renames ----------------------------------------------------------------------------------


def old_bert_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The spelling of BERT checkpoints before PyTorch names: LayerNorm.gamma / LayerNorm.beta."""
    return {
        re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
        for k, v in sd.items()
    }


def test_old_bert_gamma_beta_become_renames_with_evidence_and_load_strictly(env: Path) -> None:
    from transformers import BertModel

    model = BertModel(tiny_bert_config())
    source = old_bert_keys(random_state(model))
    assert sum(k.endswith("LayerNorm.gamma") for k in source) == 5
    torch.save(source, env / "bert_old.pth")

    report = diff_paths(str(env / "bert_old.pth"), arch="models.py:bert_tiny")
    ops = [s.operation for s in report.plan.steps]
    assert ops == [
        {"op": "rename", "pattern": r"(^|\.)gamma$", "replacement": r"\g<1>weight"},
        {"op": "rename", "pattern": r"(^|\.)beta$", "replacement": r"\g<1>bias"},
    ]
    reason = report.plan.steps[0].reason
    assert "5 keys spelled 'gamma' where the target has 'weight', same module path and shape" in reason
    assert "embeddings.LayerNorm.gamma -> embeddings.LayerNorm.weight [16]" in reason and "transformers" in reason
    assert report.plan.checkpoint_share == 1.0 and report.shape_flow is not None
    assert report.shape_flow.status == "passes" and report.shape_flow.output_shape == (1, 16, 16)

    result = apply_suggested(report, env / "bert_new.pth")
    assert result.exit_code == 0, result.output
    assert "verified: loads into models.py:bert_tiny with strict=True" in result.output
    written = torch.load(env / "bert_new.pth", weights_only=True)
    model.load_state_dict(written, strict=True)
    for key, value in source.items():
        new = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        assert torch.equal(bits(written[new]), bits(value)), key


def test_a_gamma_that_stays_a_gamma_scopes_the_rule(env: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fixplan_models", env / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = {
        k.replace("norm.weight", "norm.gamma").replace("norm.bias", "norm.beta"): v
        for k, v in random_state(module.Scaled()).items()
    }
    assert "ls.gamma" in source and "norm.gamma" in source
    torch.save(source, env / "scaled.pth")
    report = diff_paths(str(env / "scaled.pth"), arch="models.py:Scaled")
    ops = [s.operation for s in report.plan.steps]
    assert ops[0] == {"op": "rename", "pattern": r"(^|\.)norm\.gamma$", "replacement": r"\g<1>norm.weight"}
    assert ops[1] == {"op": "rename", "pattern": r"(^|\.)beta$", "replacement": r"\g<1>bias"}
    result = apply_suggested(report, env / "scaled.fixed.pth")
    assert result.exit_code == 0, result.output
    written = torch.load(env / "scaled.fixed.pth", weights_only=True)
    assert torch.equal(written["ls.gamma"], source["ls.gamma"]) and torch.equal(
        written["norm.weight"], source["norm.gamma"]
    )


def test_tf_moving_statistics_become_running_statistics(env: Path) -> None:
    sd = random_state(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    source = {
        k.replace("running_mean", "moving_mean").replace("running_var", "moving_variance"): v for k, v in sd.items()
    }
    torch.save(source, env / "tf_bn.pth")
    report = diff_paths(str(env / "tf_bn.pth"), arch="models.py:bn_net")
    ops = [s.operation["replacement"] for s in report.plan.steps]
    assert ops == [r"\g<1>running_mean", r"\g<1>running_var"]
    assert "TF/Keras" in report.plan.steps[0].reason
    result = apply_suggested(report, env / "tf_bn.fixed.pth")
    assert result.exit_code == 0, result.output
    written = torch.load(env / "tf_bn.fixed.pth", weights_only=True)
    assert torch.equal(written["1.running_var"], source["1.moving_variance"])


def test_a_leaf_rename_needs_the_same_shape(env: Path) -> None:
    sd = random_state(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    sd = {k.replace("1.running_mean", "1.moving_mean"): v for k, v in sd.items()}
    sd["1.moving_mean"] = torch.zeros(5)
    torch.save(sd, env / "tf_bn_bad.pth")
    report = diff_paths(str(env / "tf_bn_bad.pth"), arch="models.py:bn_net")
    assert all(s.operation["op"] != "rename" for s in report.plan.steps)


# --- remap by position -----------------------------------------------------------------------------


def test_align_by_position_and_by_sequence_diff() -> None:
    a = [("a.w", (4, 3)), ("a.b", (4,)), ("b.w", (2, 4))]
    full = align(a, [("x.weight", (4, 3)), ("x.bias", (4,)), ("y.weight", (2, 4))])
    assert full is not None and full.method == POSITION and full.confidence == 0.5
    assert full.mapping == {"a.w": "x.weight", "a.b": "x.bias", "b.w": "y.weight"}
    same = align([("p.weight", (4, 3)), ("p.bias", (4,))], [("q.weight", (4, 3)), ("q.bias", (4,))])
    assert same is not None and same.confidence == 1.0
    partial = align(
        [("p.weight", (4, 3)), ("p.bias", (4,)), ("h.weight", (9, 4))],
        [("q.weight", (4, 3)), ("q.bias", (4,)), ("f.weight", (7, 4))],
    )
    assert partial is not None and partial.method == SEQUENCE_DIFF
    assert partial.mapping == {"p.weight": "q.weight", "p.bias": "q.bias"}
    assert partial.unaligned_source == ("h.weight",) and partial.unaligned_target == ("f.weight",)
    assert partial.confidence == round(2 / 3, 3)
    # a lone coincidence is no alignment
    assert align([("a.bias", (64,)), ("b.w", (3, 3))], [("c.bias", (64,)), ("d.w", (5, 5))]) is None


def test_a_reimplemented_resnet18_is_remapped_by_position_bit_for_bit(env: Path) -> None:
    source = random_state(ResNet18Port())
    torch.save(source, env / "port.pth")
    report = diff_paths(str(env / "port.pth"), arch="resnet18", map_out=str(env / "port.map.json"))
    alignment = report.plan.alignment
    assert alignment is not None and alignment.method == POSITION and alignment.confidence == 1.0
    ops = [s.operation["op"] for s in report.plan.steps]
    assert ops == ["map"], report.plan.steps
    assert len(alignment.pairs) == len(source) == 122
    assert alignment.mapping["stem_conv.weight"] == "conv1.weight"
    assert alignment.mapping["stages.1.0.proj.1.running_var"] == "layer2.0.downsample.1.running_var"
    assert f"--map {env / 'port.map.json'}" in report.plan.command and report.map_path == str(env / "port.map.json")
    with open(env / "port.map.json") as f:
        assert json.load(f) == alignment.mapping
    assert "by position" in report.plan.steps[0].reason and "confidence 1.00" in report.plan.steps[0].reason

    result = apply_suggested(report, env / "port.fixed.pth")
    assert result.exit_code == 0, result.output
    written = torch.load(env / "port.fixed.pth", weights_only=True)
    torchvision.models.resnet18(weights=None).load_state_dict(written, strict=True)
    assert len(written) == len(source)
    for old, new in alignment.mapping.items():
        assert torch.equal(bits(written[new]), bits(source[old])), (old, new)


def test_cli_proposes_the_map_file_and_the_plan_holds_it(env: Path) -> None:
    torch.save(random_state(ResNet18Port()), env / "port2.pth")
    result = run("diff", env / "port2.pth", "--arch", "resnet18", "--plan-out", env / "port2.plan.json")
    assert result.exit_code == 1
    assert "- map: 122 unmatched keys pair up by position" in result.output
    assert f"--map {env / 'port2.map.json'}" in result.output
    assert f"(--map-out {env / 'port2.map.json'} writes the map it reads" in result.output
    assert not (env / "port2.map.json").exists()  # diff writes only what it is asked to
    plan = load_plan(str(env / "port2.plan.json"))
    assert plan.operations[0].op == "map" and len(plan.operations[0].params["mapping"]) == 122
    out = env / "port2.fixed.safetensors"
    applied = run("migrate", "--plan", env / "port2.plan.json", "-o", out)
    assert applied.exit_code == 0, applied.output
    data = json.loads(run("diff", env / "port2.pth", "--arch", "resnet18", "--json").output)
    assert data["plan"]["alignment"]["confidence"] == 1.0 and data["plan"]["map_file"].endswith("port2.map.json")


def test_a_partial_alignment_maps_what_aligns_and_leaves_the_rest(env: Path) -> None:
    source = random_state(ResNet18Port(classes=10))
    torch.save(source, env / "port10.pth")
    report = diff_paths(str(env / "port10.pth"), arch="resnet18", map_out=str(env / "port10.map.json"))
    alignment = report.plan.alignment
    assert alignment is not None and alignment.method == SEQUENCE_DIFF
    assert alignment.unaligned_source == ("classifier.weight", "classifier.bias")
    assert alignment.unaligned_target == ("fc.weight", "fc.bias")
    assert 0.9 < alignment.confidence < 1.0
    assert [s.operation["op"] for s in report.plan.steps] == ["map", "drop", "fill_missing"]
    assert any("did not align by position; pair them by hand" in n for n in report.plan.notes)
    result = apply_suggested(report, env / "port10.fixed.pth")
    assert result.exit_code == 0, result.output
    written = torch.load(env / "port10.fixed.pth", weights_only=True)
    torchvision.models.resnet18(weights=None).load_state_dict(written, strict=True)
    for old, new in alignment.mapping.items():
        assert torch.equal(bits(written[new]), bits(source[old])), (old, new)


def test_the_wrong_architecture_guard_stays(env: Path) -> None:
    with torch.device("meta"):
        vgg = torchvision.models.vgg11(weights=None)
    torch.save(vgg.to_empty(device="cpu").state_dict(), env / "vgg11.pth")
    report = diff_paths(str(env / "vgg11.pth"), arch="resnet18")
    assert report.plan.mostly_new and report.plan.command is None
    assert report.plan.alignment is None
