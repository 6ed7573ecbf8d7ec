"""Fix plans that never pair tensors by a file's key order: a safetensors header lists its keys sorted.

Each plan diff proposes is applied by the real ``ckpt migrate`` command; the output is loaded into
the real model with ``strict=True`` and every tensor compared with the one it came from, so a plan
that swaps ``q`` and ``k`` (equal shapes) fails here.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_configs import tiny_bert_config
from plan_helpers import apply_suggested, models_env, random_state, run
from safetensors.torch import save_file
from torch import nn

from ckpt_tool.diff import diff_paths

MODELS = textwrap.dedent("""
    import torch
    from torch import nn


    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))


    class Block(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.embed = nn.Linear(8, 8, bias=False)
            self.add_module(attn, Attn())
            self.norm = nn.LayerNorm(8)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 2)
            self.register_buffer("stat", torch.zeros(4))

        def forward(self, x):
            return self.fc2(self.fc1(x) + self.stat)


    class Pair(nn.Module):
        def __init__(self, first, second):
            super().__init__()
            self.add_module(first, nn.Linear(4, 4))
            self.add_module(second, nn.Linear(4, 4))


    def attn():
        return Attn()

    def block_self_attn():
        return Block("self_attn")

    def net():
        return Net()

    def layers():
        return Pair("layer_a", "layer_b")
""")


def load_module(env: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("order_free_models", env / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def written(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return dict(torch.load(path, weights_only=True))


def check_placed(model: nn.Module, out: Path, source: dict[str, torch.Tensor], placed: dict[str, str]) -> None:
    """``out`` loads strictly into ``model`` and holds each source tensor under the key ``placed`` names."""
    state = written(out)
    model.load_state_dict(state, strict=True)
    for old, new in placed.items():
        assert torch.equal(state[new], source[old]), (old, new)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from models_env(tmp_path_factory, "orderfree", MODELS)


def test_a_wrapped_attention_with_a_head_strips_the_prefix_and_keeps_q_k_v_o_apart(env: Path) -> None:
    models = load_module(env)
    source = {"backbone." + k: v for k, v in random_state(models.Attn()).items()}
    source["head.weight"] = torch.randn(3, 8)
    save_file(source, str(env / "qkv.safetensors"))
    report = diff_paths(str(env / "qkv.safetensors"), arch="models.py:attn")
    ops = [s.operation for s in report.plan.steps]
    assert ops == [{"op": "strip_prefix", "prefix": "backbone."}, {"op": "drop", "prefix": "head"}]
    assert "8 of 9 checkpoint keys start with 'backbone.'" in report.plan.steps[0].reason

    out = env / "qkv.fixed.safetensors"
    result = apply_suggested(report, out)
    assert result.exit_code == 0, result.output
    placed = {k: k.removeprefix("backbone.") for k in source if k != "head.weight"}
    check_placed(models.Attn(), out, source, placed)


def test_renamed_modules_of_one_shape_pair_by_name_not_by_the_sorted_file_order(env: Path) -> None:
    models = load_module(env)
    source = {k.replace("self_attn.", "attn."): v for k, v in random_state(models.Block("self_attn")).items()}
    save_file(source, str(env / "block.safetensors"))  # sorted: attn.k, attn.o, attn.q, attn.v
    report = diff_paths(str(env / "block.safetensors"), arch="models.py:block_self_attn")
    renames = {s.operation["pattern"]: s.operation["replacement"] for s in report.plan.steps}
    assert renames == {rf"^attn\.{m}\.": f"self_attn.{m}." for m in "qkvo"}, report.plan.steps

    out = env / "block.fixed.safetensors"
    result = apply_suggested(report, out)
    assert result.exit_code == 0, result.output
    placed = {k: k.replace("attn.", "self_attn.") for k in source}
    check_placed(models.Block("self_attn"), out, source, placed)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_modules_whose_names_say_nothing_pair_only_where_the_order_is_the_models(env: Path, suffix: str) -> None:
    models = load_module(env)
    # registered z_first, then a_second: the port of layer_a, layer_b; a safetensors file sorts a_second first
    source = random_state(models.Pair("z_first", "a_second"))
    path = env / f"pair{suffix}"
    save_file(source, str(path)) if suffix == ".safetensors" else torch.save(source, path)
    report = diff_paths(str(path), arch="models.py:layers", map_out=str(env / "pair.map.json"))
    ops = [s.operation["op"] for s in report.plan.steps]
    assert "rename" not in ops
    if suffix == ".safetensors":
        assert "map" not in ops and report.plan.alignment is None
        assert any("no one-to-one pairing by name" in n for n in report.plan.notes)
        assert any("not paired by position" in n and "sort their keys" in n for n in report.plan.notes)
        return
    # a .pth keeps the model's registration order: the map by position is the port's pairing
    assert ops == ["map"]
    out = env / "pair.fixed.pth"
    result = apply_suggested(report, out)
    assert result.exit_code == 0, result.output
    placed = {f"z_first.{p}": f"layer_a.{p}" for p in ("weight", "bias")}
    placed |= {f"a_second.{p}": f"layer_b.{p}" for p in ("weight", "bias")}
    check_placed(models.Pair("layer_a", "layer_b"), out, source, placed)


def test_an_averaged_model_strips_module_and_drops_only_the_counter(env: Path) -> None:
    from torch.optim.swa_utils import AveragedModel

    models = load_module(env)
    net = models.Net()
    with torch.no_grad():
        net.stat.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # a trained buffer
    swa = AveragedModel(net)
    swa.update_parameters(net)
    source = dict(swa.state_dict())
    assert set(source) == {"n_averaged", "module.stat", *(f"module.{k}" for k in net.state_dict() if k != "stat")}
    torch.save(source, env / "swa.pth")

    result = run("diff", env / "swa.pth", "--arch", "models.py:net")
    assert result.exit_code == 1
    assert "--strip-prefix module. --drop n_averaged -o" in result.output
    assert "--fill-missing" not in result.output and "--drop module " not in result.output
    assert "5 of 6 checkpoint keys start with 'module.' (saved from torch's AveragedModel)" in result.output
    report = diff_paths(str(env / "swa.pth"), arch="models.py:net")
    assert [s.operation for s in report.plan.steps] == [
        {"op": "strip_prefix", "prefix": "module."},
        {"op": "drop", "prefix": "n_averaged"},
    ]
    out = env / "swa.fixed.pth"
    applied = apply_suggested(report, out)
    assert applied.exit_code == 0, applied.output
    assert "verified" in applied.output
    check_placed(models.Net(), out, source, {k: k.removeprefix("module.") for k in source if k != "n_averaged"})


def test_a_drop_never_takes_a_key_a_rename_could_place(env: Path) -> None:
    models = load_module(env)
    sd = random_state(models.Net())
    # one buffer under a wrapper's name, beside keys already in place and a key the target has no place for
    source = {("ema.stat" if k == "stat" else k): v for k, v in sd.items()} | {"extra.weight": torch.randn(2)}
    torch.save(source, env / "placed.pth")
    report = diff_paths(str(env / "placed.pth"), arch="models.py:net")
    ops = [s.operation for s in report.plan.steps]
    assert ops == [
        {"op": "rename", "pattern": r"^ema\.stat$", "replacement": "stat"},
        {"op": "drop", "prefix": "extra"},
    ]
    out = env / "placed.fixed.pth"
    result = apply_suggested(report, out)
    assert result.exit_code == 0, result.output
    placed = {k: ("stat" if k == "ema.stat" else k) for k in source if k != "extra.weight"}
    check_placed(models.Net(), out, source, placed)

    # two keys that could each be the one absent buffer: neither is dropped, neither guessed
    ambiguous = {k: v for k, v in source.items() if k != "extra.weight"} | {"teacher.stat": torch.randn(4)}
    torch.save(ambiguous, env / "ambiguous.pth")
    report = diff_paths(str(env / "ambiguous.pth"), arch="models.py:net")
    assert all(s.operation["op"] not in ("drop", "drop_unexpected", "rename") for s in report.plan.steps)
    assert sum("is not dropped: it could be stat" in n for n in report.plan.notes) == 2
    assert report.plan.command is None and not report.plan.resolves


def test_bert_for_classification_into_bert_and_back(env: Path) -> None:
    from transformers import BertForSequenceClassification, BertModel

    cfg = tiny_bert_config(num_labels=3)
    torch.manual_seed(0)
    base, cls = BertModel(cfg), BertForSequenceClassification(cfg)
    base.save_pretrained(env / "bert_base")
    cls.save_pretrained(env / "bert_cls")
    cls_state = {k: v.detach().clone() for k, v in cls.state_dict().items()}
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}

    report = diff_paths(str(env / "bert_cls"), arch=f"hf:{env / 'bert_base'}")
    assert [s.operation for s in report.plan.steps] == [
        {"op": "strip_prefix", "prefix": "bert."},
        {"op": "drop", "prefix": "classifier"},
    ]
    out = env / "bert_base_from_cls.safetensors"
    result = apply_suggested(report, out)
    assert result.exit_code == 0, result.output
    check_placed(
        BertModel(cfg), out, cls_state, {k: k.removeprefix("bert.") for k in cls_state if k.startswith("bert.")}
    )

    back = diff_paths(str(env / "bert_base"), arch=f"hf:{env / 'bert_cls'}")
    assert [s.operation["op"] for s in back.plan.steps] == ["add_prefix", "fill_missing"]
    assert back.plan.steps[0].operation["prefix"] == "bert."
    out = env / "bert_cls_from_base.safetensors"
    result = apply_suggested(back, out)
    assert result.exit_code == 0, result.output
    check_placed(BertForSequenceClassification(cfg), out, base_state, {k: "bert." + k for k in base_state})


def test_an_identity_rename_that_matches_says_so(env: Path) -> None:
    models = load_module(env)
    torch.save(random_state(models.Net()), env / "same.pth")
    result = run(
        "migrate", env / "same.pth", "--rename", r"^fc1\.=fc1.", "--drop", "nothing_here_xyz", "-o", env / "x.pth"
    )
    assert result.exit_code == 2 and "matches no key" in result.output  # an unmatched rename is still refused
    result = run("migrate", env / "same.pth", "--arch", "models.py:net", "--rename", r"^fc1\.=fc1.", "--dry-run")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "--rename" in line)
    assert "(keys matched; nothing changed)" in row and "no keys matched" not in result.output
