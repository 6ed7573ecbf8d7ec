"""validate: scan + loadability + [tool.ckpt] policies + sharded sets as a whole."""

from __future__ import annotations

import json
import os

import pytest
from scan_helpers import write_malicious, write_peer_attacks, write_sharded

from ckpt_tool.config import ProjectConfig
from ckpt_tool.errors import UsageError
from ckpt_tool.validate import FAIL, NOTE, PASS, rules_from_config, validate


@pytest.fixture(scope="module")
def files(tmp_path_factory, models):
    import torch
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("validate")
    sd = models.state_dict("resnet18", num_classes=10)
    paths = {"pth": str(out / "models" / "cls_resnet.pth"), "st": str(out / "models" / "cls_resnet.safetensors")}
    os.makedirs(out / "models")
    torch.save(sd, paths["pth"])
    save_file(sd, paths["st"])
    nested = str(out / "models" / "det_nested.pth")
    torch.save({"state_dict": sd, "epoch": 1}, nested)
    paths["nested"] = nested
    bad = dict(sd)
    bad["fc.bias"] = torch.tensor([float("nan")] + [0.0] * 9)
    bad["fc.weight"] = bad["fc.weight"].clone()
    bad["fc.weight"][0, 0] = float("inf")
    paths["nan"] = str(out / "nan.safetensors")
    save_file(bad, paths["nan"])
    paths["sharded"] = write_sharded(str(out / "sharded"), sd)
    paths["state"] = sd
    return paths


def _config(tmp_path, text: str) -> str:
    (tmp_path / "pyproject.toml").write_text(text)
    return str(tmp_path)


def _checks(report, index: int = 0) -> dict[str, tuple[str, str]]:
    return {c.name: (c.status, c.message) for c in report.files[index].checks}


def test_clean_file_passes_scan_and_loads(files, tmp_path):
    report = validate([files["st"]], config_dir=str(tmp_path))
    assert report.ok
    checks = _checks(report)
    assert checks["scan"][0] == PASS and checks["loads"] == (PASS, "122 tensors described consistently")


def test_malicious_file_fails_and_nothing_runs(tmp_path):
    paths = write_malicious(str(tmp_path / "m"), str(tmp_path / "MARKER"), with_torch=False)
    report = validate([paths["global_os_system"]], config_dir=str(tmp_path))
    assert not report.ok
    status, message = _checks(report)["scan"]
    assert status == FAIL and message.startswith("unsafe: os.system")
    assert not (tmp_path / "MARKER").exists()


def test_truncated_file_fails_loadability(files, tmp_path):
    path = tmp_path / "cut.pth"
    with open(files["pth"], "rb") as f:
        data = f.read()
    # cut inside the last storage but keep the archive's directory readable: only the reader notices
    import zipfile

    with zipfile.ZipFile(files["pth"]) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            blob = zin.read(info)
            zout.writestr(info, blob[: len(blob) // 2] if info.filename.endswith("/data/0") else blob)
    assert len(data) > 0
    report = validate([str(path)], config_dir=str(tmp_path))
    status, message = _checks(report)["loads"]
    assert status == FAIL and "data/0 holds" in message


def test_require_format_and_max_size(files, tmp_path):
    root = _config(tmp_path, '[tool.ckpt]\nrequire-format = "safetensors"\nmax-size-mb = 10\n')
    report = validate([files["pth"], files["st"]], config_dir=root)
    pth, st = _checks(report, 0), _checks(report, 1)
    assert pth["format"][0] == FAIL and "requires safetensors" in pth["format"][1]
    assert st["format"] == (PASS, "safetensors")
    assert pth["size"][0] == FAIL and "over the 10 MB limit" in pth["size"][1]
    assert report.config == os.path.join(root, "pyproject.toml")


def test_no_nan_inf_streams_values(files, tmp_path):
    root = _config(tmp_path, "[tool.ckpt]\nno-nan-inf = true\n")
    report = validate([files["nan"], files["st"]], config_dir=root)
    bad, good = _checks(report, 0)["values"], _checks(report, 1)["values"]
    assert bad[0] == FAIL and "fc.bias (1 NaN, 0 Inf)" in bad[1] and "fc.weight (0 NaN, 1 Inf)" in bad[1]
    assert good == (PASS, "102 floating tensors, no NaN or Inf")


def test_arch_expectations_by_glob(files):
    from ckpt_tool.validate import validate_file

    # globs are relative to the directory of the pyproject.toml; here, the one holding models/
    config = ProjectConfig(
        os.path.join(os.path.dirname(os.path.dirname(files["pth"])), "pyproject.toml"),
        {
            "arch": {
                "models/cls_*": {"arch": "resnet18", "args": {"num_classes": 10}},
                "models/det_*.pth": {"arch": "resnet18", "key": "state_dict"},
            }
        },
    )
    rules = rules_from_config(config)
    good = {c.name: c for c in validate_file(files["st"], rules).checks}
    assert good["arch"].status == PASS and "all 122 keys match" in good["arch"].message
    # the nested file is matched by the second glob: 1000 classes expected, 10 stored
    det = {c.name: c for c in validate_file(files["nested"], rules).checks}
    assert det["arch"].status == FAIL
    assert "2 shape mismatches" in det["arch"].message and "fc.weight" in det["arch"].message


def test_lfs_pointer_passes_with_a_note_unless_configured(tmp_path):
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 9\n")
    report = validate([str(pointer)], config_dir=str(tmp_path))
    assert report.ok and _checks(report)["lfs"][0] == NOTE
    assert "not fetched" in _checks(report)["lfs"][1]
    root = _config(tmp_path, '[tool.ckpt]\nlfs-pointers = "fail"\n')
    assert not validate([str(pointer)], config_dir=root).ok


def test_sharded_set_is_checked_as_a_whole(files, tmp_path):
    report = validate([files["sharded"]], config_dir=str(tmp_path))
    assert report.ok, report.files[0].checks
    checks = _checks(report)
    assert checks["shards"] == (PASS, "2 shards, 122 keys, all scanned safe")
    assert checks["total_size"][0] == PASS
    assert report.files[0].format == "sharded (safetensors)"


def _broken_index(files, tmp_path, edit) -> dict[str, tuple[str, str]]:
    index = write_sharded(str(tmp_path / "set"), files["state"])
    with open(index) as f:
        data = json.load(f)
    text = edit(data)
    with open(index, "w") as f:
        f.write(text if isinstance(text, str) else json.dumps(data))
    report = validate([index], config_dir=str(tmp_path))
    assert not report.ok
    return {c.name + ":" + c.message: c for c in report.files[0].checks}


def test_sharded_set_defects(files, tmp_path):
    def escape(d):
        d["weight_map"]["fc.bias"] = "../outside.safetensors"

    def missing(d):
        d["weight_map"]["fc.bias"] = "model-00009-of-00009.safetensors"

    def total(d):
        d["metadata"]["total_size"] += 4

    def moved(d):
        d["weight_map"]["conv1.weight"] = "model-00002-of-00002.safetensors"

    for edit, text in (
        (escape, "escapes the checkpoint's directory"),
        (missing, "does not exist"),
        (total, "the shards' tensors hold"),
        (moved, "places in a shard that lacks them"),
    ):
        checks = _broken_index(files, tmp_path / edit.__name__, edit)
        assert any(text in key for key in checks), (edit.__name__, list(checks))


def test_key_listed_twice_in_the_index_is_a_key_in_two_shards(files, tmp_path):
    def doubled(d):
        text = json.dumps(d)
        return text.replace('"fc.bias": ', '"fc.bias": "model-00001-of-00002.safetensors", "fc.bias": ', 1)

    checks = _broken_index(files, tmp_path, doubled)
    assert any("listed twice" in key and "fc.bias" in key for key in checks)


def test_bad_config_is_a_usage_error(tmp_path, files):
    for text, match in (
        ('[tool.ckpt]\nrequire-format = "onnx"\n', "require-format"),
        ("[tool.ckpt]\nmax-size-mb = -1\n", "max-size-mb"),
        ("[tool.ckpt]\nno-nan-inf = 1\n", "no-nan-inf"),
        ("[tool.ckpt]\nfrobnicate = 1\n", "unknown"),
        ('[tool.ckpt.arch]\n"x" = 3\n', "arch"),
        ("[tool.ckpt\n", "cannot read"),
    ):
        root = _config(tmp_path, text)
        with pytest.raises(UsageError, match=match):
            validate([files["st"]], config_dir=root)


def _count_loads(monkeypatch) -> list[int]:
    from ckpt_tool.formats import pickle_vm

    calls: list[int] = []
    real = pickle_vm.PickleVM.load

    def load(self, stream, limit=None):
        calls.append(1)
        return real(self, stream, limit)

    monkeypatch.setattr(pickle_vm.PickleVM, "load", load)
    return calls


def test_validate_decodes_a_torch_file_once_and_reads_what_a_fresh_read_reads(files, tmp_path, monkeypatch):
    from ckpt_tool.formats.torchfile import decodes_shared
    from ckpt_tool.reader import open_checkpoint
    from ckpt_tool.scan import scan_file

    fresh = open_checkpoint(files["nested"])
    calls = _count_loads(monkeypatch)
    scan_file(files["nested"])
    scanned = len(calls)
    report = validate([files["nested"]], config_dir=str(tmp_path))
    assert report.ok and _checks(report)["loads"][0] == PASS
    assert len(calls) == 2 * scanned  # the scan's decodes, and none for the load
    with decodes_shared():
        scan_file(files["nested"])
        shared = open_checkpoint(files["nested"])
        again = open_checkpoint(files["nested"])  # taken once: a second read decodes
    assert len(calls) == 3 * scanned + 1
    for ckpt in (shared, again):
        assert ckpt.tensors == fresh.tensors and ckpt.extras == fresh.extras
        assert ckpt.placeholders == fresh.placeholders and ckpt.candidates == fresh.candidates


def test_shared_decode_reports_a_refused_storage_as_the_reader_does(files, tmp_path, monkeypatch):
    import zipfile

    from ckpt_tool.errors import FormatError
    from ckpt_tool.reader import open_checkpoint

    path = tmp_path / "missing.pth"
    with zipfile.ZipFile(files["pth"]) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/3"):
                zout.writestr(info, zin.read(info))
    with pytest.raises(FormatError) as exc:
        open_checkpoint(str(path))
    assert "data/3 is missing" in str(exc.value)
    report = validate([str(path)], config_dir=str(tmp_path))
    assert _checks(report)["loads"] == (FAIL, str(exc.value))
    assert _checks(report)["scan"][0] == PASS  # the scan reads on past the storage the reader refuses


def test_a_desynced_data_pkl_leaves_nothing_to_share(tmp_path):
    """Readers that disagree on its opcodes: the load reads the file itself, as a plain read does."""
    from ckpt_tool.formats.torchfile import decodes_shared
    from ckpt_tool.reader import open_checkpoint
    from ckpt_tool.scan import scan_file

    path = write_peer_attacks(str(tmp_path), "marker")["zip_frame_desync"]
    fresh = open_checkpoint(path)
    with decodes_shared():
        scan_file(path)
        shared = open_checkpoint(path)
    assert fresh.placeholders and shared.placeholders == fresh.placeholders


def test_a_file_rewritten_in_place_with_its_mtime_set_back_is_read_again(files, tmp_path):
    import shutil

    from ckpt_tool.formats.torchfile import decodes_shared
    from ckpt_tool.formats.ziparchive import list_archive
    from ckpt_tool.scan import scan_file

    path = str(tmp_path / "x.pth")
    shutil.copy(files["pth"], path)
    before = os.stat(path)
    with decodes_shared():
        scan_file(path)
        listed = list_archive(path)
        with open(path, "r+b") as f:  # the same size, a byte of data.pkl changed, the mtime put back
            data = f.read()
            at = data.index(b"data.pkl") + 40
            f.seek(at)
            f.write(bytes([data[at] ^ 0xFF]))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert list_archive(path) is not listed
