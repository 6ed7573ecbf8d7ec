"""Tied weights (GPT-2's lm_head.weight = transformer.wte.weight) through diff, migrate and their verification."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from migrate_helpers import signature_cache_fixture  # noqa: F401 - autouse: a cache per test

from ckpt_tool import plan as plan_mod
from ckpt_tool.cli import main
from ckpt_tool.migrate import migrate
from ckpt_tool.plan import Entry, Plan, operation

pytest.importorskip("transformers")

FACTORY = textwrap.dedent("""
    from transformers import GPT2Config, GPT2LMHeadModel


    def gpt2():
        print("a chatty constructor")
        return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))
""")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, torch.Tensor]:
    """A trained-looking GPT-2 saved by save_pretrained (safetensors: lm_head.weight is left out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    (root / "arch.py").write_text(FACTORY)
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(3).add_(1)  # far from any fresh initialisation
    model.save_pretrained(root / "hf", safe_serialization=True)
    return root, f"{root / 'arch.py'}:gpt2", model.transformer.wte.weight.detach().clone()


def _invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


def test_save_pretrained_drops_the_alias_and_diff_calls_it_tied(gpt2: tuple[Path, str, torch.Tensor]) -> None:
    root, spec, _ = gpt2
    from safetensors import safe_open

    with safe_open(str(root / "hf" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # the layout this is about
    result = _invoke("diff", str(root / "hf" / "model.safetensors"), "--arch", spec, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the constructor's print went to stderr: stdout is pure JSON
    assert report["loads_strictly"] is True and report["counts"]["missing"] == 0 and report["counts"]["tied"] == 1
    assert [k["status"] for k in report["keys"] if k["key"] == "lm_head.weight"] == ["tied"]


def test_a_tied_key_left_out_is_never_called_a_plain_strict_load(gpt2: tuple[Path, str, torch.Tensor]) -> None:
    """What torch says of the file: load_file + load_state_dict(strict=True) misses the alias. The diff's
    verdict and a safetensors output's summary must say so, not "strict=True would succeed"."""
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    root, spec, _ = gpt2
    st = str(root / "hf" / "model.safetensors")
    model = GPT2LMHeadModel.from_pretrained(str(root / "hf"))
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        model.load_state_dict(load_file(st), strict=True)
    text = _invoke("diff", st, "--arch", spec).stdout
    assert "would succeed" not in text
    assert "loads strictly once its 1 tied key is tied again" in text
    assert "a plain load_state_dict(strict=True) of these tensors reports them missing" in text
    torch.save(model.state_dict(), root / "tied.pth")  # lm_head.weight shares wte's storage
    out = root / "from_pth.safetensors"
    result = _invoke("convert", str(root / "tied.pth"), str(out), "--force")
    assert result.exit_code == 0, result.output
    assert "lm_head.weight" not in load_file(str(out))
    assert "1 tensor (lm_head.weight) shares a storage with a written tensor and is recorded as an alias" in (
        result.stdout
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_fill_missing_takes_the_alias_from_its_trained_partner(
    gpt2: tuple[Path, str, torch.Tensor], tmp_path: Path, suffix: str
) -> None:
    root, spec, trained = gpt2
    out = tmp_path / f"out{suffix}"
    result = _invoke(
        "migrate", str(root / "hf" / "model.safetensors"), "--arch", spec, "--fill-missing", "-o", str(out)
    )
    assert result.exit_code == 0, result.output
    assert "verified: loads into" in result.stdout and "1 tied to their partner" in result.stdout
    assert "a chatty constructor" not in result.stdout
    # the truth: torch's strict load of the output into a fresh model keeps the trained embedding
    from transformers import GPT2Config, GPT2LMHeadModel

    fresh = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    if suffix == ".pth":
        fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    else:
        from safetensors.torch import load_model

        load_model(fresh, str(out), strict=True)
    assert torch.equal(fresh.transformer.wte.weight, trained) and torch.equal(fresh.lm_head.weight, trained)
    # and ckpt's own tied output is not reported as missing the alias
    again = _invoke("diff", str(out), "--arch", spec)
    assert again.exit_code == 0, again.output


def test_value_verification_catches_an_alias_filled_from_random_init(
    gpt2: tuple[Path, str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old defect: the alias took the target's fresh value, which the load then wrote over the trained one."""
    root, spec, _ = gpt2

    def old_fill(state: plan_mod.State, target: plan_mod.Target) -> plan_mod.State:
        tensors = plan_mod._tensors(target)
        return {**state, **{k: Entry.from_target(k, t, "fill_missing") for k, t in tensors.items() if k not in state}}

    monkeypatch.setitem(plan_mod._POLICIES, "fill_missing", old_fill)
    report = migrate(
        Plan(str(root / "hf" / "model.safetensors"), arch=spec, operations=(operation("fill_missing"),)),
        str(tmp_path / "bad.pth"),
    )
    assert report.verification is not None and report.verification.loads  # strict=True alone says all is well
    assert not report.ok and "transformer.wte.weight" in report.verification.differ


def test_inspect_counts_a_tied_weight_once(gpt2: tuple[Path, str, torch.Tensor], tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    from ckpt_tool.inspect import inspect_checkpoint

    root, _, _ = gpt2
    model = GPT2LMHeadModel.from_pretrained(str(root / "hf"))
    torch.save(model.state_dict(), tmp_path / "tied.pth")  # lm_head.weight is wte.weight's storage
    state = model.state_dict()
    report = inspect_checkpoint(str(tmp_path / "tied.pth"))
    assert report.tensors == len(state)
    unique = {t.untyped_storage().data_ptr(): t for t in state.values()}
    assert report.parameters == sum(t.numel() for t in unique.values())  # lm_head.weight not counted twice
    assert report.tensor_bytes == sum(t.untyped_storage().nbytes() for t in unique.values())
    assert report.tensor_bytes < (tmp_path / "tied.pth").stat().st_size
