"""torch.distributed.checkpoint directories: read, diffed, scanned and converted, checked against dcp.load."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from migrate_helpers import signature_cache_fixture  # noqa: F401 - autouse: a cache per test
from safetensors.torch import load_file, save_file

from ckpt_tool.cli import main
from ckpt_tool.errors import FormatError, InputError
from ckpt_tool.formats.dcp import chunks_of, read_metadata
from ckpt_tool.formats.pickle_vm import PickleVM, Trace
from ckpt_tool.reader import open_checkpoint
from ckpt_tool.scan.policy import ALLOWED

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::UserWarning")]

ARCH = textwrap.dedent("""
    from torch import nn


    def tiny():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
""")

# each rank of two (gloo) saves its shards: rows split on dim 0, cols on dim 1 (DTensors), a
# replicated DTensor, a plain tensor and a plain value
TWO_RANKS = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp, torch.multiprocessing as mp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor


    def full():
        g = torch.Generator().manual_seed(0)
        return {"rows": torch.randn(6, 4, generator=g), "cols": torch.randn(3, 8, generator=g).to(torch.bfloat16),
                "rep": torch.randn(5, generator=g), "plain": torch.arange(10)}


    def rank(r, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=r, world_size=2)
        mesh = init_device_mesh("cpu", (2,))
        f = full()
        sd = {"rows": distribute_tensor(f["rows"], mesh, [Shard(0)]),
              "cols": distribute_tensor(f["cols"], mesh, [Shard(1)]),
              "rep": distribute_tensor(f["rep"], mesh, [Replicate()]), "plain": f["plain"], "epoch": 3}
        dcp.save(sd, checkpoint_id=out)
        dist.destroy_process_group()


    if __name__ == "__main__":
        mp.spawn(rank, args=(sys.argv[1], sys.argv[2]), nprocs=2)
""")


class Payload:
    """An object whose pickle names os.system: dcp.load would call it (bytes entries are loaded with
    weights_only=False); here it is only ever pickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("true",))


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="session")
def dcp_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DCP directories written by dcp.save: one process (a model and mixed entries), two gloo ranks."""
    root = tmp_path_factory.mktemp("dcp")
    torch.manual_seed(0)
    (root / "arch.py").write_text(ARCH)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    dcp.save(model.state_dict(), checkpoint_id=str(root / "model"))
    mixed = {
        "w": torch.randn(4, 3),
        "t": torch.randn(3, 5).t(),
        "bf": torch.randn(7).to(torch.bfloat16),
        "i": torch.arange(6, dtype=torch.int64),
        "nested": {"x": torch.ones(2)},
        "step": 7,
        "name": "run-1",
    }
    dcp.save(mixed, checkpoint_id=str(root / "mixed"))
    dcp.save({"w": torch.ones(2), "evil": Payload()}, checkpoint_id=str(root / "evil"))
    optim = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optim.step()
    dcp.save({"model": model.state_dict(), "optim": optim.state_dict(), "epoch": 2}, checkpoint_id=str(root / "app"))
    (root / "two.py").write_text(TWO_RANKS)
    subprocess.run(
        [sys.executable, str(root / "two.py"), str(root / "two"), _free_port()],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return {
        "root": root,
        "model": root / "model",
        "mixed": root / "mixed",
        "two": root / "two",
        "evil": root / "evil",
        "app": root / "app",
        "arch": root / "arch.py",
    }


def _truth(directory: Path) -> dict[str, Any]:
    """What dcp.load itself reads from ``directory``: every tensor at its global shape, every value."""
    meta = dcp.FileSystemReader(str(directory)).read_metadata()
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    sd: dict[str, Any] = {
        k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
        for k, m in meta.state_dict_metadata.items()
    }
    dcp.load(sd, checkpoint_id=str(directory))
    return sd


def _run(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result: Any, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# --- reading -------------------------------------------------------------------------------------


def test_inspect_shows_every_tensor_and_value_as_dcp_load_reads_them(dcp_dirs: dict[str, Path]) -> None:
    truth = _truth(dcp_dirs["mixed"])
    result = _run("inspect", "--json", dcp_dirs["mixed"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["format"] == "dcp"
    rows = {r["name"]: r for r in report["rows"]}
    tensors = {k: v for k, v in truth.items() if isinstance(v, torch.Tensor)}
    assert set(rows) == set(tensors) == {"w", "t", "bf", "i", "nested.x"}
    for key, t in tensors.items():
        assert rows[key]["shape"] == list(t.shape) and rows[key]["dtype"] == str(t.dtype).removeprefix("torch.")
        assert rows[key]["detail"] == f"{[0] * t.dim()}+{list(t.shape)} in __0_0.distcp"
    assert report["objects"] == {"step": 7, "name": "run-1"} == {k: truth[k] for k in ("step", "name")}


def test_two_ranks_chunks_are_listed_with_their_files(dcp_dirs: dict[str, Path]) -> None:
    ckpt = open_checkpoint(str(dcp_dirs["two"]))
    truth = _truth(dcp_dirs["two"])
    assert {k: (r.shape, r.dtype) for k, r in ckpt.tensors.items()} == {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in truth.items()
        if isinstance(v, torch.Tensor)
    }
    rows = chunks_of(ckpt.tensors["rows"])
    cols = chunks_of(ckpt.tensors["cols"])
    assert rows is not None and cols is not None
    assert [(c.offsets, c.sizes, os.path.basename(c.item.file)) for c in rows] == [
        ((0, 0), (3, 4), "__0_0.distcp"),
        ((3, 0), (3, 4), "__1_0.distcp"),
    ]
    assert [(c.offsets, c.sizes, os.path.basename(c.item.file)) for c in cols] == [
        ((0, 0), (3, 4), "__0_0.distcp"),
        ((0, 4), (3, 4), "__1_0.distcp"),
    ]
    assert ckpt.objects == {"epoch": 3}
    table = _run("inspect", dcp_dirs["two"])
    assert table.exit_code == 0
    assert "[0, 0]+[3, 4] in __0_0.distcp; [3, 0]+[3, 4] in __1_0.distcp" in table.output


def test_metadata_globals_are_exactly_the_allowlisted_dcp_records(dcp_dirs: dict[str, Path]) -> None:
    names: set[str] = set()
    for which in ("model", "mixed", "two"):
        trace = Trace()
        with open(dcp_dirs[which] / ".metadata", "rb") as f:
            PickleVM(None, trace).load(f)
        names |= {e.name for e in trace.globals}
    dcp_names = {n for n in names if n.startswith("torch.distributed.")}
    assert dcp_names == {
        f"torch.distributed.checkpoint.metadata.{c}"
        for c in (
            "Metadata",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    } | {"torch.distributed.checkpoint.filesystem._StorageInfo"}
    assert all(ALLOWED.get(n) for n in names), sorted(n for n in names if n not in ALLOWED)


def test_lone_distcp_file_names_its_directory(dcp_dirs: dict[str, Path], tmp_path: Path) -> None:
    shard = dcp_dirs["two"] / "__1_0.distcp"
    line = _one_line_error(_run("inspect", shard))
    assert "one shard of the torch.distributed.checkpoint directory" in line and str(dcp_dirs["two"]) in line
    _one_line_error(_run("convert", shard, tmp_path / "x.safetensors"))
    alone = tmp_path / "__0_0.distcp"
    alone.write_bytes(shard.read_bytes())
    assert "holds no .metadata" in _one_line_error(_run("inspect", alone))


# --- bad input -------------------------------------------------------------------------------------


def _broken_copy(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if how == "truncated metadata":
        data = (dst / ".metadata").read_bytes()
        (dst / ".metadata").write_bytes(data[: len(data) // 2])
    elif how == "missing shard":
        (dst / "__1_0.distcp").unlink()
    else:  # the chunks recorded past the end of a shard file
        os.truncate(dst / "__1_0.distcp", 3000)
    return dst


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("truncated metadata", "not a readable DCP metadata pickle"),
        ("missing shard", "shard file named in .metadata does not exist"),
        ("offsets past the end", "past the end of the file"),
    ],
)
def test_bad_directories_get_one_line_and_exit_2(
    dcp_dirs: dict[str, Path], tmp_path: Path, how: str, says: str
) -> None:
    bad = _broken_copy(dcp_dirs["two"], tmp_path / "bad", how)
    for args in (("inspect", bad), ("convert", bad, tmp_path / "out.pth"), ("diff", bad, dcp_dirs["two"])):
        assert says in _one_line_error(_run(*args))
    assert not (tmp_path / "out.pth").exists()
    with pytest.raises((FormatError, InputError)):
        open_checkpoint(str(bad))
    validated = _run("validate", bad)
    assert validated.exit_code == 1 and says in validated.output


# --- diff --------------------------------------------------------------------------------------------


def test_diff_against_the_architecture_and_a_checkpoint(dcp_dirs: dict[str, Path], tmp_path: Path) -> None:
    spec = f"{dcp_dirs['arch']}:tiny"
    result = _run("diff", dcp_dirs["model"], "--arch", spec, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["loads_strictly"] is True
    save_file({k: v for k, v in _truth(dcp_dirs["model"]).items() if k != "2.bias"}, tmp_path / "m.safetensors")
    result = _run("diff", dcp_dirs["model"], tmp_path / "m.safetensors", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["loads_strictly"] is False
    assert [r["key"] for r in report["keys"] if r["status"] != "matched"] == ["2.bias"]


# --- DCP -> safetensors / .pth ------------------------------------------------------------------------


def test_convert_two_ranks_to_pth_matches_dcp_load(dcp_dirs: dict[str, Path], tmp_path: Path) -> None:
    truth = _truth(dcp_dirs["two"])
    result = _run("convert", dcp_dirs["two"], tmp_path / "out.pth")
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "gathered from 2 DCP chunks" in result.output
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(out) == set(truth) and out["epoch"] == 3
    for key, t in truth.items():
        if isinstance(t, torch.Tensor):
            assert out[key].dtype == t.dtype and torch.equal(out[key], t), key


def test_convert_to_safetensors_refuses_a_bytes_entry_then_writes_without_it(
    dcp_dirs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out.safetensors"
    line = _one_line_error(_run("convert", dcp_dirs["two"], out))
    assert "'epoch'" in line and not out.exists()
    result = _run("migrate", dcp_dirs["two"], "--exclude", "^epoch$", "-o", out)
    assert result.exit_code == 0, result.output
    truth = _truth(dcp_dirs["two"])
    got = load_file(out)
    assert set(got) == {k for k, v in truth.items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(got[k], truth[k]) and got[k].dtype == truth[k].dtype for k in got)


def test_convert_to_sharded_safetensors(dcp_dirs: dict[str, Path], tmp_path: Path) -> None:
    result = _run("convert", dcp_dirs["model"], tmp_path / "model.safetensors", "--max-shard-size", "200")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    got: dict[str, torch.Tensor] = {}
    for shard in set(index["weight_map"].values()):
        got.update(load_file(tmp_path / shard))
    truth = _truth(dcp_dirs["model"])
    assert len(set(index["weight_map"].values())) > 1 and set(got) == set(truth)
    assert all(torch.equal(got[k], truth[k]) for k in got)


def test_verification_catches_a_chunk_that_changed_under_the_read(
    dcp_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt_tool.formats import dcp as dcp_format

    real = dcp_format.iter_gathered
    calls = {"n": 0}

    def flaky(ref: Any, files: Any, chunk_bytes: int) -> Any:
        calls["n"] += 1
        for data in real(ref, files, chunk_bytes):
            # the second read (the verification's) sees other bytes than the write did
            yield bytes(b ^ 1 for b in data) if calls["n"] > 2 and ref.key == "rows" else data

    monkeypatch.setattr(dcp_format, "iter_gathered", flaky)
    result = _run("convert", dcp_dirs["two"], tmp_path / "out.pth")
    assert result.exit_code == 1 and "verification failed" in result.output
    assert not (tmp_path / "out.pth").exists()  # not what was planned: never renamed into place


# --- safetensors / .pth -> DCP ------------------------------------------------------------------------


def test_convert_to_dcp_reads_back_bit_identical_with_dcp_load(dcp_dirs: dict[str, Path], tmp_path: Path) -> None:
    state = {
        "a": torch.randn(5, 3),
        "b": torch.randn(4).to(torch.bfloat16),
        "c": torch.arange(7, dtype=torch.int32),
        "d": torch.tensor([float("nan"), -0.0, 1.0], dtype=torch.float16),
        "e": torch.zeros(0, 2),
    }
    save_file(state, tmp_path / "in.safetensors")
    out = tmp_path / "out_dcp"
    result = _run("convert", tmp_path / "in.safetensors", out, "--format", "dcp")
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary directory left
    back = _truth(out)
    assert set(back) == set(state)
    for key, t in state.items():
        assert back[key].dtype == t.dtype and back[key].view(torch.uint8).equal(t.view(torch.uint8)), key
    # the .pth of a two-rank checkpoint (a plain value beside the tensors) goes back to DCP too
    assert _run("convert", dcp_dirs["two"], tmp_path / "two.pth").exit_code == 0
    result = _run("convert", tmp_path / "two.pth", tmp_path / "two_dcp", "--format", "dcp")
    assert result.exit_code == 0, result.output
    again, truth = _truth(tmp_path / "two_dcp"), _truth(dcp_dirs["two"])
    assert again["epoch"] == 3
    assert all(torch.equal(again[k], v) for k, v in truth.items() if isinstance(v, torch.Tensor))
    # module versions have no place in a DCP directory: said so in DCP's own terms
    torch.save(torch.nn.Sequential(torch.nn.BatchNorm1d(2)).state_dict(), tmp_path / "bn.pth")
    result = _run("convert", tmp_path / "bn.pth", tmp_path / "bn_dcp", "--format", "dcp")
    assert result.exit_code == 0, result.output
    assert "note: _metadata (module versions of 2 modules) is not kept: a DCP directory has no place" in result.output


def test_dcp_output_is_never_replaced_without_force(tmp_path: Path) -> None:
    save_file({"a": torch.ones(3)}, tmp_path / "in.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert "already exists" in _one_line_error(_run("convert", tmp_path / "in.safetensors", out, "--format", "dcp"))
    assert (out / "keep").exists()
    assert _run("convert", tmp_path / "in.safetensors", out, "--format", "dcp", "--force").exit_code == 0
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp"]
    line = _one_line_error(
        _run("convert", tmp_path / "in.safetensors", tmp_path / "o", "--format", "dcp", "--max-shard-size", "1KB")
    )
    assert "--max-shard-size" in line


def test_a_dcp_output_that_fails_verification_replaces_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file({"a": torch.ones(3), "b": torch.zeros(2)}, tmp_path / "in.safetensors")
    out = tmp_path / "out"
    assert _run("convert", tmp_path / "in.safetensors", out, "--format", "dcp").exit_code == 0
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    import torch as torch_module

    saved = torch_module.save

    def corrupting(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, torch_module.Tensor) and obj.numel() == 3:
            obj = obj + 1  # the staged chunk of "a" holds other values than the source
        saved(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch_module, "save", corrupting)
    result = _run("convert", tmp_path / "in.safetensors", out, "--format", "dcp", "--force")
    monkeypatch.setattr(torch_module, "save", saved)
    assert result.exit_code == 1 and "verification failed" in result.output and "not written:" in result.output
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # the staged directory is gone


def test_a_dcp_output_that_cannot_be_renamed_into_place_puts_the_old_one_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_file({"a": torch.ones(3)}, tmp_path / "in.safetensors")
    out = tmp_path / "out"
    assert _run("convert", tmp_path / "in.safetensors", out, "--format", "dcp").exit_code == 0
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    real = {"rename": os.rename, "replace": os.replace}

    def failing(name: str) -> Callable[[Any, Any], None]:
        def move(src: Any, dst: Any) -> None:
            staged = os.path.basename(str(src))
            if staged.startswith(".out.") and staged.endswith(".tmp") and str(dst) == str(out):
                raise OSError(28, "No space left on device")  # the new directory into place
            real[name](src, dst)

        return move

    monkeypatch.setattr(os, "rename", failing("rename"))
    monkeypatch.setattr(os, "replace", failing("replace"))
    result = _run("convert", tmp_path / "in.safetensors", out, "--format", "dcp", "--force")
    monkeypatch.undo()
    assert "No space left on device" in _one_line_error(result)
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before  # the old directory, as it was
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "out"]  # nothing staged or set aside is left


# --- scan -----------------------------------------------------------------------------------------------


def test_scan_judges_metadata_by_the_allowlist_and_every_item(dcp_dirs: dict[str, Path]) -> None:
    result = _run("scan", "--json", dcp_dirs["two"])
    assert result.exit_code == 0, result.output
    files = {os.path.basename(f["path"]): f for f in json.loads(result.output)["files"]}
    assert set(files) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert {f["verdict"] for f in files.values()} == {"safe"}
    assert files["__1_0.distcp"]["format"] == "dcp-shard"
    # rank 1 wrote rows/cols' second halves, rep, plain and epoch: one stream per archive's data.pkl
    assert len(files["__1_0.distcp"]["streams"]) == 5


def test_scan_finds_a_payload_in_a_bytes_entry(dcp_dirs: dict[str, Path]) -> None:
    result = _run("scan", dcp_dirs["evil"])
    assert result.exit_code == 1
    assert "__0_0.distcp" in result.output and "unsafe" in result.output and "system" in result.output
    # reading it runs nothing: the payload stays an inert placeholder
    ckpt = open_checkpoint(str(dcp_dirs["evil"]))
    assert ckpt.placeholders and "system" in ckpt.placeholders[0]
    assert set(ckpt.tensors) == {"w"}


def test_read_metadata_needs_no_torch_objects(dcp_dirs: dict[str, Path]) -> None:
    meta = read_metadata(str(dcp_dirs["two"]))
    assert list(meta.tensors) == ["rows", "cols", "rep", "plain"] and list(meta.objects) == ["epoch"]
    assert [os.path.basename(f) for f in meta.files] == sorted(os.path.basename(f) for f in meta.files)
    assert all(type(v).__module__.startswith("ckpt_tool") for v in meta.tensors.values())


def test_diff_values_compares_gathered_tensors_element_by_element(dcp_dirs: dict[str, Path], tmp_path: Path) -> None:
    truth = {k: v for k, v in _truth(dcp_dirs["two"]).items() if isinstance(v, torch.Tensor)}
    changed = {k: v.clone() for k, v in truth.items()}
    changed["cols"][2, 7] += 1  # the second rank's half of a tensor split on dim 1
    save_file(changed, tmp_path / "changed.safetensors")
    result = _run("diff", dcp_dirs["two"], tmp_path / "changed.safetensors", "--values", "--json")
    assert result.exit_code == 0, result.output
    diffs = {k["key"]: k["max_abs_diff"] for k in json.loads(result.output)["keys"]}
    assert diffs["rows"] == diffs["rep"] == diffs["plain"] == 0.0
    assert diffs["cols"] == pytest.approx(float((changed["cols"].float() - truth["cols"].float()).abs().max()))


def test_browse_shows_the_directory_and_scans_its_metadata(dcp_dirs: dict[str, Path]) -> None:
    from ckpt_tool.browse.view import ModuleTree, load
    from ckpt_tool.scan import scan

    data = load(str(dcp_dirs["two"]), arch=None)
    assert data.summary.format == "dcp" and data.summary.tensors == 4
    assert [os.path.basename(f) for f in data.files] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert {f.verdict for f in scan(data.files).files} == {"safe"}
    assert sorted(ModuleTree(data).keys) == ["cols", "plain", "rep", "rows"]


def test_a_corrupt_chunk_is_found_when_read_and_by_scan(dcp_dirs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dcp_dirs["two"], bad)
    item = next(i for _, i in read_metadata(str(bad)).items() if i.file.endswith("__1_0.distcp"))
    with open(item.file, "r+b") as f:  # the chunk's zip directory at its end, zeroed
        f.seek(item.offset + item.length - 100)
        f.write(b"\0" * 100)
    assert _run("inspect", bad).exit_code == 0  # describing reads .metadata only
    converted = _run("convert", bad, tmp_path / "out.pth")  # the plan's notes come first, then one error line
    errors = [line for line in converted.output.splitlines() if line.startswith("ckpt: error:")]
    assert converted.exit_code == 2 and "Traceback" not in converted.output
    assert len(errors) == 1 and "chunk [3, 0] of tensor 'rows'" in errors[0] and "not a torch.save archive" in errors[0]
    assert not (tmp_path / "out.pth").exists()
    scanned = _run("scan", bad)
    assert scanned.exit_code == 1 and "broken" in scanned.output
    assert _run("validate", bad).exit_code == 1


def test_a_nested_save_opens_at_its_model_and_key_picks_another_part(dcp_dirs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = open_checkpoint(str(dcp_dirs["app"]))
    assert ckpt.state_path == "model" and [c.path for c in ckpt.candidates] == ["model", "optim"]
    assert list(ckpt.tensors) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert ckpt.extras == {"optim": "<optimizer state: 12 tensors, 552 bytes>", "epoch": 2}
    result = _run("diff", dcp_dirs["app"], "--arch", f"{dcp_dirs['arch']}:tiny", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["loads_strictly"] is True
    optim = open_checkpoint(str(dcp_dirs["app"]), "optim")
    assert "state.0.exp_avg" in optim.tensors and optim.objects["param_groups.0.lr"] == 0.001
    assert "candidates: 'model', 'optim'" in _one_line_error(_run("inspect", dcp_dirs["app"], "--key", "nope"))
    # converting writes the model: the optimizer state is dropped by name, the epoch kept on request
    result = _run("migrate", dcp_dirs["app"], "--keep-extras", "-o", tmp_path / "m.pth", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["plan"]["extras_dropped"] == {
        "optim": "optimizer state: only a single .pth output carries it"
    }
    out = torch.load(tmp_path / "m.pth", weights_only=True)
    truth = _truth(dcp_dirs["app"])
    assert out["epoch"] == 2 and set(out["model"]) == set(ckpt.tensors)
    assert all(torch.equal(out["model"][k], truth[f"model.{k}"]) for k in ckpt.tensors)


def test_describing_and_converting_a_dcp_directory_never_imports_torch(
    dcp_dirs: dict[str, Path], tmp_path: Path
) -> None:
    code = textwrap.dedent(f"""
        import sys
        from ckpt_tool.inspect import inspect_checkpoint
        from ckpt_tool.migrate import migrate
        from ckpt_tool.plan import Plan, operation
        report = inspect_checkpoint({str(dcp_dirs["two"])!r})
        done = migrate(Plan({str(dcp_dirs["two"])!r}, operations=(operation("exclude", pattern="^epoch$"),)),
                       {str(tmp_path / "out.safetensors")!r})
        assert report.tensors == 4 and done.ok, done
        assert "torch" not in sys.modules, "torch was imported"
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
