"""The reader layer against torch itself: every description must match torch.load(weights_only=True)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
from conftest import ROOT, TiedLM, mixed_dtype_state, rewrite_zip, tiny_model

from ckpt_tool.errors import FormatError, InputError, KeyPathError, LfsPointerError
from ckpt_tool.formats.sniff import sniff
from ckpt_tool.reader import open_checkpoint
from ckpt_tool.values import FileCache, read_array


def torch_dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def assert_matches(ckpt, expected: dict, *, values: bool = True, order: bool = True) -> None:
    """Every tensor's description (and values) equals torch's, storage sharing included."""
    import torch

    assert (list(ckpt.tensors) if order else sorted(ckpt.tensors)) == (list(expected) if order else sorted(expected))
    by_storage: dict[int, set[str]] = {}
    for key, t in expected.items():
        ref = ckpt.tensors[key]
        assert ref.shape == tuple(t.shape), key
        assert ref.dtype == torch_dtype_name(t), key
        assert ref.stride == t.stride(), key
        assert ref.storage_offset == t.storage_offset(), key
        if t.numel():  # empty tensors have no storage to share
            by_storage.setdefault(t.untyped_storage().data_ptr(), set()).add(key)
        if values and t.numel():
            with FileCache() as files:
                got = read_array(ref, files)
            want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
            assert got.shape == want.shape and (got == want).all(), key
    ours: dict[str, set[str]] = {}
    for key in (k for k, t in expected.items() if t.numel()):
        ours.setdefault(ckpt.tensors[key].storage, set()).add(key)
    theirs = sorted(sorted(g) for g in by_storage.values() if len(g) > 1)
    assert sorted(sorted(g) for g in ours.values() if len(g) > 1) == theirs


@pytest.fixture()
def model_sd(torch):
    return tiny_model().state_dict()


def test_zip_state_dict_matches_torch(torch, tmp_path, model_sd):
    path = tmp_path / "weights.bin"  # any extension: detection is by content
    torch.save(model_sd, path)
    ckpt = open_checkpoint(str(path))
    assert ckpt.format == "torch-zip" and ckpt.state_path == ""
    assert_matches(ckpt, torch.load(path, weights_only=True))


def test_mixed_dtypes_views_and_offsets(torch, tmp_path):
    sd = mixed_dtype_state(torch)
    path = tmp_path / "mixed.pt"
    torch.save(sd, path)
    ckpt = open_checkpoint(str(path))
    loaded = torch.load(path, weights_only=True)
    assert_matches(ckpt, loaded)
    assert not ckpt.tensors["transposed"].is_contiguous
    assert ckpt.tensors["sliced"].storage_offset == 8
    # transposed and sliced views share one storage, as in torch
    assert ckpt.tensors["transposed"].storage == ckpt.tensors["sliced"].storage


def test_byte_offsets_point_at_the_tensor_bytes(torch, tmp_path):
    sd = {"w": torch.arange(10, dtype=torch.float32), "v": torch.arange(6, dtype=torch.int64)[2:]}
    path = tmp_path / "o.pth"
    torch.save(sd, path)
    ckpt = open_checkpoint(str(path))
    raw = path.read_bytes()
    for key, t in sd.items():
        ref = ckpt.tensors[key]
        assert raw[ref.offset : ref.offset + ref.nbytes] == t.contiguous().numpy().tobytes()


def test_float8_and_uint16_use_untyped_storages(torch, tmp_path):
    sd = {"f8": torch.randn(5).to(torch.float8_e4m3fn), "u16": torch.arange(4).to(torch.uint16)}
    path = tmp_path / "f8.pth"
    torch.save(sd, path)
    ckpt = open_checkpoint(str(path))
    assert ckpt.tensors["f8"].dtype == "float8_e4m3fn" and ckpt.tensors["f8"].nbytes == 5
    with FileCache() as files:
        assert (read_array(ckpt.tensors["f8"], files) == sd["f8"].float().numpy()).all()
        assert (read_array(ckpt.tensors["u16"], files) == sd["u16"].numpy()).all()


def test_tied_weights_are_one_storage(torch, tmp_path):
    model = TiedLM.build()
    path = tmp_path / "tied.pth"
    torch.save(model.state_dict(), path)
    ckpt = open_checkpoint(str(path))
    assert ckpt.shared_storages() and sorted(next(iter(ckpt.shared_storages().values()))) == [
        "embed.weight",
        "proj.weight",
    ]
    assert_matches(ckpt, torch.load(path, weights_only=True))


def test_legacy_format(torch, tmp_path):
    sd = mixed_dtype_state(torch)
    path = tmp_path / "legacy.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert sniff(str(path)) == "torch-legacy"
    ckpt = open_checkpoint(str(path))
    assert ckpt.format == "torch-legacy"
    assert_matches(ckpt, torch.load(path, weights_only=True))


def test_nested_checkpoint_with_optimizer_and_dataparallel(torch, tmp_path):
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sd = OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    path = tmp_path / "nested.ckpt"
    torch.save({"model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "epoch": 3}, path)
    ckpt = open_checkpoint(str(path))
    assert ckpt.state_path == "model_state_dict"
    assert [c.path for c in ckpt.candidates] == ["model_state_dict"]  # optimizer tensors are not a candidate
    assert ckpt.extras["epoch"] == 3
    assert ckpt.extras["optimizer_state_dict"].startswith("<optimizer state: 36 tensors")
    assert_matches(ckpt, torch.load(path, weights_only=True)["model_state_dict"])
    assert all(k.startswith("module.") for k in ckpt.tensors)


def test_key_choice_between_several_state_dicts(torch, tmp_path):
    a, b = tiny_model().state_dict(), TiedLM.build().state_dict()
    path = tmp_path / "two.pth"
    torch.save({"state_dict": a, "state_dict_ema": b, "meta": {"note": "x"}}, path)
    ckpt = open_checkpoint(str(path))
    assert ckpt.state_path == "state_dict" and len(ckpt.candidates) == 2
    ema = open_checkpoint(str(path), key="state_dict_ema")
    assert sorted(ema.tensors) == sorted(b)
    with pytest.raises(KeyPathError, match="candidates: 'state_dict', 'state_dict_ema'"):
        open_checkpoint(str(path), key="nope")
    with pytest.raises(KeyPathError, match="holds no tensors"):
        open_checkpoint(str(path), key="meta")


def test_deeply_nested_key_path(torch, tmp_path):
    sd = tiny_model().state_dict()
    path = tmp_path / "deep.pth"
    torch.save({"ckpt": {"models": [{"ema": sd}]}}, path)
    assert open_checkpoint(str(path)).state_path == "ckpt/models/0/ema"
    for key in ("ckpt/models/0/ema", "ckpt.models.0.ema"):
        assert list(open_checkpoint(str(path), key=key).tensors) == list(sd)


def test_lightning_style_checkpoint(torch, tmp_path):
    import argparse

    sd = tiny_model().state_dict()
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "state_dict": OrderedDict(("model." + k, v) for k, v in sd.items()),
            "epoch": 7,
            "global_step": 70,
            "hyper_parameters": {"lr": 0.1, "args": argparse.Namespace(lr=0.1)},
            "optimizer_states": [{}],
        },
        path,
    )
    ckpt = open_checkpoint(str(path))
    assert ckpt.state_path == "state_dict" and len(ckpt.tensors) == len(sd)
    assert "argparse.Namespace" in ckpt.placeholders
    assert ckpt.extras["hyper_parameters"]["lr"] == 0.1


def test_full_pickled_model_recovers_state_dict_without_importing(torch, tmp_path):
    import torchvision

    model = torchvision.models.squeezenet1_0(weights=None, num_classes=7)
    model.features[0].register_buffer("scratch", torch.zeros(2), persistent=False)
    path = tmp_path / "full.pth"
    torch.save(model, path)
    code = f"""
import sys
from ckpt_tool.reader import open_checkpoint
c = open_checkpoint({str(path)!r})
assert "torch" not in sys.modules and "torchvision" not in sys.modules
print(",".join(c.tensors))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(",") == list(model.state_dict())
    ckpt = open_checkpoint(str(path))
    assert_matches(ckpt, model.state_dict())
    assert "torchvision.models.squeezenet.SqueezeNet" in ckpt.placeholders


def test_full_model_inside_a_dict(torch, tmp_path):
    model = tiny_model()
    path = tmp_path / "wrapped.pth"
    torch.save({"model": model, "epoch": 1}, path)
    ckpt = open_checkpoint(str(path))
    assert ckpt.state_path == "model"
    assert_matches(ckpt, model.state_dict())


def test_torchscript_archive(torch, tmp_path):
    model = tiny_model().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), path)
    ckpt = open_checkpoint(str(path))
    assert ckpt.format == "torchscript"
    assert_matches(ckpt, model.state_dict(), order=False)


def test_safetensors(torch, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in mixed_dtype_state(torch).items()}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    ckpt = open_checkpoint(str(path))
    assert ckpt.format == "safetensors" and ckpt.metadata == {"format": "pt"}
    from safetensors.torch import load_file

    assert_matches(ckpt, load_file(str(path)), order=False)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_sets(torch, tmp_path, kind):
    from safetensors.torch import save_file

    sd = tiny_model().state_dict()
    keys = list(sd)
    shards = {f"model-0000{i + 1}-of-00002.{kind}": keys[i::2] for i in range(2)}
    weight_map = {}
    for name, part in shards.items():
        chunk = {k: sd[k].contiguous() for k in part}
        if kind == "safetensors":
            save_file(chunk, str(tmp_path / name))
        else:
            torch.save(chunk, tmp_path / name)
        weight_map.update({k: name for k in part})
    index_name = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index_name).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    for target in (str(tmp_path), str(tmp_path / index_name)):
        ckpt = open_checkpoint(target)
        assert ckpt.format.startswith("sharded") and len(ckpt.files) == 2
        assert_matches(ckpt, {k: sd[k] for k in weight_map})


def test_sharded_refuses_escaping_and_missing_shards(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(FormatError, match="escapes"):
        open_checkpoint(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(InputError, match="does not exist"):
        open_checkpoint(str(tmp_path))


def test_lfs_pointer(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 1234\n")
    with pytest.raises(LfsPointerError, match="git-lfs pointer .*size|1234"):
        open_checkpoint(str(path))


def test_plain_pickle(tmp_path):
    import pickle

    path = tmp_path / "stuff.pkl"
    path.write_bytes(pickle.dumps({"a": 1, "b": [1.5, "x"], "c": {2, 3}}, protocol=0))
    ckpt = open_checkpoint(str(path))
    assert ckpt.format == "pickle" and ckpt.tensors == {} and ckpt.extras["a"] == 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"hello world, not a model", "not a recognised checkpoint"),
        (b"PK\x03\x04garbage", "corrupt zip"),
        (b"\x80\x02}q\x00(X\x01\x00\x00\x00aq", "truncated|ends early|past the end"),
        (b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}', "runs past the end"),
        ((1 << 60).to_bytes(8, "little") + b"{}", "over the"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        open_checkpoint(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_zip_and_missing_storage(torch, tmp_path):
    good = tmp_path / "good.pth"
    torch.save(tiny_model().state_dict(), good)
    raw = good.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError):
        open_checkpoint(str(cut))
    # an archive whose data.pkl names a storage the archive lacks
    broken = tmp_path / "nostorage.pth"
    rewrite_zip(good, broken, lambda name, data: None if name.endswith("data/0") else data)
    with pytest.raises(FormatError, match="storage 0 is referenced but data/0 is missing"):
        open_checkpoint(str(broken))


def test_storage_size_lies_are_caught(torch, tmp_path):
    """A data.pkl that claims more elements than its storage entry holds is refused."""
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(4)}, good)
    bad = tmp_path / "lie.pth"
    # size (4,) -> (64,) in data.pkl
    rewrite_zip(
        good, bad, lambda name, data: data.replace(b"K\x04\x85", b"K\x40\x85") if name.endswith("data.pkl") else data
    )
    with pytest.raises(FormatError, match="past the end of its storage|needs"):
        open_checkpoint(str(bad))


def test_input_file_is_never_modified(torch, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(tiny_model().state_dict(), path)
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    open_checkpoint(str(path))
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


def test_describing_does_not_import_torch(tmp_path):
    fixture = os.path.join(ROOT, "fixtures", "tiny_cnn_dataparallel_nested.pth")
    code = f"""
import sys
from ckpt_tool.inspect import inspect_checkpoint
r = inspect_checkpoint({fixture!r}, depth=1)
assert r.tensors == 18, r.tensors
print(sorted(m for m in ("torch", "torchvision", "numpy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_torch_state_dict_loads_into_the_model_and_keeps_ties(torch, tmp_path):
    from ckpt_tool.values import torch_state_dict

    model = TiedLM.build()
    path = tmp_path / "tied.pth"
    torch.save(model.state_dict(), path)
    sd = torch_state_dict(open_checkpoint(str(path)).tensors)
    assert sd["embed.weight"] is sd["proj.weight"]
    fresh = TiedLM.build()
    assert fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    mixed = mixed_dtype_state(torch)
    torch.save(mixed, tmp_path / "mixed.pth")
    got = torch_state_dict(open_checkpoint(str(tmp_path / "mixed.pth")).tensors)
    for key, t in mixed.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key], t), key


def test_zip_entry_with_bad_crc(torch, tmp_path):
    path = tmp_path / "crc.pth"
    torch.save(tiny_model().state_dict(), path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 40
    raw[start] ^= 0xFF  # flip one byte inside data.pkl: the CRC no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="data.pkl' is corrupt .*CRC"):
        open_checkpoint(str(path))


def test_self_referencing_pickle_does_not_hang(tmp_path):
    import pickle

    loop: list = []
    loop.append(loop)
    path = tmp_path / "loop.pkl"
    path.write_bytes(pickle.dumps({"a": loop, "b": {"c": loop}}, protocol=4))
    ckpt = open_checkpoint(str(path))
    assert ckpt.tensors == {} and "a" in ckpt.extras


def test_inspect_progress_reports_every_byte_read(torch, tmp_path):
    from ckpt_tool.inspect import inspect_checkpoint

    path = tmp_path / "p.pth"
    torch.save(tiny_model().state_dict(), path)
    ticks: list[tuple[int, int]] = []
    report = inspect_checkpoint(str(path), stats=True, progress=lambda n, total: ticks.append((n, total)))
    assert len(ticks) == report.tensors and sum(n for n, _ in ticks) == report.tensor_bytes
    assert {t for _, t in ticks} == {report.tensor_bytes}
    ticks.clear()
    inspect_checkpoint(str(path), progress=lambda n, total: ticks.append((n, total)))
    assert ticks == []  # no values read, nothing to report


def test_directory_with_one_weights_file(torch, tmp_path):
    from safetensors.torch import save_file

    sd = tiny_model().state_dict()
    save_file(dict(sd), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    ckpt = open_checkpoint(str(tmp_path))
    assert ckpt.format == "safetensors" and ckpt.path == str(tmp_path / "model.safetensors")
    assert sorted(ckpt.tensors) == sorted(sd)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no \\*.index.json and none of model.safetensors"):
        open_checkpoint(str(empty))


def test_zip_with_undecodable_entry_name(tmp_path):
    path = tmp_path / "names.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/data.pkl", b"\x80\x02}.")
    raw = bytearray(path.read_bytes())
    central = raw.rindex(b"PK\x01\x02")
    raw[central + 8 : central + 10] = (0x0800).to_bytes(2, "little")  # "names are UTF-8"
    name_at = raw.index(b"a/data.pkl", central)
    raw[name_at] = 0xFF  # ... but this one is not
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="corrupt zip archive"):
        open_checkpoint(str(path))


@pytest.mark.parametrize("fixture", ["tiny_cnn.pth", "tiny_cnn_dataparallel_nested.pth", "tiny_cnn.safetensors"])
def test_mutated_files_only_ever_raise_ckpt_errors(tmp_path, fixture):
    """Random byte flips and truncations: a one-line CkptError or a description, never another exception."""
    import random

    from ckpt_tool.errors import CkptError
    from ckpt_tool.scan import scan_file
    from ckpt_tool.values import tensor_stats

    original = (Path(ROOT) / "fixtures" / fixture).read_bytes()
    rng = random.Random(fixture)
    path = tmp_path / fixture
    for _ in range(40):
        data = bytearray(original)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            ckpt = open_checkpoint(str(path))
            with FileCache() as files:
                for ref in ckpt.tensors.values():
                    if ref.offset is not None:
                        tensor_stats(ref, files)
        except CkptError as exc:
            assert "\n" not in str(exc)
        assert scan_file(str(path)).verdict in ("safe", "unsafe", "suspicious", "broken")


def test_broadcast_views_are_read_within_bounds(torch, tmp_path):
    from ckpt_tool.values import tensor_stats

    sd = {"e": torch.arange(4.0).expand(3, 4), "row": torch.arange(6.0).reshape(2, 3)[:, 1]}
    path = tmp_path / "expanded.pth"
    torch.save(sd, path)
    ckpt = open_checkpoint(str(path))
    assert ckpt.tensors["e"].stride == (0, 1)
    assert_matches(ckpt, torch.load(path, weights_only=True))
    # a view that claims 2**40 elements of one stored float is refused, not expanded
    huge = tmp_path / "huge.pth"
    torch.save({"w": torch.zeros(3)}, huge)
    lie = tmp_path / "lie.pth"
    rewrite_zip(
        huge,
        lie,
        lambda name, data: (
            data.replace(b"K\x03\x85q", b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85q", 1).replace(
                b"K\x01\x85q", b"K\x00\x85q", 1
            )
            if name.endswith("data.pkl")
            else data
        ),
    )
    ref = open_checkpoint(str(lie)).tensors["w"]
    assert ref.shape == (2**40,) and ref.stride == (0,)
    with FileCache() as files, pytest.raises(FormatError, match="broadcast view"):
        tensor_stats(ref, files)


def test_strided_views_stream_in_bounded_chunks(torch, tmp_path):
    from ckpt_tool.values import iter_raw_chunks

    t = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32).t()  # [32, 64], not contiguous
    path = tmp_path / "t.pth"
    torch.save({"t": t}, path)
    ref = open_checkpoint(str(path)).tensors["t"]
    with FileCache() as files:
        chunks = list(iter_raw_chunks(ref, files, chunk_bytes=1024))
    assert len(chunks) == 8 and max(len(c) for c in chunks) <= 1024
    assert b"".join(chunks) == t.contiguous().numpy().tobytes()
