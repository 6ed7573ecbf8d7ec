"""What migrate and convert claim after a write is checked: values, wrong architectures, typos, stdout."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from migrate_helpers import resnet_fixture, signature_cache_fixture  # noqa: F401 - fixtures by name

from ckpt_tool import writer
from ckpt_tool.cli import main

ARCH = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn


    class Tagged(nn.Module):
        """Builds a buffer from numpy and a tensor from a list: neither runs on the meta device."""

        def __init__(self):
            super().__init__()
            print("constructing Tagged")
            self.fc = nn.Linear(4, 2)
            self.register_buffer("table", torch.from_numpy(np.arange(3, dtype=np.float32)))
            self.register_buffer("weights", torch.Tensor([1.0, 2.0]))
''')


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tagged")
    (root / "arch.py").write_text(ARCH)
    import importlib.util

    spec = importlib.util.spec_from_file_location("tagged_arch", root / "arch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.Tagged().state_dict(), root / "tagged.pth")
    return str(root / "tagged.pth"), f"{root / 'arch.py'}:Tagged"


def test_target_that_cannot_build_on_meta_is_verified_not_failed(tagged: tuple[str, str], tmp_path: Path) -> None:
    path, spec = tagged
    result = invoke("migrate", path, "--arch", spec, "-o", str(tmp_path / "o.safetensors"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the constructor's print is on stderr, not before the JSON
    assert report["ok"] is True and report["verification"]["loads"] is True
    assert "constructing Tagged" in result.stderr
    diffed = invoke("diff", path, "--arch", spec, "--json", "--no-cache")
    assert diffed.exit_code == 0 and json.loads(diffed.stdout)["loads_strictly"] is True


def test_verified_summary_counts_where_tensors_came_from(resnet: str, tmp_path: Path) -> None:
    new_head = ["migrate", resnet, "--arch", "resnet18", "--arch-arg", "num_classes=10", "--reinit-mismatched"]
    result = invoke(*new_head, "-o", str(tmp_path / "o.pth"), "--json")
    assert result.exit_code == 0, result.output
    v = json.loads(result.stdout)["verification"]
    assert (v["from_checkpoint"], v["reinitialised"], v["filled"], v["tied"], v["differ"]) == (120, 2, 0, 0, [])
    assert v["checked"] == 122 and 0.99 < v["checkpoint_share"] < 1
    text = invoke(*new_head, "-o", str(tmp_path / "o2.pth"))
    assert (
        "verified: loads into resnet18 with strict=True, 122 tensors as planned (120 from the checkpoint, "
        "2 re-initialised); 99.9541% of resnet18's parameters come from the checkpoint" in text.stdout
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_byte_changed_on_the_way_fails_verification(
    resnet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    """Without --arch the output is re-read and compared with the source tensor by tensor."""
    real = writer._stream
    calls = []

    def corrupting(out: Any, blob: writer.Blob, tick: Any, kernel_copy: bool = True) -> None:
        calls.append(blob)
        if len(calls) != 3:
            return real(out, blob, tick, kernel_copy)
        data = b"".join(blob.chunks())
        out.write(bytes([data[0] ^ 1]) + data[1:])
        tick(len(data))
        return None

    monkeypatch.setattr(writer, "_stream", corrupting)
    (tmp_path / f"o{suffix}").write_bytes(b"an older output")
    result = invoke("convert", resnet, str(tmp_path / f"o{suffix}"), "--force")
    assert result.exit_code == 1
    assert "verification failed: 1 written entry is not what the plan intended" in result.stdout
    # a failed verification renames nothing into place: the older output is still there, no staging left
    assert "not written:" in result.stdout and "wrote " not in result.stdout
    assert (tmp_path / f"o{suffix}").read_bytes() == b"an older output"
    assert sorted(os.listdir(tmp_path)) == [f"o{suffix}"]
    monkeypatch.setattr(writer, "_stream", real)
    good = invoke("convert", resnet, str(tmp_path / f"good{suffix}"))
    assert good.exit_code == 0 and "verified: re-read, 122 tensors identical to their sources" in good.stdout


def test_wrong_architecture_is_refused_and_diff_leads_with_it(resnet: str, tmp_path: Path) -> None:
    out = str(tmp_path / "o.pth")
    diffed = invoke("diff", resnet, "--arch", "vgg11")
    assert diffed.exit_code == 1
    assert "only 0% of vgg11's parameters would come from this checkpoint" in diffed.stdout
    assert "ckpt migrate" not in diffed.stdout.replace("`ckpt migrate` refuses", "")
    result = invoke("migrate", resnet, "--arch", "vgg11", "--drop-unexpected", "--fill-missing", "-o", out)
    assert result.exit_code == 2 and not Path(out).exists()
    assert "only 0% of vgg11's parameters would come from" in result.stderr and "--allow-mostly-new" in result.stderr
    forced = invoke(
        "migrate", resnet, "--arch", "vgg11", "--drop-unexpected", "--fill-missing", "-o", out, "--allow-mostly-new"
    )
    assert forced.exit_code == 0 and "0.0% of vgg11's parameters come from the checkpoint" in forced.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--drop", "layr1"), "--drop layr1 matches no key (closest: layer1"),
        (("--strip-prefix", "module."), "--strip-prefix module. matches no key"),
    ],
)
def test_operation_that_matches_nothing_exits_2(
    resnet: str, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = invoke("migrate", resnet, *args, "-o", str(tmp_path / "o.pth"))
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "o.pth").exists()


class Tagged(torch.nn.Module):
    """Plain data beside its tensors: a tuple through get_extra_state."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def get_extra_state(self) -> Any:
        return (1, "two", [3.0])

    def set_extra_state(self, state: Any) -> None:
        self.state = state


@pytest.fixture()
def with_objects(tmp_path: Path) -> str:
    path = str(tmp_path / "objects.pth")
    torch.save({"model": torch.nn.Sequential(Tagged()).state_dict(), "epoch": 3, "config": {"sizes": (1, 2)}}, path)
    return path


def test_plain_data_is_re_read_as_carried(with_objects: str, tmp_path: Path) -> None:
    result = invoke("migrate", with_objects, "--keep-extras", "--rename", "0.=head.", "-o", str(tmp_path / "o.pth"))
    assert result.exit_code == 0, result.output
    assert "verified: re-read" in result.stdout
    loaded = torch.load(tmp_path / "o.pth", weights_only=True)
    assert loaded["model"]["head._extra_state"] == (1, "two", [3.0]) and loaded["config"] == {"sizes": (1, 2)}


@pytest.mark.parametrize(
    ("mangle", "named"),
    [
        # a tuple written as a list: what a loader's set_extra_state then gets differs
        (lambda v: list(v) if v == (1, "two", [3.0]) else v, "head._extra_state"),
        (lambda v: list(v) if v == (1, 2) else v, "config"),
        (lambda v: 4 if type(v) is int and v == 3 else v, "epoch"),
        # module versions: a BatchNorm without them loads as a version-1 module
        (lambda v: {} if isinstance(v, dict) and "version" in v else v, "_metadata"),
    ],
)
def test_plain_data_changed_on_the_way_fails_verification(
    with_objects: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mangle: Any, named: str
) -> None:
    real = writer._Pickler.value

    def mangling(self: Any, v: Any) -> None:
        return real(self, mangle(v))

    monkeypatch.setattr(writer._Pickler, "value", mangling)
    result = invoke("migrate", with_objects, "--keep-extras", "--rename", "0.=head.", "-o", str(tmp_path / "o.pth"))
    assert result.exit_code == 1, result.output
    assert f"verification failed: 1 written entry is not what the plan intended: {named}" in result.stdout
    assert not (tmp_path / "o.pth").exists()
