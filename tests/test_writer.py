"""The streaming writers: safetensors and torch zip checked against safetensors and torch.load(weights_only=True)."""

from __future__ import annotations

import glob
import json
import os
import struct
import zipfile

import pytest

from ckpt_tool.checkpoint import contiguous_strides
from ckpt_tool.errors import OutputError, UsageError
from ckpt_tool.reader import open_checkpoint
from ckpt_tool.writer import (
    Blob,
    Deferred,
    Layout,
    Nesting,
    StagedDirectory,
    Staging,
    View,
    check_output,
    output_format,
    parse_size,
    shard_names,
    write_checkpoint,
)

TORCH_DTYPES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "float8_e4m3fn",
    "uint16",
    "complex64",
]


def tensor_layout(tensors: dict) -> Layout:
    """One blob per (contiguous) torch tensor, streamed from its bytes in small chunks."""
    import torch

    blobs, views = [], []
    for i, (key, t) in enumerate(tensors.items()):
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = str(t.dtype).removeprefix("torch.")
        blobs.append(Blob(dtype, len(data), lambda d=data: (d[j : j + 7] for j in range(0, len(d), 7))))
        views.append(View(key, i, dtype, tuple(t.shape), contiguous_strides(tuple(t.shape))))
    return Layout(tuple(blobs), tuple(views))


def sample(torch):
    out = {}
    for name in TORCH_DTYPES:
        dtype = getattr(torch, name)
        base = torch.arange(-6, 6, dtype=torch.float64).reshape(3, 4) * (1.5 if dtype.is_floating_point else 1)
        out[f"t.{name}"] = (base > 0) if name == "bool" else base.to(dtype)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 3)
    return out


def assert_same(a, b, torch):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_pth_opens_with_torch_load_weights_only(tmp_path, torch):
    tensors = sample(torch)
    path = str(tmp_path / "out.pth")
    written = write_checkpoint(path, tensor_layout(tensors))
    assert written.files == (path,) and written.tensors == len(tensors)
    loaded = torch.load(path, weights_only=True)
    assert_same(tensors, loaded, torch)
    # our own reader agrees, and every storage starts on a 64-byte boundary (mmap-able, as torch writes)
    ckpt = open_checkpoint(path)
    assert list(ckpt.tensors) == list(tensors)
    assert all(r.data_offset % 64 == 0 for r in ckpt.tensors.values() if r.numel)
    names = zipfile.ZipFile(path).namelist()
    assert names[:4] == [
        "archive/data.pkl",
        "archive/.format_version",
        "archive/.storage_alignment",
        "archive/byteorder",
    ]
    assert "archive/version" in names and "archive/.data/serialization_id" in names


def test_pth_mmap_load(tmp_path, torch):
    tensors = {"w": torch.randn(5, 3)}
    path = str(tmp_path / "out.pt")
    write_checkpoint(path, tensor_layout(tensors))
    assert torch.equal(torch.load(path, weights_only=True, mmap=True)["w"], tensors["w"])


def test_pth_views_share_one_storage(tmp_path, torch):
    import torch as t

    base = t.arange(12, dtype=t.float32)
    data = base.numpy().tobytes()
    layout = Layout(
        (Blob("float32", len(data), lambda: [data]),),
        (
            View("whole", 0, "float32", (3, 4), (4, 1)),
            View("transposed", 0, "float32", (4, 3), (1, 4)),
            View("tail", 0, "float32", (2,), (1,), offset=10),
        ),
    )
    path = str(tmp_path / "tied.pth")
    write_checkpoint(path, layout)
    out = torch.load(path, weights_only=True)
    assert torch.equal(out["whole"], base.reshape(3, 4))
    assert torch.equal(out["transposed"], base.reshape(3, 4).t())
    assert torch.equal(out["tail"], base[10:])
    ptr = {k: v.untyped_storage().data_ptr() for k, v in out.items()}
    assert len(set(ptr.values())) == 1  # one storage, as torch.save of tied weights gives
    assert len([n for n in zipfile.ZipFile(path).namelist() if "/data/" in n]) == 1


def test_pth_nesting_and_plain_extras(tmp_path, torch):
    extras = {
        "epoch": 7,
        "big": 2**40,
        "neg": -(2**35),
        "lr": 0.125,
        "name": "rés",
        "flags": [True, None, 3],
        "cfg": {"depth": 18, "tags": ["a", "b"]},
    }
    path = str(tmp_path / "nested.pth")
    write_checkpoint(path, tensor_layout({"w": torch.ones(2)}), nesting=Nesting("model_state_dict", extras))
    out = torch.load(path, weights_only=True)
    assert torch.equal(out["model_state_dict"]["w"], torch.ones(2))
    for k, v in extras.items():
        assert out[k] == v, k


def test_safetensors_matches_the_library(tmp_path, torch):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = sample(torch)
    path = str(tmp_path / "out.safetensors")
    write_checkpoint(path, tensor_layout(tensors), metadata={"format": "pt", "note": "x"})
    assert_same(tensors, load_file(path), torch)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    assert n % 8 == 0


def test_deferred_metadata_is_filled_in_after_the_data(tmp_path, torch):
    from safetensors import safe_open

    calls = []

    def digest() -> str:
        calls.append(1)
        return "ab" * 32

    path = str(tmp_path / "out.safetensors")
    write_checkpoint(path, tensor_layout({"w": torch.ones(3)}), metadata={"sha": Deferred(64, digest)})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"sha": "ab" * 32}
    assert calls == [1]


def test_sharded_safetensors_with_index(tmp_path, torch):
    tensors = {f"layer{i}.weight": torch.full((250,), float(i)) for i in range(5)}  # 1000 bytes each
    path = str(tmp_path / "model.safetensors")
    written = write_checkpoint(path, tensor_layout(tensors), metadata={"format": "pt"}, max_shard_size=2500)
    shards, index = shard_names(path, 3)
    assert written.files == (*shards, index)
    assert os.path.basename(shards[0]) == "model-00001-of-00003.safetensors"
    with open(index) as f:
        doc = json.load(f)
    assert doc["metadata"] == {"format": "pt", "total_size": 5000}
    assert doc["weight_map"]["layer4.weight"] == "model-00003-of-00003.safetensors"
    ckpt = open_checkpoint(index)
    assert list(ckpt.tensors) == list(tensors)


def test_sharded_pth(tmp_path, torch):
    tensors = {f"w{i}": torch.full((100,), float(i)) for i in range(3)}
    path = str(tmp_path / "pytorch_model.bin")
    written = write_checkpoint(path, tensor_layout(tensors), max_shard_size=400)
    assert [os.path.basename(f) for f in written.files] == [
        "pytorch_model-00001-of-00003.bin",
        "pytorch_model-00002-of-00003.bin",
        "pytorch_model-00003-of-00003.bin",
        "pytorch_model.bin.index.json",
    ]
    merged = {}
    for f in written.files[:-1]:
        merged.update(torch.load(f, weights_only=True))
    assert_same(tensors, merged, torch)


def test_everything_fits_in_one_shard_gives_one_file(tmp_path, torch):
    path = str(tmp_path / "m.safetensors")
    written = write_checkpoint(path, tensor_layout({"w": torch.ones(4)}), max_shard_size=10**9)
    assert written.files == (path,)


def test_quantized_dtype_cannot_go_to_safetensors(tmp_path):
    layout = Layout((Blob("qint8", 1, lambda: [b"\0"]),), (View("q", 0, "qint8", (1,), (1,)),))
    with pytest.raises(UsageError, match="quantized .*--dequantize"):
        write_checkpoint(str(tmp_path / "q.safetensors"), layout)
    assert os.listdir(tmp_path) == []


# --- atomic writes ---------------------------------------------------------------------------------


def failing_layout(exc: BaseException) -> Layout:
    def chunks():
        yield b"\0" * 1024
        raise exc

    return Layout((Blob("float32", 4096, chunks),), (View("w", 0, "float32", (1024,), (1,)),))


def temp_files(directory) -> list[str]:
    return glob.glob(os.path.join(str(directory), ".*.tmp"))


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
@pytest.mark.parametrize("exc", [RuntimeError("source vanished"), KeyboardInterrupt()])
def test_interrupted_write_leaves_no_file(tmp_path, ext, exc):
    path = str(tmp_path / f"out.{ext}")
    with pytest.raises(type(exc)):
        write_checkpoint(path, failing_layout(exc))
    assert not os.path.exists(path)
    assert temp_files(tmp_path) == []


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError):
        write_checkpoint(str(path), failing_layout(RuntimeError("boom")))
    assert path.read_bytes() == b"old contents"
    assert temp_files(tmp_path) == []


def test_disk_error_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot be written .No space left on device"):
        write_checkpoint(str(tmp_path / "o.safetensors"), failing_layout(OSError(28, "No space left on device")))
    assert os.listdir(tmp_path) == []


def test_interrupted_sharded_write_renames_nothing(tmp_path):
    def chunks():
        yield b"\0" * 400
        raise RuntimeError("late failure")

    ok = Blob("float32", 400, lambda: [b"\0" * 400])
    layout = Layout(
        (ok, Blob("float32", 800, chunks)),
        (View("a", 0, "float32", (100,), (1,)), View("b", 1, "float32", (200,), (1,))),
    )
    with pytest.raises(RuntimeError):
        write_checkpoint(str(tmp_path / "m.safetensors"), layout, max_shard_size=500)
    assert os.listdir(tmp_path) == []


def test_output_mode_follows_umask(tmp_path):
    path = str(tmp_path / "o.safetensors")
    write_checkpoint(path, failing_layout_ok())
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def failing_layout_ok() -> Layout:
    return Layout((Blob("float32", 4, lambda: [b"\0" * 4]),), (View("w", 0, "float32", (1,), (1,)),))


def test_staging_commit_keeps_a_backup(tmp_path):
    path = tmp_path / "m.pth"
    path.write_bytes(b"old")
    staging = Staging()
    with staging.open(str(path)) as f:
        f.write(b"new")
    assert path.read_bytes() == b"old"  # nothing visible before the commit
    staging.commit(backup=str(path) + ".bak")
    assert path.read_bytes() == b"new"
    assert (tmp_path / "m.pth.bak").read_bytes() == b"old"


def _stage_directory(final, files: dict[str, bytes]) -> StagedDirectory:
    staging = StagedDirectory(str(final))
    for name, data in files.items():
        with open(os.path.join(staging.path, name), "wb") as f:
            f.write(data)
    return staging


@pytest.mark.torchfree
def test_a_staged_directory_appears_whole_with_mkdirs_mode(tmp_path):
    out = tmp_path / "out"
    with _stage_directory(out, {"a": b"1", "b": b"2"}) as staging:
        assert not out.exists() and os.path.dirname(staging.path) == str(tmp_path)
        assert os.path.basename(staging.path).startswith(".out.") and staging.path.endswith(".tmp")
        staging.commit()
    assert snapshot(out) == {"a": b"1", "b": b"2"} and os.listdir(tmp_path) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.torchfree
def test_a_staged_directory_over_a_file_or_a_link_leaves_nothing_behind(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_bytes(b"kept")
    (tmp_path / "file").write_bytes(b"old")
    (tmp_path / "link").symlink_to(target)
    for name in ("file", "link"):
        with _stage_directory(tmp_path / name, {"new": b"new"}) as staging:
            staging.commit()
        assert snapshot(tmp_path / name) == {"new": b"new"}
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "file", "link"]  # no hidden .old left
    assert snapshot(target) == {"keep": b"kept"}  # a link's target is never touched


@pytest.mark.torchfree
def test_a_staged_directory_replaces_an_old_one_only_on_commit(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_bytes(b"old")
    with _stage_directory(out, {"new": b"new"}):  # vetoed: never committed
        pass
    assert snapshot(out) == {"old": b"old"} and os.listdir(tmp_path) == ["out"]
    with pytest.raises(RuntimeError), _stage_directory(out, {"new": b"new"}):
        raise RuntimeError("interrupted while writing")
    assert snapshot(out) == {"old": b"old"} and os.listdir(tmp_path) == ["out"]
    with _stage_directory(out, {"new": b"new"}) as staging:
        staging.commit()
    assert snapshot(out) == {"new": b"new"} and os.listdir(tmp_path) == ["out"]  # the old one is gone


@pytest.mark.torchfree
def test_a_failed_directory_rename_puts_the_old_one_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_bytes(b"old")
    real_rename = os.rename

    def flaky(src, dst):
        if str(src).endswith(".tmp"):  # the new directory into place, after the old one moved aside
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OutputError, match="cannot rename the output into place .Input/output error.*back as it was"):
        with _stage_directory(out, {"new": b"new"}) as staging:
            staging.commit()
    monkeypatch.undo()
    assert snapshot(out) == {"old": b"old"} and os.listdir(tmp_path) == ["out"]


@pytest.mark.torchfree
def test_a_staged_directory_needs_a_writable_parent(tmp_path):
    with pytest.raises(OutputError, match="cannot create a directory in"):
        StagedDirectory(str(tmp_path / "missing" / "out"))


def plain_layout(sizes: dict[str, int]) -> Layout:
    """float32 tensors of the given element counts, each filled with its own byte."""
    blobs, views = [], []
    for i, (key, n) in enumerate(sizes.items()):
        blobs.append(Blob("float32", 4 * n, lambda n=n, i=i: [bytes([i + 1]) * (4 * n)]))
        views.append(View(key, i, "float32", (n,), (1,)))
    return Layout(tuple(blobs), tuple(views))


def snapshot(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_a_set_replacing_a_bigger_one_removes_the_old_shards(tmp_path):
    path = str(tmp_path / "model.safetensors")
    old = write_checkpoint(path, plain_layout({f"w{i}": 100 for i in range(4)}), max_shard_size=400)
    assert len(old.files) == 5 and old.removed == ()
    new = write_checkpoint(path, plain_layout({f"w{i}": 100 for i in range(4)}), max_shard_size=800)
    assert [os.path.basename(f) for f in new.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert sorted(new.removed) == sorted(old.files[:-1])
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(f) for f in new.files)
    assert list(open_checkpoint(new.path).tensors) == ["w0", "w1", "w2", "w3"]


def test_replacing_a_set_never_removes_an_input_or_a_file_outside_it(tmp_path):
    path = str(tmp_path / "model.safetensors")
    old = write_checkpoint(path, plain_layout({f"w{i}": 100 for i in range(3)}), max_shard_size=400)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.safetensors").write_bytes(b"not the set's")
    (tmp_path / "outside.safetensors").write_bytes(b"keep me")
    index["weight_map"].update({"a": "sub/x.safetensors", "b": "../outside.safetensors", "c": ".."})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    new = write_checkpoint(path, plain_layout({"w0": 300, "w1": 300}), max_shard_size=1300, inputs=[old.files[0]])
    assert sorted(new.removed) == sorted(old.files[1:3])
    assert os.path.exists(old.files[0])  # an input of the write
    assert (tmp_path / "sub" / "x.safetensors").read_bytes() == b"not the set's"
    assert (tmp_path / "outside.safetensors").read_bytes() == b"keep me"


def test_a_rename_failing_midway_puts_the_old_set_back(tmp_path, monkeypatch):
    path = str(tmp_path / "model.safetensors")
    write_checkpoint(path, plain_layout({f"w{i}": 100 for i in range(3)}), max_shard_size=400)
    before = snapshot(tmp_path)
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the second shard of the new set
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OutputError, match="cannot rename the output into place .Input/output error.*back as they were"):
        write_checkpoint(path, plain_layout({f"w{i}": 150 for i in range(3)}), max_shard_size=700)
    monkeypatch.setattr(os, "replace", real_replace)
    assert snapshot(tmp_path) == before  # the old index and shards, byte for byte; no staging left
    assert list(open_checkpoint(str(tmp_path / "model.safetensors.index.json")).tensors) == ["w0", "w1", "w2"]


def test_a_failed_single_file_replace_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old contents")

    def failing(src, dst):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OutputError, match="Permission denied"):
        write_checkpoint(str(path), failing_layout_ok())
    monkeypatch.undo()
    assert snapshot(tmp_path) == {"out.safetensors": b"old contents"}


# --- output checks ---------------------------------------------------------------------------------


def test_check_output_rules(tmp_path):
    src = tmp_path / "in.pth"
    src.write_bytes(b"x")
    out = tmp_path / "out.pth"
    assert check_output(str(out), [str(src)]) is None
    out.write_bytes(b"y")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        check_output(str(out), [str(src)])
    assert check_output(str(out), [str(src)], force=True) is None
    with pytest.raises(OutputError, match="is the input file; pass --in-place"):
        check_output(str(src), [str(src)], force=True)
    os.symlink(src, tmp_path / "link.pth")
    with pytest.raises(OutputError, match="is the input file"):
        check_output(str(tmp_path / "link.pth"), [str(src)])
    assert check_output(str(src), [str(src)], in_place=True) == str(src) + ".bak"
    (tmp_path / "in.pth.bak").write_bytes(b"")
    with pytest.raises(OutputError, match="backup .* already exists"):
        check_output(str(src), [str(src)], in_place=True)
    with pytest.raises(UsageError, match="is not the input"):
        check_output(str(out), [str(src)], in_place=True, force=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_output(str(tmp_path / "no" / "o.pth"), [str(src)])
    with pytest.raises(OutputError, match="is a directory"):
        check_output(str(tmp_path), [str(src)])


@pytest.mark.parametrize(
    "name, fmt",
    [("a.safetensors", "safetensors"), ("a.PTH", "pth"), ("a.pt", "pth"), ("a.bin", "pth"), ("x/a.ckpt", "pth")],
)
def test_output_format(name, fmt):
    assert output_format(name) == fmt


def test_unknown_extension():
    with pytest.raises(UsageError, match="unknown output extension '.h5'"):
        output_format("a.h5")
    with pytest.raises(UsageError, match="'.none.'"):
        output_format("model")


@pytest.mark.parametrize(
    "text, size",
    [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("1048576", 1048576), ("10kb", 10**4)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "-1GB", "0", "2XB"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="--max-shard-size"):
        parse_size(text)


def test_zip64_entries_stay_aligned_and_loadable(tmp_path, torch, monkeypatch):
    # storages over 4 GB need zip64 headers (20 more bytes); a lower limit exercises that path here
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1000)
    tensors = {"big": torch.arange(600, dtype=torch.float32), "small": torch.ones(3)}
    path = str(tmp_path / "z64.pth")
    write_checkpoint(path, tensor_layout(tensors))
    monkeypatch.undo()
    info = zipfile.ZipFile(path).getinfo("archive/data/0")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    assert extra_len > 20  # padding plus the zip64 field
    assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0
    assert_same(tensors, torch.load(path, weights_only=True), torch)


@pytest.mark.parametrize("name", ["out.safetensors", "out.pth"])
def test_progress_counts_every_tensor_byte_once(tmp_path, torch, name):
    tensors = sample(torch)
    layout = tensor_layout(tensors)
    ticks: list[tuple[int, int]] = []
    write_checkpoint(str(tmp_path / name), layout, progress=lambda n, total: ticks.append((n, total)))
    total = sum(b.nbytes for b in layout.blobs)
    assert ticks and {t for _, t in ticks} == {total}
    assert sum(n for n, _ in ticks) == total


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_writeback_is_started_as_the_output_grows_and_changes_no_byte(tmp_path, monkeypatch, suffix):
    from click.testing import CliRunner

    import ckpt_tool.writer as writer
    from ckpt_tool.cli import main

    started: list[tuple[int, int, int]] = []
    real = writer._sync_file_range()

    def record(fd, offset, nbytes, flags):
        started.append((os.fstat(fd).st_size, offset, nbytes))
        return real(fd, offset, nbytes, flags) if real is not None else 0

    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 256)
    monkeypatch.setattr(writer, "_sync_file_range", lambda: record)
    out = str(tmp_path / f"o{suffix}")
    result = CliRunner().invoke(main, ["convert", "fixtures/tiny_cnn.pth", out])
    assert result.exit_code == 0 and "verified" in result.output, result.output
    assert started and all(0 <= o and 0 < n and o + n <= size for size, o, n in started)
    if suffix == ".safetensors":  # the writeback of every tensor byte was asked for, each range once
        ranges = sorted((o, o + n) for _, o, n in started)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
        assert sum(n for _, _, n in started) == sum(t.nbytes for t in open_checkpoint(out).tensors.values())
