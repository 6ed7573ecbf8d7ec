"""``--arch hf:PATH``: a Hugging Face config.json as a target, built with transformers on the meta device.

Tiny GPT-2, BERT and Llama models are made with ``save_pretrained`` at test time; the Llama-2-70B layout
is bench/layouts.py's generator scaled down (sparse shards, a config.json beside them).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from click.testing import CliRunner
from hf_configs import tiny_bert_config, tiny_gpt2_config, tiny_llama_config

from ckpt_tool.arch import build_model, target_signature
from ckpt_tool.cli import main
from ckpt_tool.errors import ArchError

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from layouts import TINY, llama_sharded  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``save_pretrained`` directories of three tiny models (random weights) and the models themselves."""
    import torch
    import transformers

    out = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    configs = {
        "gpt2": transformers.GPT2LMHeadModel(tiny_gpt2_config()),
        "bert": transformers.BertForMaskedLM(tiny_bert_config()),
        "llama": transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)),
    }
    paths = {}
    for name, model in configs.items():
        model.save_pretrained(str(out / name))
        paths[name] = str(out / name)
    return paths, configs


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ckpt: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_signature_is_the_models_state_dict(models, name):
    paths, built = models
    sig = target_signature(f"hf:{paths[name]}")
    want = built[name].state_dict()
    assert list(sig.tensors) == list(want)
    assert all(sig.tensors[k].shape == tuple(v.shape) for k, v in want.items())
    assert sig.cache == "built"
    # the config file itself is as good as its directory, and a second call is a cache hit
    again = target_signature(f"hf:{os.path.join(paths[name], 'config.json')}")
    assert again.tensors == sig.tensors and again.cache == "hit"


def test_tied_embeddings_are_a_tie_group(models):
    paths, _ = models
    assert ("transformer.wte.weight", "lm_head.weight") in target_signature(f"hf:{paths['gpt2']}").ties
    assert ("model.embed_tokens.weight", "lm_head.weight") in target_signature(f"hf:{paths['llama']}").ties
    untied = json.load(open(os.path.join(paths["llama"], "config.json")))
    assert untied["tie_word_embeddings"] is True  # the saved file names one of them only
    assert target_signature(f"hf:{paths['llama']}", {"tie_word_embeddings": False}).ties == ()


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_diff_of_save_pretrained_output_loads(models, name):
    paths, _ = models
    result = invoke("diff", os.path.join(paths[name], "model.safetensors"), "--arch", f"hf:{paths[name]}", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["loads_strictly"] is True and report["counts"]["tied"] >= 1 and report["counts"]["missing"] == 0


def test_arch_args_override_config_fields(models):
    paths, _ = models
    result = invoke(
        "diff",
        os.path.join(paths["gpt2"], "model.safetensors"),
        "--arch",
        f"hf:{paths['gpt2']}",
        "--arch-arg",
        "vocab_size=101",
        "--json",
    )
    assert result.exit_code == 1, result.output
    keys = {k["key"] for k in json.loads(result.stdout)["keys"] if k["status"] == "shape"}
    assert "transformer.wte.weight" in keys


def test_built_on_meta_and_on_cpu(models):
    paths, _ = models
    model = build_model(f"hf:{paths['llama']}", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert type(model).__name__ == "LlamaForCausalLM"


def test_migrate_verifies_by_loading_into_the_hf_model(models, tmp_path):
    paths, built = models
    import torch

    src = str(tmp_path / "llama.pth")
    torch.save(built["llama"].state_dict(), src)  # both tied names, one storage
    out = str(tmp_path / "llama.safetensors")
    result = invoke("migrate", src, "--arch", f"hf:{paths['llama']}", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["loads"] is True and report["verification"]["method"] == "load_state_dict"
    assert report["plan"]["shared"][0]["keys"] == ["model.embed_tokens.weight", "lm_head.weight"]


def test_validate_arch_policy(models):
    from ckpt_tool.config import ProjectConfig
    from ckpt_tool.validate import PASS, rules_from_config, validate_file

    paths, _ = models
    config = ProjectConfig(
        os.path.join(paths["bert"], "pyproject.toml"), {"arch": {"*.safetensors": {"arch": f"hf:{paths['bert']}"}}}
    )
    rules = rules_from_config(config)
    checks = {c.name: c for c in validate_file(os.path.join(paths["bert"], "model.safetensors"), rules).checks}
    assert checks["arch"].status == PASS, checks["arch"].message


def test_llama_70b_layout_scaled_down(tmp_path):
    index = llama_sharded(str(tmp_path / "llama"), **TINY)
    directory = os.path.dirname(index)
    assert len([n for n in os.listdir(directory) if n.endswith(".safetensors")]) == TINY["shards"]
    result = invoke("diff", directory, "--arch", f"hf:{directory}", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (
        report["loads_strictly"] is True and report["counts"]["matched"] == 2 * 9 + 3 and report["counts"]["tied"] == 0
    )
    # the same set against a config with one layer more: every key of layer 2 is missing
    result = invoke("diff", directory, "--arch", f"hf:{directory}", "--arch-arg", "num_hidden_layers=3", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["counts"]["missing"] == 9


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "no such file"),
        ("{not json", "is not a JSON config"),
        ('{"hidden_size": 3}', 'no "model_type"'),
        ('{"model_type": "nobody-knows", "auto_map": {"AutoModel": "x.Model"}}', "remote code"),
        ('{"model_type": "nobody-knows"}', "does not know this model type"),
        ('{"model_type": "gpt2", "architectures": ["os.system"]}', "not a transformers model class"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, content, fragment):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    result = invoke("diff", str(tmp_path / "x.safetensors"), "--arch", f"hf:{tmp_path}")
    # the checkpoint does not exist either: the arch is checked first or the file is; both exit 2
    assert result.exit_code == 2, result.output
    line = error_line(result)
    if "x.safetensors" not in line:
        assert fragment in line, line
    with pytest.raises(ArchError, match=fragment.replace('"', ".")):
        target_signature(f"hf:{tmp_path}")


def test_a_hub_name_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArchError, match="no such file .*nothing is downloaded"):
        target_signature("hf:gpt2")


def test_transformers_missing(models, monkeypatch):
    from ckpt_tool import torch_extra

    paths, _ = models
    real = torch_extra.has
    monkeypatch.setattr(torch_extra, "has", lambda m: False if m == "transformers" else real(m))
    result = invoke("diff", os.path.join(paths["gpt2"], "model.safetensors"), "--arch", f"hf:{paths['gpt2']}")
    assert result.exit_code == 2
    assert "needs transformers" in error_line(result) and "ckpt-tool[hf]" in error_line(result)


def test_finetune_check_refuses_hf(models):
    paths, _ = models
    result = invoke("finetune-check", os.path.join(paths["gpt2"], "model.safetensors"), "--arch", f"hf:{paths['gpt2']}")
    assert result.exit_code == 2
    assert "image classifiers" in error_line(result)
