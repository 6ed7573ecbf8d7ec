"""``migrate`` end to end: the issue's scenarios, each ending with a strict load into the target, checked by torch."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from migrate_helpers import (  # noqa: F401 - fixtures are found by name
    resnet_fixture,
    same_bytes,
    save_resnet,
    signature_cache_fixture,
    temp_files,
    write_factories,
)

from ckpt_tool.errors import FormatError, InputError, KeyPathError, OutputError, UsageError
from ckpt_tool.migrate import cast_bytes, convert, migrate
from ckpt_tool.plan import Plan, operation


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    return write_factories(str(tmp_path_factory.mktemp("targets")))


@pytest.fixture(scope="module")
def vgg16(models):
    """The session's vgg16 state dict (~550 MB)."""
    return models.saved("vgg16")


def strict_load(model, state) -> None:
    """The ground truth: torch itself, strict."""
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def build(spec: str, seed: int = 0, **kwargs):
    import torch

    from ckpt_tool.arch import build_model

    torch.manual_seed(seed)
    return build_model(spec, kwargs)


# --- the scenarios ----------------------------------------------------------------------------------


def test_vgg16_with_added_layer_fill_missing(vgg16, targets, tmp_path, torch):
    from safetensors import safe_open

    out = str(tmp_path / "linder.safetensors")
    spec = f"{targets}:vgg16_add_linder"
    report = migrate(Plan(vgg16, arch=spec, operations=(operation("fill_missing"),)), out, seed=3)
    assert report.ok and report.verification.loads
    assert [(t.key, t.reason) for t in report.plan.initialised] == [
        ("classifier.add_linder.weight", "fill_missing"),
        ("classifier.add_linder.bias", "fill_missing"),
    ]
    assert report.plan.steps[0].added == ("classifier.add_linder.weight", "classifier.add_linder.bias")
    target = build(spec, seed=3)
    expected_init = {k: v.clone() for k, v in target.state_dict().items() if "add_linder" in k}
    with safe_open(out, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    strict_load(target, state)
    for k, v in expected_init.items():  # the target's own initialiser with the seed
        assert same_bytes(state[k], v), k
    source = torch.load(vgg16, weights_only=True, mmap=True)
    assert same_bytes(state["classifier.6.weight"], source["classifier.6.weight"])
    assert same_bytes(state["features.0.weight"], source["features.0.weight"])


def test_vgg16_without_classifier_6_by_drop(vgg16, targets, tmp_path, torch):
    out = str(tmp_path / "headless.pth")
    spec = f"{targets}:vgg16_without_head"
    report = migrate(Plan(vgg16, arch=spec, operations=(operation("drop", prefix="classifier.6"),)), out)
    assert report.ok and report.plan.steps[0].dropped == ("classifier.6.weight", "classifier.6.bias")
    state = torch.load(out, weights_only=True, mmap=True)
    strict_load(build(spec), state)
    source = torch.load(vgg16, weights_only=True, mmap=True)
    assert all(same_bytes(state[k], source[k]) for k in state)


def test_vgg16_without_classifier_6_by_drop_unexpected(vgg16, targets, tmp_path, torch):
    out = str(tmp_path / "headless.safetensors")
    spec = f"{targets}:vgg16_without_head"
    plan = Plan(vgg16, arch=spec, operations=(operation("drop_unexpected"),))
    dry = migrate(plan, out, dry_run=True)
    assert dry.dry_run and dry.plan.diff.loads and not os.path.exists(out)
    report = migrate(plan, out)
    assert report.ok and report.plan.steps[0].dropped == ("classifier.6.weight", "classifier.6.bias")
    from safetensors.torch import load_file

    strict_load(build(spec), load_file(out))


def test_resnet18_to_10_classes_reinit_mismatched(resnet, tmp_path, torch):
    out = str(tmp_path / "r10.pth")
    plan = Plan(resnet, arch="resnet18", arch_args={"num_classes": 10}, operations=(operation("reinit_mismatched"),))
    report = migrate(plan, out, seed=7)
    assert report.ok and report.verification.loads
    assert report.plan.steps[0].reinitialised == ("fc.weight", "fc.bias")
    state = torch.load(out, weights_only=True)
    target = build("resnet18", seed=7, num_classes=10)
    init = {k: v.clone() for k, v in target.state_dict().items()}
    strict_load(target, state)
    assert same_bytes(state["fc.weight"], init["fc.weight"]) and same_bytes(state["fc.bias"], init["fc.bias"])
    source = torch.load(resnet, weights_only=True)
    assert same_bytes(state["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"])
    # the same seed gives the same values; another seed does not
    again = migrate(plan, str(tmp_path / "again.pth"), seed=7)
    other = migrate(plan, str(tmp_path / "other.pth"), seed=8)
    assert again.ok and other.ok
    assert same_bytes(torch.load(str(tmp_path / "again.pth"), weights_only=True)["fc.weight"], state["fc.weight"])
    assert not torch.equal(torch.load(str(tmp_path / "other.pth"), weights_only=True)["fc.weight"], state["fc.weight"])


def test_without_reinit_the_verification_fails_and_says_why(resnet, tmp_path):
    out = str(tmp_path / "bad.safetensors")
    report = migrate(Plan(resnet, arch="resnet18", arch_args={"num_classes": 10}), out)
    assert os.path.exists(out)  # written, but reported
    assert not report.ok and not report.verification.loads
    assert [(m.key, m.shape, m.target_shape) for m in report.verification.diff.mismatched] == [
        ("fc.weight", (1000, 512), (10, 512)),
        ("fc.bias", (1000,), (10,)),
    ]
    assert "size mismatch" in report.verification.error


def test_dataparallel_strip_prefix(tmp_path, torch):
    src = str(tmp_path / "dp.pth")
    sd = save_resnet(src, wrap="dp")
    out = str(tmp_path / "plain.safetensors")
    report = migrate(Plan(src, arch="resnet18", operations=(operation("strip_prefix", prefix="module."),)), out)
    assert report.ok and len(report.plan.steps[0].renamed) == len(sd)
    from safetensors.torch import load_file

    state = load_file(out)
    strict_load(build("resnet18"), state)
    assert all(same_bytes(state[k.removeprefix("module.")], v) for k, v in sd.items())


def test_nested_checkpoint_with_key(tmp_path, torch):
    src = str(tmp_path / "nested.pth")
    sd = save_resnet(src, wrap="nested")
    out = str(tmp_path / "flat.pth")
    report = migrate(Plan(src, key="model_state_dict", arch="resnet18"), out)
    assert report.ok
    # a training checkpoint into a .pth is carried whole: optimizer state (its ids following the
    # parameters), epoch and config beside the state dict
    assert report.plan.extras_dropped == {}
    assert report.plan.optimizers[0].kind == "SGD" and len(report.plan.optimizers[0].carried) == 62
    state = torch.load(out, weights_only=True)
    assert list(state["model_state_dict"]) == list(sd) and state["epoch"] == 5
    assert state["config"] == {"lr": 0.1, "tags": ["a"]} and len(state["optimizer_state_dict"]["state"]) == 62
    strict_load(build("resnet18"), state["model_state_dict"])


def test_keep_extras_pth_and_safetensors(tmp_path, torch):
    from safetensors import safe_open

    src = str(tmp_path / "nested.pth")
    sd = save_resnet(src, wrap="nested")
    out = str(tmp_path / "kept.pth")
    report = migrate(Plan(src, key="model_state_dict"), out, keep_extras=True)
    assert report.plan.extras_kept == ("optimizer_state_dict", "epoch", "config")
    assert report.plan.extras_dropped == {}
    loaded = torch.load(out, weights_only=True)
    assert sorted(loaded) == ["config", "epoch", "model_state_dict", "optimizer_state_dict"]
    assert loaded["epoch"] == 5 and loaded["config"] == {"lr": 0.1, "tags": ["a"]}
    assert all(same_bytes(loaded["model_state_dict"][k], v) for k, v in sd.items())
    out2 = str(tmp_path / "kept.safetensors")
    migrate(Plan(src, key="model_state_dict"), out2, keep_extras=True)
    with safe_open(out2, framework="pt") as f:
        meta = f.metadata()
    assert meta["epoch"] == "5" and json.loads(meta["config"]) == {"lr": 0.1, "tags": ["a"]}
    assert "optimizer_state_dict" not in meta and meta["ckpt.key"] == "model_state_dict"


def test_roundtrip_pth_safetensors_pth_bit_identical(tmp_path, torch):
    from conftest import mixed_dtype_state

    sd = mixed_dtype_state(torch)
    sd["nan"] = torch.tensor([float("nan"), float("inf"), -0.0])
    src = str(tmp_path / "mixed.pth")
    torch.save(sd, src)
    mid = str(tmp_path / "mixed.safetensors")
    back = str(tmp_path / "back.pth")
    first = convert(src, mid)
    convert(mid, back)
    from safetensors.torch import load_file

    for state in (load_file(mid), torch.load(back, weights_only=True)):
        assert list(state) == list(sd)
        for k, v in sd.items():
            assert same_bytes(state[k], v), k
    # transposed and sliced view one storage: copies in safetensors, said so
    assert [(s.keys, s.how) for s in first.plan.shared] == [(("transposed", "sliced"), "copies")]


def test_views_of_one_storage_stay_one_storage_in_pth(tmp_path, torch):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"whole": base, "t": base.t(), "slice": base[1:3, 2:5]}
    src = str(tmp_path / "views.pth")
    torch.save(sd, src)
    out = str(tmp_path / "out.pth")
    report = convert(src, out)
    assert [(s.keys, s.how) for s in report.plan.shared] == [(("whole", "t", "slice"), "one storage")]
    state = torch.load(out, weights_only=True)
    for k, v in sd.items():
        assert torch.equal(state[k], v) and state[k].stride() == v.stride(), k
    assert len({v.untyped_storage().data_ptr() for v in state.values()}) == 1


def test_legacy_format_converts(tmp_path, torch):
    sd = {"w": torch.randn(3, 4), "n": torch.tensor(3)}
    src = str(tmp_path / "legacy.pth")
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    out = str(tmp_path / "new.safetensors")
    convert(src, out)
    from safetensors.torch import load_file

    state = load_file(out)
    assert all(same_bytes(state[k], v) for k, v in sd.items())


@pytest.fixture
def tied(targets, tmp_path, torch):
    """(spec, model, saved state dict path) of a model whose proj.weight is embed.weight."""
    spec = f"{targets}:tied"
    model = build(spec)
    src = str(tmp_path / "tied.pth")
    torch.save(model.state_dict(), src)
    return spec, model, src


def test_tied_weights_pth_written_once(tied, tmp_path, torch):
    spec, _, src = tied
    out = str(tmp_path / "out.pth")
    report = migrate(Plan(src, arch=spec), out)
    assert report.ok
    assert [(s.keys, s.how) for s in report.plan.shared] == [(("embed.weight", "proj.weight"), "one storage")]
    state = torch.load(out, weights_only=True)
    assert state["embed.weight"].untyped_storage().data_ptr() == state["proj.weight"].untyped_storage().data_ptr()
    import zipfile

    assert len([n for n in zipfile.ZipFile(out).namelist() if "/data/" in n]) == 1
    strict_load(build(spec), state)


def test_tied_weights_safetensors_alias(tied, tmp_path, torch):
    from safetensors import safe_open
    from safetensors.torch import load_model

    spec, model, src = tied
    out = str(tmp_path / "out.safetensors")
    report = migrate(Plan(src, arch=spec), out)
    assert report.ok and report.verification.loads
    assert [(s.keys, s.written_as, s.how) for s in report.plan.shared] == [
        (("embed.weight", "proj.weight"), "embed.weight", "alias")
    ]
    with safe_open(out, framework="pt") as f:
        assert list(f.keys()) == ["embed.weight"]
        assert json.loads(f.metadata()["ckpt.aliases"]) == {"proj.weight": "embed.weight"}
    fresh = build(spec, seed=1)
    load_model(fresh, out)  # safetensors' own loader re-ties the alias
    assert torch.equal(fresh.proj.weight, model.embed.weight)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cast_matches_torch_bit_for_bit(tmp_path, torch, dtype):
    src_sd = {
        "f32": torch.randn(1000) * 1000,
        "special": torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, 65504.0, 70000.0, -0.0]),
        "f64": torch.randn(50, dtype=torch.float64),
        "bf16": torch.randn(20).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(12),
        "mask": torch.tensor([True, False]),
    }
    src = str(tmp_path / "c.pth")
    torch.save(src_sd, src)
    out = str(tmp_path / "c.safetensors")
    report = migrate(Plan(src, operations=(operation("cast", dtype=dtype),)), out)
    from safetensors.torch import load_file

    state = load_file(out)
    for k, v in src_sd.items():
        want = v.to(getattr(torch, dtype)) if v.is_floating_point() else v
        if k == "special" and dtype == "bfloat16":
            # NaN payloads differ between torch's own code paths (0xFFFF vectorised, 0x7FC0 scalar): NaN is NaN
            nan = torch.isnan(want)
            assert torch.equal(torch.isnan(state[k]), nan) and same_bytes(state[k][~nan], want[~nan])
            continue
        assert same_bytes(state[k], want), k
    # values it computes are checked (float32 -> float32 is no cast: those bytes are only copied)
    assert ("special" in report.nonfinite) is (dtype != "float32")
    assert report.ok is (dtype == "float32")


def test_cast_bytes_rounds_to_nearest_even(torch):
    import numpy as np

    values = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38, -1.5], dtype=torch.float32)
    got = cast_bytes(values.numpy().tobytes(), "float32", "bfloat16")
    assert (
        np.frombuffer(got, "<u2").tolist() == values.to(torch.bfloat16).view(torch.int16).numpy().astype("<u2").tolist()
    )


def test_nonfinite_values_fail_the_check(targets, tmp_path, torch):
    spec = f"{targets}:with_nan"
    src = str(tmp_path / "nan.pth")
    torch.save(build(spec).state_dict(), src)
    report = migrate(Plan(src, arch=spec), str(tmp_path / "o.safetensors"))
    assert report.verification.loads
    assert report.nonfinite == ("bias",) and not report.ok


def test_sharded_output_round_trips(resnet, tmp_path, torch):
    out = str(tmp_path / "model.safetensors")
    report = migrate(Plan(resnet, arch="resnet18"), out, max_shard_size=10 * 10**6)
    files = report.written.files
    assert len(files) > 2 and files[-1] == out + ".index.json" and report.ok
    with open(files[-1]) as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == report.written.tensor_bytes
    assert len(index["metadata"]["ckpt.source_sha256"]) == 64 and index["metadata"]["format"] == "pt"
    from safetensors.torch import load_file

    state = {}
    for f in files[:-1]:
        assert os.path.getsize(f) < 10 * 10**6 + 10**5 or len(load_file(f)) == 1
        state.update(load_file(f))
    source = torch.load(resnet, weights_only=True)
    assert all(same_bytes(state[k], v) for k, v in source.items()) and len(state) == len(source)


def test_provenance_metadata(resnet, tmp_path):
    from safetensors import safe_open

    out = str(tmp_path / "p.safetensors")
    report = migrate(Plan(resnet, operations=(operation("drop", prefix="fc"),)), out)
    with open(resnet, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    from ckpt_tool import __version__

    assert meta["ckpt.source"] == "resnet18.pth" and meta["ckpt.source_sha256"] == digest
    assert json.loads(meta["ckpt.operations"]) == [{"op": "drop", "prefix": "fc"}]
    assert meta["ckpt.version"] == __version__ and meta["format"] == "pt"
    assert report.source_sha256 == digest


def test_in_place_keeps_a_backup(tmp_path, torch):
    src = str(tmp_path / "dp.pth")
    save_resnet(src, wrap="dp")
    with open(src, "rb") as f:
        before = f.read()
    report = migrate(Plan(src, operations=(operation("strip_prefix", prefix="module."),)), None, in_place=True)
    assert report.written.backup == src + ".bak"
    with open(src + ".bak", "rb") as f:
        assert f.read() == before
    assert all(not k.startswith("module.") for k in torch.load(src, weights_only=True))
    assert temp_files(str(tmp_path)) == []


def test_input_is_never_overwritten_without_in_place(resnet):
    with pytest.raises(OutputError, match="is the input file"):
        migrate(Plan(resnet), resnet, force=True)


def test_existing_output_needs_force(resnet, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        migrate(Plan(resnet), str(out))
    assert out.read_bytes() == b"keep me"
    assert migrate(Plan(resnet), str(out), force=True).written is not None


def test_interrupted_migration_leaves_old_file(resnet, tmp_path, monkeypatch):
    import ckpt_tool.writer as writer

    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    calls = []

    def failing_copy(o, source, offset, nbytes):
        calls.append(nbytes)
        if len(calls) == 5:
            raise KeyboardInterrupt
        o.write(b"\0" * nbytes)

    monkeypatch.setattr(writer, "_copy_range", failing_copy)
    with pytest.raises(KeyboardInterrupt):
        migrate(Plan(resnet), str(out), force=True)
    assert out.read_bytes() == b"old" and temp_files(str(tmp_path)) == []


SLOW_MIGRATE = """
import sys, time
import ckpt_tool.writer as writer
real = writer._copy_range
def slow(*args):
    real(*args)
    time.sleep(0.2)
writer._copy_range = slow
from ckpt_tool.cli import main
sys.argv = ["ckpt", "migrate", sys.argv[1], "-o", sys.argv[2], "--force"]
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_process_never_leaves_a_partial_output(resnet, tmp_path, sig):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MIGRATE, resnet, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 60
    while not temp_files(str(tmp_path)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert temp_files(str(tmp_path)), "the write never started"
    time.sleep(0.3)
    proc.send_signal(sig)
    code = proc.wait(30)
    assert out.read_bytes() == b"old"
    if sig == signal.SIGINT:
        assert code == 130 and b"interrupted" in proc.stderr.read()
        assert temp_files(str(tmp_path)) == []  # cleaned up on Ctrl-C
    else:
        assert code == -signal.SIGKILL  # nothing can clean up after SIGKILL; the final name is still intact


def test_streaming_copy_never_imports_torch(resnet, tmp_path):
    code = (
        "import sys\nfrom ckpt_tool.migrate import migrate\nfrom ckpt_tool.plan import Plan, operation\n"
        f"r = migrate(Plan({resnet!r}, operations=(operation('drop', prefix='fc'),)), {str(tmp_path / 'o.pth')!r})\n"
        f"migrate(Plan({resnet!r}), {str(tmp_path / 'o.safetensors')!r})\n"
        "assert r.plan.streamed\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- bad input -------------------------------------------------------------------------------------


def test_missing_source(tmp_path):
    with pytest.raises(InputError, match="no such file|cannot be read"):
        migrate(Plan(str(tmp_path / "nope.pth")), str(tmp_path / "o.pth"))


def test_truncated_source(resnet, tmp_path):
    bad = tmp_path / "trunc.pth"
    with open(resnet, "rb") as f:
        bad.write_bytes(f.read()[: 1 << 20])
    with pytest.raises(InputError):
        migrate(Plan(str(bad)), str(tmp_path / "o.pth"))
    assert not os.path.exists(tmp_path / "o.pth")


def test_empty_source(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        migrate(Plan(str(empty)), str(tmp_path / "o.pth"))


def test_wrong_key(tmp_path):
    src = str(tmp_path / "nested.pth")
    save_resnet(src, wrap="nested")
    with pytest.raises(KeyPathError, match="no state dict at --key 'model'"):
        migrate(Plan(src, key="model"), str(tmp_path / "o.pth"))


def test_policy_without_arch(resnet, tmp_path):
    with pytest.raises(UsageError, match="need the target"):
        migrate(Plan(resnet, operations=(operation("fill_missing"),)), str(tmp_path / "o.pth"))


def test_dropping_everything(resnet, tmp_path):
    with pytest.raises(UsageError, match="leave no tensors"):
        migrate(Plan(resnet, operations=(operation("exclude", pattern="."),)), str(tmp_path / "o.pth"))


def test_no_output(resnet):
    with pytest.raises(UsageError, match="no output given"):
        migrate(Plan(resnet))


def test_unknown_architecture(resnet, tmp_path):
    from ckpt_tool.errors import ArchError

    with pytest.raises(ArchError, match="not a torchvision model"):
        migrate(Plan(resnet, arch="resnet_nope"), str(tmp_path / "o.pth"))


def test_meta_tensor_without_bytes(tmp_path, torch):
    src = str(tmp_path / "meta.pth")
    torch.save({"w": torch.empty(3, device="meta"), "b": torch.ones(2)}, src)
    with pytest.raises(FormatError, match="'w' has no stored bytes"):
        migrate(Plan(src), str(tmp_path / "o.pth"))
    assert migrate(Plan(src, operations=(operation("drop", prefix="w"),)), str(tmp_path / "o.pth")).written


def test_sharded_source_converts_back_to_one_file(resnet, tmp_path, torch):
    index = convert(resnet, str(tmp_path / "model.safetensors"), max_shard_size=10 * 10**6).written.path
    assert index.endswith(".index.json")
    out = str(tmp_path / "one.pth")
    report = convert(index, out)
    assert report.written.files == (out,)
    a, b = torch.load(resnet, weights_only=True), torch.load(out, weights_only=True)
    assert list(a) == list(b) and all(same_bytes(a[k], b[k]) for k in a)
    with pytest.raises(UsageError, match="--in-place rewrites a single-file input"):
        migrate(Plan(index), None, in_place=True)


def test_safetensors_metadata_kept_beside_the_state_dict_in_pth(tmp_path, torch):
    from safetensors.torch import save_file

    sd = build("resnet18").state_dict()
    src = str(tmp_path / "meta.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, src, metadata={"format": "pt", "epoch": "3"})
    out = str(tmp_path / "out.pth")
    report = migrate(Plan(src, arch="resnet18"), out, keep_extras=True)
    assert report.ok and report.plan.extras_kept == ("epoch",)
    loaded = torch.load(out, weights_only=True)
    assert sorted(loaded) == ["epoch", "state_dict"] and loaded["epoch"] == "3"
    strict_load(build("resnet18"), loaded["state_dict"])
