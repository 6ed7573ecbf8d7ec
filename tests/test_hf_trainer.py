"""Hugging Face Trainer checkpoint directories through migrate: real Trainer runs, resumed after surgery."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import textwrap

import pytest
from click.testing import CliRunner
from hf_configs import tiny_bert_config, tiny_gpt2_config
from model_files import write_models

from ckpt_tool.cli import main

# Every parameter but the head's is a vector of 4, so an order that ignores the Trainer's weight
# decay / no weight decay split still passes the moment-shape checks: only resuming tells. `ln` is
# kept out of weight decay by its type alone (nn.LayerNorm), `*.bias` by its name. The kept branches
# (a, ln, b) never see the changed ones (head, gone): their updates must match the control bit for bit.
MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4))
            self.bias = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * self.weight + self.bias

    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3, bias=False)
            self.a = Scale()
            self.ln = nn.LayerNorm(4)
            self.b = Scale()
            self.gone = Scale()

        def forward(self, x):
            loss = self.head(x).pow(2).sum() + self.a(x).pow(2).sum() + self.b(self.ln(x)).pow(2).sum()
            return {"loss": loss + self.gone(x).sum()}

    class New(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 5, bias=False)
            self.a2 = Scale()
            self.ln = nn.LayerNorm(4)
            self.b = Scale()

        def forward(self, x):
            return {"loss": self.head(x).pow(2).sum() + self.a2(x).pow(2).sum() + self.b(self.ln(x)).pow(2).sum()}

    def old():
        return Old()

    def new():
        return New()
""")
KEPT = {"a2.weight": "a.weight", "a2.bias": "a.bias", "ln.weight": "ln.weight", "ln.bias": "ln.bias"}
KEPT |= {"b.weight": "b.weight", "b.bias": "b.bias"}


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _args(out, steps, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_strategy="steps",
        save_steps=4,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # clipping by the global norm would tie every update to the changed parameters
        report_to=[],
        use_cpu=True,
        seed=0,
        logging_strategy="no",
        disable_tqdm=True,
        **kw,
    )


def _dataset(torch, key="x"):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(32, 4, generator=g)
    ys = torch.randint(0, 2, (32,), generator=g)
    return [
        {key: x} if key == "x" else {key: torch.randint(0, 32, (8,), generator=g), "labels": y} for x, y in zip(xs, ys)
    ]


def _train(torch, model, out, steps, resume=None):
    from transformers import Trainer

    trainer = Trainer(model=model, args=_args(out, steps), train_dataset=_dataset(torch))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="session")
def branches(tmp_path_factory, torch):
    """The models file and a real Trainer checkpoint of Old after 4 steps (checkpoint-4/)."""
    d = tmp_path_factory.mktemp("hf_trainer")
    path, module = write_models(d, "branches", MODELS)
    torch.manual_seed(0)
    _train(torch, module.old(), d / "run", 4)
    return path, module, str(d / "run" / "checkpoint-4")


def _migrate(branches, out, *extra):
    path, _, ckpt = branches
    return _run(
        "migrate",
        ckpt,
        "--rename",
        r"^a\.=a2.",
        "--drop",
        "gone",
        "--reinit-mismatched",
        "--source-arch",
        f"{path}:old",
        "--arch",
        f"{path}:new",
        "-o",
        str(out),
        *extra,
    )


def _resume_both(torch, branches, out, tmp_path):
    """Four more steps in a real Trainer: the old model from checkpoint-4, the new one from ``out``."""
    _, module, ckpt = branches
    torch.manual_seed(1)
    control = _train(torch, module.old(), tmp_path / "control", 8, resume=ckpt).model.state_dict()
    torch.manual_seed(2)
    resumed = _train(torch, module.new(), tmp_path / "resumed", 8, resume=str(out)).model.state_dict()
    return control, resumed


def test_trainer_directory_resumes_bit_for_bit_after_surgery(torch, branches, tmp_path):
    out = tmp_path / "migrated"
    r = _migrate(branches, out)
    assert r.exit_code == 0, r.output
    assert "ids from the Trainer's param groups of --source-arch" in r.output
    assert "2 param groups of 3, 4" in r.output and "1 start fresh (head.weight)" in r.output
    assert "training_args.bin (a pickled TrainingArguments object: its bytes copied, never loaded)" in r.output
    src = branches[2]
    for name in ("scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
        assert _sha(os.path.join(src, name)) == _sha(out / name), name
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # nothing staged is left behind
    saved = torch.load(out / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in saved["param_groups"]] == [3, 4]
    assert [g["weight_decay"] for g in saved["param_groups"]] == [0.1, 0.0]
    control, resumed = _resume_both(torch, branches, out, tmp_path)
    for new, old in KEPT.items():
        assert torch.equal(resumed[new], control[old]), new
    assert resumed["head.weight"].shape == (5, 4)


def test_ignoring_the_decay_split_breaks_resume_equivalence(torch, branches, tmp_path, monkeypatch):
    """The Trainer's groups replaced by model.parameters() cut to the same sizes: every check on
    shapes passes (the moments are all vectors of 4), and the resumed run no longer matches."""
    from ckpt_tool.arch import build_model
    from ckpt_tool.optim_state import trainer

    def model_order(spec, arch_args=None):
        right = trainer_groups(spec, arch_args)
        names = [n for n, _ in build_model(spec, arch_args, device="meta").named_parameters()]
        return tuple(names[: len(right[0])]), tuple(names[len(right[0]) :])

    trainer_groups = trainer.trainer_groups
    monkeypatch.setattr(trainer, "trainer_groups", model_order)
    out = tmp_path / "wrong"
    r = _migrate(branches, out)
    assert r.exit_code == 0, r.output
    control, resumed = _resume_both(torch, branches, out, tmp_path)
    assert not all(torch.equal(resumed[new], control[old]) for new, old in KEPT.items())


def test_trainer_groups_match_transformers_own(torch, branches):
    from transformers import Trainer

    from ckpt_tool.optim_state.trainer import trainer_groups

    path, module, _ = branches
    model = module.old()
    trainer = Trainer(model=model, args=_args("/nonexistent", 1))
    opt = trainer.create_optimizer()
    name = {id(p): n for n, p in model.named_parameters()}
    real = tuple(tuple(name[id(p)] for p in g["params"]) for g in opt.param_groups)
    assert trainer_groups(f"{path}:old") == real
    assert real[1] == ("a.bias", "ln.weight", "ln.bias", "b.bias", "gone.bias")


# --- a real transformers model ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def bert(tmp_path_factory, torch):
    """A 2-layer BertForSequenceClassification trained 4 steps by a real Trainer: checkpoint-4/."""
    from transformers import BertForSequenceClassification, Trainer

    d = tmp_path_factory.mktemp("hf_bert")
    cfg = tiny_bert_config(num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    Trainer(model=model, args=_args(d / "run", 4), train_dataset=_dataset(torch, "input_ids")).train()
    return str(d / "run" / "checkpoint-4")


def _by_name(torch, model, optimizer_file):
    """Each parameter's optimizer state by name, as the real Trainer builds and loads its optimizer."""
    from transformers import Trainer

    trainer = Trainer(model=model, args=_args("/nonexistent", 1))
    opt = trainer.create_optimizer()
    opt.load_state_dict(torch.load(optimizer_file, weights_only=True))
    return {n: opt.state.get(p, {}) for n, p in model.named_parameters()}


def test_bert_trainer_checkpoint_gets_a_new_head_and_resumes(torch, bert, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer

    out = tmp_path / "bert3"
    r = _run(
        "migrate", bert, "--arch", f"hf:{bert}", "--arch-arg", "num_labels=3", "--reinit-mismatched", "-o", str(out)
    )
    assert r.exit_code == 0, r.output
    assert "(the config.json beside the weights)" in r.output and "2 start fresh (classifier.weight" in r.output
    assert f"config.json: the target's, from {bert}/config.json, num_labels=3" in r.output
    assert BertConfig.from_pretrained(str(out)).num_labels == 3  # from_pretrained(out) builds the new model
    cfg = BertConfig.from_pretrained(bert)
    old = BertForSequenceClassification(cfg)
    before = _by_name(torch, old, os.path.join(bert, "optimizer.pt"))
    cfg.num_labels = 3
    new = BertForSequenceClassification(cfg)
    after = _by_name(torch, new, out / "optimizer.pt")
    kept = [n for n in after if not n.startswith("classifier.")]
    assert len(kept) == 39 and not after["classifier.weight"] and not after["classifier.bias"]
    for n in kept:  # every kept parameter's moments, found by name through transformers' own grouping
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(after[n][k], before[n][k]), (n, k)
    # the Trainer resumes from it: weights, optimizer, scheduler, RNG states, step counter
    trainer = Trainer(model=new, args=_args(tmp_path / "resume", 6), train_dataset=_dataset(torch, "input_ids"))
    trainer.train(resume_from_checkpoint=str(out))
    assert trainer.state.global_step == 6


def test_gpt2_with_a_layer_dropped_carries_tied_and_layernorm_state(torch, tmp_path):
    """GPT-2: the head is tied to the token embedding (one parameter, one id), its LayerNorms are
    named ln_* (kept out of weight decay by their type alone); the last block is dropped."""
    from transformers import GPT2LMHeadModel, Trainer

    cfg = tiny_gpt2_config()
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 32, (8,), generator=g) for _ in range(16)]
    data = [{"input_ids": t, "labels": t} for t in tokens]
    torch.manual_seed(0)
    Trainer(model=GPT2LMHeadModel(cfg), args=_args(tmp_path / "run", 4), train_dataset=data).train()
    src = str(tmp_path / "run" / "checkpoint-4")
    out = tmp_path / "one-layer"
    r = _run(
        "migrate", src, "--drop", "transformer.h.1", "--arch", f"hf:{src}", "--arch-arg", "n_layer=1", "-o", str(out)
    )
    assert r.exit_code == 0, r.output
    assert (
        "config.json: the target's" in r.output
        and "of 6, 10;" in r.output
        and "16 parameters carried, 12 dropped" in r.output
    )
    before = _by_name(torch, GPT2LMHeadModel(cfg), os.path.join(src, "optimizer.pt"))
    cfg.n_layer = 1
    new = GPT2LMHeadModel(cfg)
    after = _by_name(torch, new, out / "optimizer.pt")
    assert "transformer.wte.weight" in after and "lm_head.weight" not in after  # tied: one parameter
    for n in after:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(after[n][k], before[n][k]), (n, k)
    trainer = Trainer(model=new, args=_args(tmp_path / "resume", 6), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(out))
    assert trainer.state.global_step == 6


def test_bert_ids_in_model_order_are_refused(torch, bert, tmp_path, monkeypatch):
    from ckpt_tool.arch import build_model
    from ckpt_tool.optim_state import trainer

    def one_group(spec, arch_args=None):
        return tuple(n for n, _ in build_model(spec, arch_args, device="meta").named_parameters()), ()

    monkeypatch.setattr(trainer, "trainer_groups", one_group)
    r = _run("migrate", bert, "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and "param groups of [17, 24] parameters" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "out")


def test_bert_sharded_and_bin_weights_keep_their_layout(torch, bert, tmp_path):
    from transformers import BertForSequenceClassification

    for layout in ("sharded", "bin"):
        src = tmp_path / f"src-{layout}"
        shutil.copytree(bert, src)
        os.remove(src / "model.safetensors")
        if layout == "sharded":
            args = [str(src / "model.safetensors"), "--max-shard-size", "8KB"]
        else:
            args = [str(src / "pytorch_model.bin")]
        assert _run("convert", os.path.join(bert, "model.safetensors"), *args).exit_code == 0
        out = tmp_path / f"out-{layout}"
        r = _run("migrate", str(src), "--strip-prefix", "bert.", "--add-prefix", "bert.", "-o", str(out))
        assert r.exit_code == 0, r.output
        weights = {n for n in os.listdir(out) if n.startswith("model") or n.startswith("pytorch_model")}
        assert weights == {n for n in os.listdir(src) if n.startswith("model") or n.startswith("pytorch_model")}
        model = BertForSequenceClassification.from_pretrained(str(out))
        assert model.bert.embeddings.word_embeddings.weight.shape == (64, 16)


# --- outputs and refusals --------------------------------------------------------------------------


def test_output_directory_rules(torch, bert, tmp_path):
    out = tmp_path / "out"
    assert _run("migrate", bert, "-o", str(out)).exit_code == 0
    r = _run("migrate", bert, "-o", str(out))
    assert r.exit_code == 2 and "already exists; pass --force" in r.output, r.output
    before = os.stat(out / "optimizer.pt").st_mtime_ns
    r = _run("migrate", bert, "-o", str(out), "--force")
    assert r.exit_code == 0 and "replaces the Trainer checkpoint directory" in r.output, r.output
    assert os.stat(out / "optimizer.pt").st_mtime_ns != before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    r = _run("migrate", bert, "-o", str(other), "--force")
    assert r.exit_code == 2 and "replaces a Trainer checkpoint directory only" in r.output
    assert (other / "notes.txt").read_text() == "keep me"
    r = _run("migrate", bert, "-o", os.path.join(bert, "inner"))
    assert r.exit_code == 2 and "inside it" in r.output
    for flags in (["--in-place"], ["--max-shard-size", "1MB"]):
        r = _run("migrate", bert, "-o", str(tmp_path / "x"), *flags)
        assert r.exit_code == 2 and "written as a new directory" in r.output, r.output
    r = _run("migrate", bert, "-o", str(tmp_path / "dry"), "--dry-run")
    assert r.exit_code == 0 and "dry run: nothing written" in r.output and not os.path.exists(tmp_path / "dry")
    r = _run("migrate", bert, "-o", str(tmp_path / "slash") + "/")
    assert r.exit_code == 0 and os.path.isfile(tmp_path / "slash" / "optimizer.pt"), r.output
    # refused while staging (the wrong architecture: none of its parameters from the checkpoint)
    wide = ["--arch", f"hf:{bert}", "--arch-arg", "hidden_size=32", "--reinit-mismatched"]
    r = _run("migrate", bert, *wide, "-o", str(tmp_path / "wide"))
    assert r.exit_code == 2 and "probably not a checkpoint of this architecture" in r.output, r.output
    assert not os.path.exists(tmp_path / "wide") and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_without_an_architecture_the_optimizer_stops_with_exit_2(torch, bert, tmp_path):
    src = tmp_path / "noconfig"
    shutil.copytree(bert, src)
    os.remove(src / "config.json")
    r = _run("migrate", str(src), "--drop", "classifier", "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and "--source-arch SPEC, or --drop-optimizer" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "out")
    r = _run("migrate", str(src), "--drop", "classifier", "--drop-optimizer", "-o", str(tmp_path / "out"))
    assert r.exit_code == 0 and "optimizer.pt dropped (--drop-optimizer)" in r.output, r.output
    assert "optimizer.pt" not in os.listdir(tmp_path / "out")


def test_training_args_bin_is_copied_never_loaded(torch, bert, tmp_path):
    import pickle

    src = tmp_path / "evil"
    shutil.copytree(bert, src)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (src / "training_args.bin").write_bytes(pickle.dumps(Evil()))
    (src / "scaler.pt").write_bytes(pickle.dumps(Evil()))  # mixed precision's GradScaler state
    out = tmp_path / "out"
    r = _run("migrate", str(src), "-o", str(out))
    assert r.exit_code == 0 and "copied bit-identical: scaler.pt (GradScaler state)" in r.output, r.output
    assert not marker.exists()
    for name in ("training_args.bin", "scaler.pt"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_inspect_shows_a_trainer_checkpoint_and_its_optimizer(torch, bert):
    r = _run("inspect", bert)
    assert r.exit_code == 0, r.output
    assert "Hugging Face Trainer checkpoint (safetensors)" in r.output
    assert "optimizer optimizer: AdamW, 2 param groups, 41 parameters with state" in r.output
    assert "Trainer file training_args.bin" in r.output
    data = json.loads(_run("inspect", bert, "--json").output)["optimizers"][0]
    assert [g["params"] for g in data["groups"]] == [17, 24] and "param groups" in data["unmapped"]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _page_example(page, heading, command):
    """A section's scripts (by their first-line name), its ``command`` block and the text it prints."""
    import re

    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "commands", page)).read()
    section = text[text.index(heading) :]
    scripts = dict(re.findall(r"```python\n# (\S+\.py)\n(.*?)```", section.partition("\n## ")[0], re.S))
    run = re.search(rf"```bash\n(ckpt {command} .*?)\n```", section).group(1)
    printed = re.search(r"\(`tests/test_hf_trainer.py` runs .*?\):\n\n```text\n(.*?)\n```", section, re.S).group(1)
    return scripts, run, printed


def test_the_worked_example_prints_what_the_page_says(torch, tmp_path, monkeypatch):
    """docs/commands/migrate.md: its script, its command, its output, as written there; then
    docs/commands/diff.md's diff of the two directories."""
    import runpy
    import shlex

    scripts, command, printed = _page_example(
        "migrate.md", "### Worked example: a new head for a Trainer checkpoint", "migrate"
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "make_trainer_checkpoint.py").write_text(scripts["make_trainer_checkpoint.py"])
    runpy.run_path("make_trainer_checkpoint.py")
    r = _run(*shlex.split(command)[1:])
    assert r.exit_code == 0 and r.output.strip() == printed.strip(), r.output
    _, command, printed = _page_example("diff.md", "## Two training checkpoints: their optimizer states", "diff")
    r = _run(*shlex.split(command)[1:])
    assert r.exit_code == 1 and r.output.strip() == printed.strip(), r.output


def test_the_resume_example_prints_what_the_page_says(torch, tmp_path, monkeypatch):
    """docs/commands/finetune-check.md: its model, its Trainer run, its command and the check it shows."""
    import importlib
    import runpy
    import shlex
    import sys

    scripts, command, printed = _page_example(
        "finetune-check.md", "### Resuming a Hugging Face Trainer checkpoint's optimizer", "finetune-check"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
    # the page's module is named models: whatever an earlier test left under that name must not answer
    monkeypatch.delitem(sys.modules, "models", raising=False)
    importlib.invalidate_caches()
    runpy.run_path("train_images.py")
    sys.modules.pop("models", None)
    r = _run(*shlex.split(command)[1:])
    assert r.exit_code == 0 and "PASS: every check passed" in r.output, r.output
    assert printed.strip() in r.output


def test_a_directory_not_as_planned_is_never_renamed_into_place(torch, bert, tmp_path, monkeypatch):
    from ckpt_tool.optim_state import trainer

    copy = trainer._copy_verified
    monkeypatch.setattr(trainer, "_copy_verified", lambda src, dst: copy(src, dst) and "scheduler" not in src)
    out = tmp_path / "out"
    r = _run("migrate", bert, "-o", str(out))
    assert r.exit_code == 1 and f"not written: the Trainer checkpoint {out} failed" in r.output, r.output
    assert "1 written entry is not what the plan intended: scheduler.pt" in r.output
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    data = json.loads(_run("migrate", bert, "-o", str(out), "--json").output)
    assert data["ok"] is False and data["written"]["committed"] is False and not os.path.exists(out)


# --- diff of two Trainer directories: their optimizer.pt ------------------------------------------


def _optimizer_diff(a, b):
    r = _run("diff", a, b, "--json")
    assert r.exit_code in (0, 1), r.output
    return json.loads(r.output)["optimizer"]


def test_diff_of_trainer_directories_compares_their_optimizer_states(torch, bert, tmp_path):
    same = _optimizer_diff(bert, bert)
    assert same == {"source": [], "target": [], "differences": []}, same
    out = tmp_path / "bert3"
    r = _run(
        "migrate", bert, "--arch", f"hf:{bert}", "--arch-arg", "num_labels=3", "--reinit-mismatched", "-o", str(out)
    )
    assert r.exit_code == 0, r.output
    new_head = _optimizer_diff(bert, str(out))
    assert new_head["source"] == []
    assert new_head["target"] == ["optimizer: 2 parameters without state (classifier.weight, classifier.bias)"]
    assert new_head["differences"] == ["optimizer: state only in the checkpoint for classifier.bias, classifier.weight"]
    # another learning rate in the no-decay group, and one moment of the wrong shape
    bad = tmp_path / "bad"
    shutil.copytree(bert, bad)
    saved = torch.load(bad / "optimizer.pt", weights_only=True)
    saved["param_groups"][1]["lr"] = 0.5
    torch.save(saved, bad / "optimizer.pt")
    lr = _optimizer_diff(bert, str(bad))
    assert lr["differences"] == ["optimizer: group 1: lr 0.01 -> 0.5"], lr
    saved["state"][0]["exp_avg"] = torch.zeros(2)
    torch.save(saved, bad / "optimizer.pt")
    shape = _optimizer_diff(bert, str(bad))
    line = shape["target"][0]
    assert "id 0 is 'bert.embeddings.word_embeddings.weight' [" in line and "], but its exp_avg is [2]" in line, line
    text = _run("diff", bert, str(out)).output
    assert "optimizer state differs: optimizer: state only in the checkpoint for classifier.bias" in text


def test_diff_says_why_a_trainer_directory_without_config_is_not_mapped(torch, branches, tmp_path):
    """No config.json says what the model is: the ids are left unmapped, the groups still compared."""
    out = tmp_path / "migrated"
    assert _migrate(branches, out).exit_code == 0
    data = _optimizer_diff(branches[2], str(out))
    assert data["source"] == data["target"] != [], data
    assert data["source"][0].endswith("which only the architecture tells (no config.json beside the weights)")
    assert data["differences"] == ["optimizer: param groups of [4, 5] against [3, 4] parameters"], data


def test_diff_of_trainer_directories_goes_on_when_the_config_cannot_be_built(torch, bert, monkeypatch):
    from ckpt_tool.errors import UsageError
    from ckpt_tool.optim_state import trainer

    def no_transformers(spec, arch_args=None):
        raise UsageError(f"--arch {spec}: needs transformers, which is not installed")

    monkeypatch.setattr(trainer, "trainer_groups", no_transformers)
    data = _optimizer_diff(bert, bert)
    assert data["source"] == data["target"] and "needs transformers" in data["source"][0], data
    assert data["differences"] == []


# --- finetune-check --resume-optimizer of a Trainer directory --------------------------------------

IMAGES = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        # `ln` is kept out of weight decay by its type alone: only the model tells the Trainer's groups
        def __init__(self, num_classes=3):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.ln = nn.LayerNorm(4)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x, labels=None):
            logits = self.fc(self.ln(self.bn(self.conv(x)).relu().mean((2, 3))))
            if labels is None:
                return logits
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    def net(num_classes=3):
        return Net(num_classes)
""")


@pytest.fixture(scope="session")
def images(tmp_path_factory, torch):
    """An image classifier trained 4 steps by a real Trainer: (models file, checkpoint-4/)."""
    from transformers import Trainer

    d = tmp_path_factory.mktemp("hf_images")
    path, module = write_models(d, "images", IMAGES)
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(3, 8, 8, generator=g), "labels": i % 3} for i in range(16)]
    torch.manual_seed(0)
    Trainer(model=module.net(), args=_args(d / "run", 4), train_dataset=data).train()
    return path, str(d / "run" / "checkpoint-4")


def test_finetune_check_resumes_a_trainer_directorys_optimizer(torch, images):
    from ckpt_tool.arch import build_model
    from ckpt_tool.finetune.resume import read_resume
    from ckpt_tool.reader import open_checkpoint

    path, ckpt = images
    args = ["finetune-check", ckpt, "--arch", f"{path}:net", "--image-size", "8", "--max-steps", "2", "--json"]
    r = _run(*args, "--lr", "0.01", "--resume-optimizer")
    assert r.exit_code == 0, r.output
    checks = {c["name"]: c for c in json.loads(r.output)["checks"]}
    assert checks["optimizer resumed"]["status"] == "pass", checks
    assert checks["optimizer resumed"]["detail"] == "AdamW state of 8 parameters loaded"
    # each parameter's state is the one transformers itself gives it from optimizer.pt
    model = build_model(f"{path}:net")
    resume = read_resume(open_checkpoint(ckpt), "adam", path=ckpt, model=model)
    real = _by_name(torch, model, os.path.join(ckpt, "optimizer.pt"))
    assert resume.state.keys() == real.keys()
    for name, state in real.items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(resume.state[name][k], state[k]), (name, k)
    r = _run(*args, "--resume-optimizer", "--num-classes", "5")  # a new head: its two parameters start fresh
    detail = {c["name"]: c for c in json.loads(r.output)["checks"]}["optimizer resumed"]["detail"]
    assert detail == "AdamW state of 6 parameters loaded, 2 start fresh", detail


def test_resume_optimizer_of_a_trainer_directory_refuses_what_it_cannot_tie(torch, images, tmp_path):
    path, ckpt = images
    args = ["--image-size", "8", "--max-steps", "1", "--resume-optimizer"]
    bare = tmp_path / "no-optimizer"
    shutil.copytree(ckpt, bare)
    os.remove(bare / "optimizer.pt")
    r = _run("finetune-check", str(bare), "--arch", f"{path}:net", *args)
    assert r.exit_code == 2 and "the Trainer checkpoint holds no optimizer.pt" in r.output, r.output
    # groups of another model: sizes that do not fit, and no config.json to fall back on
    wrong = tmp_path / "models.py"
    wrong.write_text(IMAGES.replace("self.ln = nn.LayerNorm(4)", "self.ln = nn.Identity()"))
    r = _run("finetune-check", ckpt, "--arch", f"{wrong}:net", *args)
    assert r.exit_code == 2 and "param groups of [3, 5] parameters, but" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_an_arch_that_orders_same_shaped_parameters_otherwise_is_refused_not_trusted(torch, bert):
    """query, key and value are the same shape: a --arch model that registers query last fits the
    Trainer's group sizes and moment shapes, but config.json's model (the trained one) disagrees."""
    from transformers import BertForSequenceClassification

    from ckpt_tool.optim_state import MappingError
    from ckpt_tool.optim_state.trainer import read_trainer_optimizer, tie_trainer_ids
    from ckpt_tool.reader import open_checkpoint

    weights = open_checkpoint(bert)
    found, view = read_trainer_optimizer(bert, weights)
    by_config = tie_trainer_ids(found, view, bert)
    same = BertForSequenceClassification.from_pretrained(bert)
    assert tie_trainer_ids(found, view, bert, model=same).names == by_config.names  # agreeing: fine
    reordered = BertForSequenceClassification.from_pretrained(bert)
    for layer in reordered.bert.encoder.layer:
        attention = layer.attention.self
        query = attention._modules.pop("query")
        attention._modules["query"] = query  # now after key and value in named_parameters()
    with pytest.raises(MappingError, match="order the same-shaped parameters differently"):
        tie_trainer_ids(found, view, bert, model=reordered)
