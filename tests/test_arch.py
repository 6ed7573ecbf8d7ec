"""arch.py: parsing --arch-arg, building targets, and the on-disk signature cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision

from ckpt_tool import arch, arch_table
from ckpt_tool import cache as ckpt_cache
from ckpt_tool.arch import TargetTensor, build_model, default_cache_dir, parse_arch_args, target_signature
from ckpt_tool.errors import ArchError, UsageError

USER_MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.fc = nn.Linear(3, width)
            self.bn = nn.BatchNorm1d(width)
            self.register_buffer("scale", torch.ones(2, dtype=torch.float16))
            self.register_buffer("tmp", torch.ones(1), persistent=False)

    def needs_values():
        m = Net()
        if m.fc.weight.sum().item() != m.fc.weight.sum().item():  # .item() does not work on meta tensors
            raise RuntimeError("nan")
        return m

    def not_a_module():
        return 42
""")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CKPT_CACHE_DIR", str(tmp_path / "cache"))
    # these tests are about building and caching, which the shipped table would answer first
    monkeypatch.setattr(arch_table, "lookup", lambda spec, args: None)
    return tmp_path / "cache" / "signatures"


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "net.py"
    path.write_text(USER_MODEL)
    return path


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json")) if cache.exists() else []


def test_parse_arch_args() -> None:
    assert parse_arch_args(["num_classes=10", "dropout=0.2", "name=abc", "t=(1, 2)"]) == {
        "num_classes": 10,
        "dropout": 0.2,
        "name": "abc",
        "t": (1, 2),
    }
    with pytest.raises(UsageError, match="NAME=VALUE"):
        parse_arch_args(["num_classes"])
    with pytest.raises(UsageError):
        parse_arch_args(["1x=3"])


def test_signature_matches_state_dict(cache: Path) -> None:
    sig = target_signature("resnet18", {"num_classes": 10})
    sd = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    assert list(sig.tensors) == list(sd)
    assert all(sig.tensors[k].shape == tuple(v.shape) for k, v in sd.items())
    assert sig.tensors["bn1.num_batches_tracked"] == TargetTensor((), "int64", "buffer")
    assert sig.tensors["fc.weight"].kind == "parameter"
    assert "layer1.0.bn2.num_batches_tracked" in sig.auto_filled and len(sig.auto_filled) == 20
    assert sig.cache == "built" and len(entries(cache)) == 1


def test_user_file_signature_and_non_persistent_buffers(cache: Path, user_file: Path) -> None:
    sig = target_signature(f"{user_file}:Net", {"width": 5})
    assert sig.tensors["scale"] == TargetTensor((2,), "float16", "buffer")
    assert "tmp" not in sig.tensors and sig.tensors["fc.weight"].shape == (5, 3)
    assert sig.auto_filled == ("bn.num_batches_tracked",)


def test_cache_hit_then_args_and_versions_make_new_entries(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert target_signature("squeezenet1_0").cache == "built"
    hit = target_signature("squeezenet1_0")
    assert hit.cache == "hit" and hit.tensors == target_signature("squeezenet1_0", use_cache=False).tensors
    assert target_signature("squeezenet1_0", {"num_classes": 10}).cache == "built"
    assert len(entries(cache)) == 2
    real = arch._version
    monkeypatch.setattr(arch, "_version", lambda dist: "9.9" if dist == "torch" else real(dist))
    assert target_signature("squeezenet1_0").cache == "built"  # a torch upgrade is a new key
    assert len(entries(cache)) == 3


def test_no_cache_neither_reads_nor_writes(cache: Path) -> None:
    sig = target_signature("squeezenet1_0", use_cache=False)
    assert sig.cache == "off" and entries(cache) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "checksum", "key", "types"])
def test_corrupt_or_stale_entry_is_rebuilt(cache: Path, damage: str) -> None:
    good = target_signature("squeezenet1_0")
    (entry,) = entries(cache)
    text = entry.read_text()
    data = json.loads(text)
    if damage == "truncate":
        entry.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\xff\xfe not json")
    elif damage == "checksum":  # a shape edited by hand: the checksum no longer matches
        data["body"]["tensors"][0][1] = [1, 2, 3]
        entry.write_text(json.dumps(data))
    elif damage == "key":  # an entry that answers another question
        data["key"]["torch"] = "0.0"
        entry.write_text(json.dumps(data))
    else:
        data["body"]["tensors"] = [["x", None, 1, 2]]
        data["checksum"] = ckpt_cache._checksum(data["key"], data["body"])
        entry.write_text(json.dumps(data))
    rebuilt = target_signature("squeezenet1_0")
    assert rebuilt.cache == "rebuilt" and rebuilt.tensors == good.tensors
    assert target_signature("squeezenet1_0").cache == "hit"


def test_user_code_change_invalidates(cache: Path, user_file: Path) -> None:
    spec = f"{user_file}:Net"
    assert target_signature(spec).tensors["fc.weight"].shape == (4, 3)
    assert target_signature(spec).cache == "hit"
    user_file.write_text(USER_MODEL.replace("nn.Linear(3, width)", "nn.Linear(7, width)"))
    sig = target_signature(spec)
    assert sig.cache == "built" and sig.tensors["fc.weight"].shape == (4, 7)


def test_package_module_spec_is_fingerprinted(cache: Path, user_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = user_file.parent / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert target_signature("mypkg.nets:Net").cache == "built"
    assert target_signature("mypkg.nets:Net").cache == "hit"
    (pkg / "nets.py").write_text(USER_MODEL.replace("width=4", "width=6"))
    monkeypatch.delitem(sys.modules, "mypkg.nets")  # a new process would import the edited file
    sig = target_signature("mypkg.nets:Net")
    assert sig.cache == "built" and sig.tensors["fc.weight"].shape == (6, 3)


def test_unfingerprintable_module_is_not_cached(cache: Path) -> None:
    # torch.nn has a source file on sys.path; the builtin sys module has none, so it is never cached
    sig = target_signature("torch.nn:Linear", {"in_features": 2, "out_features": 3})
    assert sig.cache == "built" and sig.tensors["weight"].shape == (3, 2)
    assert arch._cache_key("sys:exit", {}) is None
    with pytest.raises(ArchError, match="not an nn.Module"):
        target_signature("sys:getrecursionlimit")
    assert len(entries(cache)) == 1


def test_unwritable_cache_still_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CKPT_CACHE_DIR", str(blocker))
    monkeypatch.setattr(arch_table, "lookup", lambda spec, args: None)
    sig = target_signature("squeezenet1_0")
    assert sig.cache == "unwritable" and "features.0.weight" in sig.tensors


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CKPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == os.path.join(str(tmp_path), "ckpt", "signatures")
    monkeypatch.setenv("CKPT_CACHE_DIR", "/x")
    assert default_cache_dir() == "/x/signatures"


def test_meta_build_falls_back_to_cpu(cache: Path, user_file: Path) -> None:
    sig = target_signature(f"{user_file}:needs_values")
    assert sig.tensors["fc.weight"].shape == (4, 3)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet1800", r"not a torchvision model \(did you mean resnet18, resnet101"),
        ("nosuchpkg_xyz.mod:f", "cannot import nosuchpkg_xyz.mod"),
        ("{file}:missing", "has no callable 'missing'"),
        ("{file}:not_a_module", "not an nn.Module"),
        ("{dir}/nofile.py:f", "no such file"),
    ],
)
def test_arch_errors(cache: Path, user_file: Path, spec: str, message: str) -> None:
    with pytest.raises(ArchError, match=message):
        target_signature(spec.format(file=user_file, dir=user_file.parent))
    assert entries(cache) == []


def test_bad_arch_args(cache: Path) -> None:
    with pytest.raises(ArchError, match="cannot build it"):
        build_model("resnet18", {"no_such_argument": 1}, device="meta")


def test_timm_missing_says_how_to_get_it(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail as if not installed
    with pytest.raises(ArchError, match="pip install timm"):
        target_signature("timm:resnet18")


def test_warm_cache_imports_neither_torch_nor_torchvision(cache: Path, tmp_path: Path) -> None:
    """A real process: the cached path must not import torch (checked in the child's sys.modules)."""
    torch.save(torchvision.models.squeezenet1_0(weights=None).state_dict(), tmp_path / "sq.pth")
    code = textwrap.dedent("""
        import sys
        from ckpt_tool.arch import target_signature
        sig = target_signature("squeezenet1_0", {"dropout": 0.3})  # an argument the shipped table cannot state
        print(sig.cache, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")))
    """)
    env = dict(os.environ, CKPT_CACHE_DIR=str(cache.parent))
    cold = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert cold.stdout.startswith("built [") and "'torch'" in cold.stdout
    warm = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert warm.stdout.strip() == "hit []"
