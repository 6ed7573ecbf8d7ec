"""``ckpt migrate`` / ``ckpt convert`` through Click: order of operations, plans, output, exit codes, errors."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from migrate_helpers import (  # noqa: F401 - fixtures are found by name
    resnet_fixture,
    same_bytes,
    signature_cache_fixture,
    temp_files,
)

from ckpt_tool.cli import main


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    """A DataParallel resnet18 nested under model_state_dict, with an optimizer and an epoch."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torch.nn.DataParallel(torchvision.models.resnet18(weights=None))
    path = str(tmp_path_factory.mktemp("dp") / "dp.pth")
    torch.save(
        {
            "model_state_dict": model.state_dict(),
            "epoch": 4,
            "optimizer_state_dict": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        },
        path,
    )
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def error_line(result) -> str:
    """Errors are one line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_operations_apply_in_command_line_order(resnet, tmp_path):
    out = str(tmp_path / "o.safetensors")
    result = invoke(
        "migrate",
        resnet,
        "--rename",
        r"^layer(\d)=block\1",
        "--drop",
        "fc",
        "--add-prefix",
        "net.",
        "--rename",
        r"^net\.block1\.=net.first.",
        "--exclude",
        "num_batches",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ops = [s["operation"] for s in report["plan"]["steps"]]
    assert ops == [
        r"--rename ^layer(\d)=block\1",
        "--drop fc",
        "--add-prefix net.",
        r"--rename ^net\.block1\.=net.first.",
        "--exclude num_batches",
    ]
    assert report["plan"]["operations"][1] == {"op": "drop", "prefix": "fc"}
    from safetensors import safe_open

    with safe_open(out, framework="pt") as f:
        keys = set(f.keys())
    assert "net.first.0.conv1.weight" in keys and "net.block2.0.conv1.weight" in keys
    assert not any(k.startswith("net.fc") or "num_batches" in k for k in keys)


def test_table_output_shows_plan_then_result(dp, tmp_path):
    out = str(tmp_path / "o.pth")
    result = invoke(
        "migrate",
        dp,
        "--key",
        "model_state_dict",
        "--strip-prefix",
        "module.",
        "--arch",
        "resnet18",
        "--arch-arg",
        "num_classes=10",
        "--reinit-mismatched",
        "--seed",
        "1",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.index("--strip-prefix module.") < text.index("wrote ")  # the plan comes first
    assert "initialised from resnet18: fc.weight [10, 512] (reinit_mismatched)" in text
    assert "optimizer optimizer_state_dict (SGD, 1 param group of 62" in text and "62 start fresh" in text
    assert "against resnet18: loads with strict=True" in text
    assert "verified: loads into resnet18 with strict=True" in text


def test_failed_verification_exits_1(resnet, tmp_path):
    out = str(tmp_path / "o.safetensors")
    result = invoke("migrate", resnet, "--arch", "resnet18", "--arch-arg", "num_classes=10", "-o", out)
    assert result.exit_code == 1
    assert (
        "verification failed: resnet18 does NOT load strictly: 2 shape mismatches (fc.weight [1000, 512] vs "
        "[10, 512], fc.bias [1000] vs [10])" in result.stdout
    )
    assert os.path.exists(out)


def test_dry_run_writes_nothing(dp, tmp_path):
    out = str(tmp_path / "o.safetensors")
    strip = ["migrate", dp, "--key", "model_state_dict", "--arch", "resnet18", "--strip-prefix", "module."]
    result = invoke(*strip, "--drop", "fc", "--dry-run", "-o", out)
    assert result.exit_code == 1  # the planned result would not load: said, and nothing written
    assert "does NOT load strictly: 2 missing (fc.weight, fc.bias)" in result.stdout
    assert "dry run: nothing written" in result.stdout
    assert not os.path.exists(out)
    ok = invoke(*strip, "--dry-run", "--json")
    assert ok.exit_code == 0
    report = json.loads(ok.stdout)
    assert report["dry_run"] is True and report["written"] is None and report["ok"] is True
    assert report["plan"]["diff"] == {
        "loads": True,
        "missing": [],
        "unexpected": [],
        "mismatched": [],
        "auto_filled": [],
        "tied": [],
    }


def test_plan_written_by_diff_applies_as_is(dp, tmp_path, torch):
    plan = str(tmp_path / "plan.json")
    diff = invoke(
        "diff",
        dp,
        "--key",
        "model_state_dict",
        "--arch",
        "resnet18",
        "--arch-arg",
        "num_classes=10",
        "--plan-out",
        plan,
    )
    assert diff.exit_code == 1 and os.path.exists(plan)
    out = str(tmp_path / "fixed.pth")
    result = invoke("migrate", "--plan", plan, "-o", out)  # the source, key and arch come from the plan
    assert result.exit_code == 0, result.output
    assert "verified: loads into resnet18 with strict=True" in result.stdout
    import torchvision

    # the training state is carried: the state dict stays under its key, beside the optimizer's
    torchvision.models.resnet18(weights=None, num_classes=10).load_state_dict(
        torch.load(out, weights_only=True)["model_state_dict"], strict=True
    )


def test_handwritten_plan_and_more_operations_after_it(resnet, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "version": 1,
                "source": resnet,
                "key": None,
                "arch": None,
                "arch_args": {},
                "operations": [{"op": "drop", "prefix": "fc"}],
            }
        )
    )
    out = str(tmp_path / "o.safetensors")
    result = invoke("migrate", "--plan", str(plan), "--add-prefix", "backbone.", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    steps = json.loads(result.stdout)["plan"]["steps"]
    assert [s["operation"] for s in steps] == ["--drop fc", "--add-prefix backbone."]
    assert steps[1]["renamed"][0] == ["conv1.weight", "backbone.conv1.weight"]


def test_map_file(resnet, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"fc.weight": "head.weight", "fc.bias": "head.bias"}))
    out = str(tmp_path / "o.pth")
    result = invoke("migrate", resnet, "--map", str(mapping), "-o", out, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["plan"]["steps"][0]["renamed"] == [
        ["fc.weight", "head.weight"],
        ["fc.bias", "head.bias"],
    ]


def test_dtype_cast(resnet, tmp_path, torch):
    out = str(tmp_path / "half.safetensors")
    result = invoke("migrate", resnet, "--dtype", "bfloat16", "-o", out)
    assert result.exit_code == 0
    from safetensors.torch import load_file

    state = load_file(out)
    source = torch.load(resnet, weights_only=True)
    assert state["conv1.weight"].dtype == torch.bfloat16
    assert same_bytes(state["conv1.weight"], source["conv1.weight"].to(torch.bfloat16))
    assert state["bn1.num_batches_tracked"].dtype == torch.int64


def test_convert_round_trip(resnet, tmp_path, torch):
    mid = str(tmp_path / "r.safetensors")
    back = str(tmp_path / "r.pth")
    assert invoke("convert", resnet, mid).exit_code == 0
    result = invoke("convert", mid, back)
    assert result.exit_code == 0 and "wrote " + back in result.stdout
    a, b = torch.load(resnet, weights_only=True), torch.load(back, weights_only=True)
    assert list(a) == list(b) and all(same_bytes(a[k], b[k]) for k in a)


def test_convert_to_shards(resnet, tmp_path):
    out = str(tmp_path / "model.safetensors")
    result = invoke("convert", resnet, out, "--max-shard-size", "20MB", "--json")
    assert result.exit_code == 0
    files = json.loads(result.stdout)["written"]["files"]
    assert [os.path.basename(f) for f in files] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    from ckpt_tool.reader import open_checkpoint

    assert len(open_checkpoint(files[-1]).tensors) == len(open_checkpoint(resnet).tensors)


def test_force_and_in_place(resnet, tmp_path):
    src = str(tmp_path / "copy.pth")
    with open(resnet, "rb") as f, open(src, "wb") as g:
        g.write(f.read())
    out = tmp_path / "o.pth"
    out.write_bytes(b"old")
    result = invoke("migrate", src, "-o", str(out))
    assert result.exit_code == 2 and "already exists; pass --force" in error_line(result)
    assert out.read_bytes() == b"old"
    assert invoke("migrate", src, "-o", str(out), "--force").exit_code == 0
    result = invoke("migrate", src, "-o", src, "--force")
    assert result.exit_code == 2 and "is the input file; pass --in-place" in error_line(result)
    result = invoke("migrate", src, "--in-place", "--drop", "fc")
    assert result.exit_code == 0 and f"backup of the input: {src}.bak" in result.stdout
    assert os.path.exists(src + ".bak") and temp_files(str(tmp_path)) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fill-missing"], "need the target (--arch)"),
        (["--rename", "^(a|b).*=x"], "maps both"),
        (["--rename", "nothing"], "is not REGEX=REPLACEMENT"),
        (["--keep", "("], "not a valid regular expression"),
        (["--exclude", "."], "leave no tensors"),
        (["--key", "nope"], "no state dict at --key 'nope' (candidates: '<top level>')"),
        (["--max-shard-size", "lots"], "--max-shard-size 'lots'"),
        (["--arch", "no_such_net"], "not a torchvision model"),
        (["--plan", "/nonexistent/plan.json"], "no such file"),
        (["--map", "/nonexistent/map.json"], "no such file"),
    ],
)
def test_usage_errors_are_one_line_exit_2(resnet, tmp_path, args, message):
    result = invoke("migrate", resnet, *args, "-o", str(tmp_path / "o.safetensors"))
    assert result.exit_code == 2, result.output
    assert message in error_line(result)
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_key_error_on_torch_file(dp, tmp_path):
    result = invoke("migrate", dp, "--key", "nope", "-o", str(tmp_path / "o.pth"))
    assert result.exit_code == 2 and "no state dict at --key 'nope'" in error_line(result)


def test_unknown_extension(resnet, tmp_path):
    result = invoke("migrate", resnet, "-o", str(tmp_path / "o.h5"))
    assert result.exit_code == 2 and "unknown output extension '.h5'" in error_line(result)


def test_no_source_and_no_output(resnet):
    result = invoke("migrate", "--drop", "fc")
    assert result.exit_code == 2 and "no checkpoint given" in error_line(result)
    result = invoke("migrate", resnet, "--drop", "fc")
    assert result.exit_code == 2 and "no output given" in error_line(result)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "file is empty"), (b"PK\x03\x04garbage", "corrupt zip"), (b"\x80\x02}q\x00.", "holds no tensors")],
)
def test_bad_input_files(tmp_path, content, message):
    src = tmp_path / "bad.pth"
    src.write_bytes(content)
    result = invoke("convert", str(src), str(tmp_path / "o.safetensors"))
    assert result.exit_code == 2 and message in error_line(result)
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_truncated_safetensors(resnet, tmp_path):
    good = str(tmp_path / "g.safetensors")
    assert invoke("convert", resnet, good).exit_code == 0
    with open(good, "rb") as f:
        data = f.read()
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    result = invoke("convert", str(bad), str(tmp_path / "o.pth"))
    assert result.exit_code == 2 and "truncated" in error_line(result)


def test_bad_dtype_choice(resnet, tmp_path):
    result = invoke("migrate", resnet, "--dtype", "int8", "-o", str(tmp_path / "o.pth"))
    assert result.exit_code == 2 and "'int8' is not one of" in result.output


def test_help_lists_every_option():
    result = invoke("migrate", "--help")
    assert result.exit_code == 0
    for option in (
        "--drop",
        "--keep",
        "--exclude",
        "--rename",
        "--strip-prefix",
        "--add-prefix",
        "--map",
        "--key",
        "--keep-extras",
        "--dtype",
        "--plan",
        "--arch",
        "--arch-arg",
        "--fill-missing",
        "--drop-unexpected",
        "--reinit-mismatched",
        "--seed",
        "--output",
        "--max-shard-size",
        "--force",
        "--in-place",
        "--dry-run",
        "--json",
    ):
        assert option in result.stdout, option
    assert invoke("convert", "--help").exit_code == 0
