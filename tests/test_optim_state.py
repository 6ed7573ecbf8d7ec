"""Optimizer state through surgery: resume equivalence in torch, id mappings, training layouts."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from click.testing import CliRunner
from model_files import write_models

from ckpt_tool.cli import main
from ckpt_tool.migrate import migrate
from ckpt_tool.plan import Plan, operation

# kept branches (a, b) never see the changed ones (gone, head, added): their updates depend on
# their own gradients and optimizer state only, so a resumed run must match the control bit for bit
MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
            self.gone = nn.Linear(4, 2)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x).sum() + self.b(x).pow(2).sum() + self.gone(x).sum() + self.head(x).pow(2).sum()

    class New(nn.Module):
        def __init__(self):
            super().__init__()
            self.a2 = nn.Linear(4, 4)
            self.b = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
            self.added = nn.Linear(4, 4)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            return self.a2(x).sum() + self.b(x).pow(2).sum() + self.added(x).sum() + self.head(x).pow(2).sum()

    def old():
        return Old()

    def new():
        return New()
""")
OPS = ["--strip-prefix", "module.", "--rename", r"^a\.=a2.", "--drop", "gone", "--fill-missing", "--reinit-mismatched"]
KEPT = {
    "a2.weight": "a.weight",
    "a2.bias": "a.bias",
    "b.0.weight": "b.0.weight",
    "b.0.bias": "b.0.bias",
    "b.1.weight": "b.1.weight",
    "b.1.bias": "b.1.bias",
}


@pytest.fixture(scope="session")
def models(tmp_path_factory, torch):
    return write_models(tmp_path_factory.mktemp("optim_models"), "optim_models", MODELS)


def _optimizer(torch, kind, params_groups):
    if kind == "sgd":
        return torch.optim.SGD(params_groups, lr=0.1, momentum=0.9, foreach=False)
    if kind == "adam":
        return torch.optim.Adam(params_groups, lr=0.01, foreach=False)
    return torch.optim.AdamW(params_groups, lr=0.01, weight_decay=0.1, foreach=False)


def _old_groups(m, kind):
    if kind != "adamw":  # one group, model.parameters()
        return [{"params": list(m.parameters())}]
    return [
        {"params": [*m.a.parameters(), *m.b.parameters()]},
        {"params": [*m.gone.parameters(), *m.head.parameters()], "lr": 0.05},
    ]


def _new_groups(m, kind):
    # an added parameter joins the group of the one before it; a re-initialised one keeps its group
    if kind != "adamw":
        return [{"params": list(m.parameters())}]
    return [
        {"params": [*m.a2.parameters(), *m.b.parameters(), *m.added.parameters()]},
        {"params": [*m.head.parameters()], "lr": 0.05},
    ]


def _steps(torch, model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(6, 4, generator=g)).backward()
        opt.step()


def _train(torch, models, tmp_path, kind, *, fqn=False):
    """A nested DataParallel-style training checkpoint after 3 steps."""
    torch.manual_seed(1)
    m = models[1].old()
    opt = _optimizer(torch, kind, _old_groups(m, kind))
    _steps(torch, m, opt, 3, seed=0)
    if fqn:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optim_sd = get_optimizer_state_dict(m, opt)
    else:
        optim_sd = opt.state_dict()
    path = tmp_path / f"{kind}.pth"
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in m.state_dict().items()},
            "optimizer": optim_sd,
            "epoch": 3,
            "scheduler": {"last_epoch": 3, "_last_lr": [0.01]},
        },
        path,
    )
    return str(path)


def _control(torch, models, path, kind, steps):
    """Resume the unmigrated checkpoint with the old model and optimizer."""
    saved = torch.load(path, weights_only=True)
    m = models[1].old()
    m.load_state_dict({k.removeprefix("module."): v for k, v in saved["model"].items()})
    opt = _optimizer(torch, kind, _old_groups(m, kind))
    if isinstance(next(iter(saved["optimizer"]["state"]), 0), str):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(m, opt, saved["optimizer"])
    else:
        opt.load_state_dict(saved["optimizer"])
    _steps(torch, m, opt, steps, seed=7)
    return m


def _resumed(torch, models, out, kind, steps, *, tamper=None):
    saved = torch.load(out, weights_only=True)  # the output stays a weights_only file
    m = models[1].new()
    m.load_state_dict(saved["model"], strict=True)
    opt = _optimizer(torch, kind, _new_groups(m, kind))
    state = saved["optimizer"]
    if tamper:
        tamper(state)
    if isinstance(next(iter(state["state"]), 0), str):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # new parameters have no state: torch's FQN loader needs strict=False to accept that
        set_optimizer_state_dict(m, opt, state, options=StateDictOptions(strict=False))
    else:
        opt.load_state_dict(state)
    _steps(torch, m, opt, steps, seed=7)
    return m, saved


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_resume_after_surgery_matches_the_unmigrated_run(torch, models, tmp_path, kind):
    src = _train(torch, models, tmp_path, kind)
    out = str(tmp_path / "out.pth")
    result = _run("migrate", src, *OPS, "--arch", f"{models[0]}:new", "-o", out)
    assert result.exit_code == 0, result.output
    assert "optimizer optimizer (" in result.output and "start fresh" in result.output
    control = _control(torch, models, src, kind, 4).state_dict()
    resumed, saved = _resumed(torch, models, out, kind, 4)
    for new, old in KEPT.items():
        assert torch.equal(resumed.state_dict()[new], control[old]), (kind, new)
    assert saved["epoch"] == 3 and saved["scheduler"] == {"last_epoch": 3, "_last_lr": [0.01]}
    # filled and re-initialised parameters start without state, as torch starts a new parameter
    groups = saved["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == ([8, 2] if kind == "adamw" else [10])
    assert len(saved["optimizer"]["state"]) == 6


def test_a_wrong_id_mapping_breaks_resume_equivalence(torch, models, tmp_path):
    src = _train(torch, models, tmp_path, "adam")
    out = str(tmp_path / "out.pth")
    assert _run("migrate", src, *OPS, "--arch", f"{models[0]}:new", "-o", out).exit_code == 0
    control = _control(torch, models, src, "adam", 4).state_dict()

    def swap(state):  # a.weight's and b.0.weight's state exchanged: same shapes, wrong parameters
        s = state["state"]
        s[0], s[2] = s[2], s[0]

    resumed, _ = _resumed(torch, models, out, "adam", 4, tamper=swap)
    assert not torch.equal(resumed.state_dict()["a2.weight"], control["a.weight"])


def test_fqn_keyed_state_maps_by_name(torch, models, tmp_path):
    src = _train(torch, models, tmp_path, "adamw", fqn=True)
    out = str(tmp_path / "out.pth")
    result = _run("migrate", src, *OPS, "--arch", f"{models[0]}:new", "-o", out)
    assert result.exit_code == 0, result.output
    assert "ids from names stored in the state" in result.output
    control = _control(torch, models, src, "adamw", 3).state_dict()
    resumed, saved = _resumed(torch, models, out, "adamw", 3)
    assert "a2.weight" in saved["optimizer"]["state"]
    for new, old in KEPT.items():
        assert torch.equal(resumed.state_dict()[new], control[old])


def test_source_arch_and_rename_only_arch_map_ids(torch, models, tmp_path):
    src = _train(torch, models, tmp_path, "sgd")
    out = str(tmp_path / "out.pth")
    r = _run("migrate", src, *OPS, "--arch", f"{models[0]}:new", "--source-arch", f"{models[0]}:old", "-o", out)
    assert r.exit_code == 0 and f"ids from --source-arch {models[0]}:old" in r.output, r.output
    renamed = str(tmp_path / "renamed.pth")
    r = _run("migrate", src, "--strip-prefix", "module.", "--arch", f"{models[0]}:old", "-o", renamed)
    assert r.exit_code == 0 and "(the plan only renames)" in r.output, r.output
    saved, before = torch.load(renamed, weights_only=True), torch.load(src, weights_only=True)
    for i, s in before["optimizer"]["state"].items():  # carried bit-identical
        assert torch.equal(saved["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])


def test_unmappable_ids_stop_with_exit_2_and_drop_optimizer_is_explicit(torch, models, tmp_path):
    torch.manual_seed(0)
    m = models[1].old()
    opt = torch.optim.SGD(m.head.parameters(), lr=0.1, momentum=0.9)  # a subset: ids say nothing
    m(torch.randn(3, 4)).backward()
    opt.step()
    src = tmp_path / "subset.pth"
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, src)
    out = str(tmp_path / "out.pth")
    r = _run("migrate", str(src), "--drop", "gone", "-o", out)
    assert r.exit_code == 2 and "2 parameter ids" in r.output and "--drop-optimizer" in r.output, r.output
    assert not os.path.exists(out)
    # a wrong --source-arch is refused by the shapes of the moments, not guessed
    r = _run("migrate", str(src), "--source-arch", f"{models[0]}:new", "-o", out)
    assert r.exit_code == 2, r.output
    r = _run("migrate", str(src), "--drop", "gone", "--drop-optimizer", "-o", out)
    assert r.exit_code == 0 and "extra dropped: optimizer (optimizer state (--drop-optimizer))" in r.output, r.output
    assert "optimizer" not in torch.load(out, weights_only=True)


def test_cast_casts_moments_but_not_step(torch, models, tmp_path):
    src = _train(torch, models, tmp_path, "adam")
    out = str(tmp_path / "bf16.pth")
    report = migrate(
        Plan(src, operations=(operation("strip_prefix", prefix="module."), operation("cast", dtype="bfloat16"))), out
    )
    assert report.ok and report.plan.optimizers[0].cast
    saved = torch.load(out, weights_only=True)
    before = torch.load(src, weights_only=True)["optimizer"]["state"][0]
    s = saved["optimizer"]["state"][0]
    assert s["exp_avg"].dtype == torch.bfloat16 and s["step"].dtype == torch.float32
    assert torch.equal(s["exp_avg"], before["exp_avg"].to(torch.bfloat16))


def test_plan_json_and_argv_keep_the_training_options():
    plan = Plan("a.pth", source_arch="resnet18", drop_optimizer=True, also_keys=("state_dict_ema",))
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert plan.command("b.pth") == (
        "ckpt migrate a.pth --source-arch resnet18 --drop-optimizer --also-key state_dict_ema -o b.pth"
    )
    from ckpt_tool.errors import InputError

    with pytest.raises(InputError, match="also_keys"):
        Plan.from_json({"also_keys": "ema"})


def test_safetensors_output_lists_the_optimizer_as_dropped(torch, models, tmp_path):
    src = _train(torch, models, tmp_path, "sgd")
    r = _run("migrate", src, "--strip-prefix", "module.", "-o", str(tmp_path / "w.safetensors"))
    assert r.exit_code == 0 and "extra dropped: optimizer (optimizer state: only a single .pth" in r.output
    r = _run("migrate", src, "--also-key", "x", "-o", str(tmp_path / "w2.safetensors"))
    assert r.exit_code == 2 and "only a single .pth" in r.output


def test_timm_checkpoint_saver_with_ema(torch, tmp_path):
    import timm
    from timm.utils import CheckpointSaver, ModelEmaV2

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3)
    ema = ModelEmaV2(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    ema.update(model)
    saver = CheckpointSaver(model, opt, model_ema=ema, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=0.5)
    src = str(tmp_path / "checkpoint-0.pth.tar")
    out = str(tmp_path / "head5.pth")
    r = _run(
        "migrate",
        src,
        "--reinit-mismatched",
        "--also-key",
        "state_dict_ema",
        "--arch",
        "timm:resnet10t",
        "--arch-arg",
        "num_classes=5",
        "-o",
        out,
    )
    assert r.exit_code == 0, r.output
    assert "also state_dict_ema: the same operations" in r.output
    saved = torch.load(out, weights_only=True)
    new = timm.create_model("resnet10t", num_classes=5)
    new_ema = ModelEmaV2(new)
    new.load_state_dict(saved["state_dict"])
    new_ema.module.load_state_dict(saved["state_dict_ema"])
    new_opt = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
    new_opt.load_state_dict(saved["optimizer"])
    before = torch.load(src, weights_only=False)
    assert torch.equal(saved["state_dict_ema"]["conv1.0.weight"], before["state_dict_ema"]["conv1.0.weight"])
    assert saved["state_dict_ema"]["fc.weight"].shape == (5, 512)
    assert saved["epoch"] == 0 and saved["metric"] == 0.5
    n = len(list(new.parameters()))
    assert len(saved["optimizer"]["state"]) == n - 2  # the new head starts fresh


LIGHTNING = textwrap.dedent("""
    import torch
    import lightning as L

    class Old(L.LightningModule):
        def __init__(self, classes=3):
            super().__init__()
            self.body = torch.nn.Linear(4, 8)
            self.head = torch.nn.Linear(4, classes)

        def training_step(self, batch, _):
            x, y = batch  # two branches: the body's updates never see the head
            return self.body(x).pow(2).mean() + torch.nn.functional.cross_entropy(self.head(x), y)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=0.01)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)]

    class New(Old):
        def __init__(self):
            super().__init__(classes=5)
            self.encoder = self.body
            del self.body

        def training_step(self, batch, _):
            x, y = batch
            return self.encoder(x).pow(2).mean() + torch.nn.functional.cross_entropy(self.head(x), y)

    def old():
        return Old()

    def new():
        return New()
""")


def test_lightning_checkpoint_resumes_in_a_real_trainer(torch, tmp_path):
    """A renamed layer and a new head: Lightning restores it all, and the kept layer matches a
    control resumed from the unmigrated checkpoint bit for bit."""
    import lightning as L

    path, models = write_models(tmp_path, "lit_models", LIGHTNING)

    def data():
        g = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))
        return torch.utils.data.DataLoader(ds, batch_size=4)

    kw = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=1, **kw)
    trainer.fit(models.old(), data())
    src = str(tmp_path / "lit.ckpt")
    trainer.save_checkpoint(src)
    out = str(tmp_path / "lit2.ckpt")
    archs = ["--source-arch", f"{path}:old", "--arch", f"{path}:new"]
    r = _run("migrate", src, "--rename", r"^body\.=encoder.", "--reinit-mismatched", *archs, "-o", out)
    assert r.exit_code == 0, r.output
    assert "optimizer optimizer_states/0 (Adam" in r.output and "body.weight -> encoder.weight" in r.output
    assert "2 start fresh (head.weight, head.bias)" in r.output
    saved, before = torch.load(out, weights_only=True), torch.load(src, weights_only=True)
    assert saved["lr_schedulers"] == before["lr_schedulers"] and saved["global_step"] == 4
    assert saved["callbacks"] == before["callbacks"] and saved["loops"] == before["loops"]
    assert sorted(saved["state_dict"]) == ["encoder.bias", "encoder.weight", "head.bias", "head.weight"]
    opt, old_opt = saved["optimizer_states"][0], before["optimizer_states"][0]
    # New's parameters() order: head (re-initialised, no state), then the renamed body
    assert sorted(opt["state"]) == [2, 3]
    assert all(torch.equal(opt["state"][i + 2]["exp_avg"], old_opt["state"][i]["exp_avg"]) for i in (0, 1))
    control, resumed = models.old(), models.new()
    L.Trainer(max_epochs=2, **kw).fit(control, data(), ckpt_path=src)
    L.Trainer(max_epochs=2, **kw).fit(resumed, data(), ckpt_path=out)  # Lightning restores it all
    assert resumed.trainer.global_step == 8 and resumed.head.weight.shape == (5, 4)
    for name in ("weight", "bias"):
        assert torch.equal(getattr(resumed.encoder, name), getattr(control.body, name)), name


def test_inspect_shows_groups_hyper_parameters_and_mapped_names(torch, models, tmp_path):
    src = _train(torch, models, tmp_path, "adamw")
    r = _run("inspect", src)
    assert r.exit_code == 0, r.output
    assert "optimizer optimizer: AdamW, 2 param groups, 10 parameters with state" in r.output
    assert "ids mapped by the state dict" in r.output
    line = next(x for x in r.output.splitlines() if x.strip().startswith("0  module.a.weight"))
    assert "exp_avg [4, 4] float32" in line and "step [] float32" in line
    data = json.loads(_run("inspect", src, "--json").output)["optimizers"][0]
    assert [g["params"] for g in data["groups"]] == [6, 4] and data["groups"][1]["hyper"]["lr"] == 0.05
    assert {s["parameter"] for s in data["state"] if s["group"] == 1} == {
        "module.head.weight",
        "module.head.bias",
        "module.gone.weight",
        "module.gone.bias",
    }


def test_inspect_says_why_ids_are_not_mapped(torch, models, tmp_path):
    m = models[1].old()
    opt = torch.optim.SGD(m.head.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(3, 4)).backward()
    opt.step()
    src = tmp_path / "subset.pth"
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, src)
    data = json.loads(_run("inspect", str(src), "--json").output)["optimizers"][0]
    assert data["mapped_by"] == "" and "2 parameter ids, but" in data["unmapped"]
    assert {s["parameter"] for s in data["state"]} == {""}


def test_finetune_check_resumes_the_carried_optimizer_state(torch, tmp_path):
    from make_fixtures import tiny_cnn

    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    src = tmp_path / "train.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}, src)
    out = str(tmp_path / "resumable.pth")
    arch = os.path.join(os.path.dirname(__file__), "..", "fixtures", "make_fixtures.py") + ":tiny_cnn"
    r = _run("migrate", str(src), "--strip-prefix", "module.", "--arch", arch, "-o", out)
    assert r.exit_code == 0, r.output
    common = ["finetune-check", out, "--arch", arch, "--image-size", "16", "--max-steps", "2", "--lr", "0.01", "--json"]
    r = _run(*common, "--resume-optimizer")
    assert r.exit_code == 0, r.output
    checks = {c["name"]: c for c in json.loads(r.output)["checks"]}
    assert checks["optimizer resumed"]["status"] == "pass"
    assert checks["optimizer resumed"]["detail"].startswith(f"Adam state of {len(list(model.parameters()))} parameters")
    r = _run(*common, "--resume-optimizer", "--optimizer", "sgd")
    assert r.exit_code == 2 and "holds Adam state" in r.output, r.output


def test_diff_of_two_training_checkpoints_reports_optimizer_differences(torch, models, tmp_path):
    src = _train(torch, models, tmp_path, "adamw")
    same = str(tmp_path / "same.pth")
    assert _run("migrate", src, "-o", same).exit_code == 0
    r = _run("diff", src, same)
    assert "optimizer state: the same parameters with state, shapes and hyper-parameters" in r.output, r.output
    # a moment of the wrong shape, a parameter without state, another learning rate
    saved = torch.load(src, weights_only=True)
    state = saved["optimizer"]["state"]
    state[0]["exp_avg"] = torch.zeros(2, 2)
    del state[9]
    saved["optimizer"]["param_groups"][1]["lr"] = 0.5
    bad = str(tmp_path / "bad.pth")
    torch.save(saved, bad)
    data = json.loads(_run("diff", src, bad, "--json").output)["optimizer"]
    assert any("exp_avg is [2, 2]" in line for line in data["target"]), data
    assert "group 1: lr 0.05 -> 0.5" in " ".join(data["differences"])
    saved = torch.load(src, weights_only=True)
    del saved["optimizer"]["state"][9]
    torch.save(saved, bad)
    data = json.loads(_run("diff", src, bad, "--json").output)["optimizer"]
    assert data["target"] == ["optimizer: 1 parameters without state (module.head.bias)"]
    assert data["differences"] == ["optimizer: state only in the checkpoint for module.head.bias"]


def test_verification_compares_every_carried_tensor_by_value(torch, models, tmp_path):
    from dataclasses import replace

    from ckpt_tool.optim_state import training_state, verify_carried
    from ckpt_tool.plan import apply, initial_state
    from ckpt_tool.reader import open_checkpoint
    from ckpt_tool.writer import Written

    src = _train(torch, models, tmp_path, "adam")
    out = str(tmp_path / "out.pth")
    plan = Plan(src, operations=(operation("strip_prefix", prefix="module."),))
    report = migrate(plan, out)
    assert report.ok and report.verification.checked == 13 + 30  # the state dict, then 10 x (step, exp_avg, exp_avg_sq)
    ckpt = open_checkpoint(src)
    final = apply(plan.operations, initial_state(ckpt.tensors)).state
    carried = training_state(ckpt, plan, final, None, "pth")
    written = Written(out, "pth", (out,), 0, 0)
    cast = lambda data, source, dtype: data  # noqa: E731 - nothing is cast here
    assert verify_carried(written, carried, target_chunks=iter, cast=cast) == ([], 30)
    # the planned source of one moment swapped for another of the same shape: caught by value
    a, b = "@optimizer/state/0/exp_avg", "@optimizer/state/0/exp_avg_sq"
    carried.state[a], carried.state[b] = replace(carried.state[b], key=a), replace(carried.state[a], key=b)
    differ, _ = verify_carried(written, carried, target_chunks=iter, cast=cast)
    assert sorted(differ) == [a, b]


def test_also_key_errors_are_one_line(torch, models, tmp_path):
    src = _train(torch, models, tmp_path, "sgd")
    r = _run("migrate", src, "--also-key", "model", "-o", str(tmp_path / "o.pth"))
    assert r.exit_code == 2 and "is the state dict itself" in r.output, r.output
    r = _run("migrate", src, "--also-key", "nowhere", "-o", str(tmp_path / "o.pth"))
    assert r.exit_code == 2 and "no state dict at --key 'nowhere'" in r.output, r.output
