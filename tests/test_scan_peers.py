"""scan against the attacks the peer scanners test for: each payload is proved live by a real loader,
then ckpt must call it unsafe and name what would run; hostile archives must never crash or hang a reader."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
import zlib

import pytest
from click.testing import CliRunner
from scan_helpers import live_payloads, write_peer_attacks

from ckpt_tool.cli import main
from ckpt_tool.errors import FormatError
from ckpt_tool.scan import BROKEN, SAFE, SUSPICIOUS, UNSAFE, Policy, iter_model_files, scan, scan_file

# payload -> (a global the scanner must name as unsafe, a finding about the file's structure it must also report)
EXPECTED = {
    "frame_desync": ("os.system", "frame desync"),
    "frame_desync_legacy": ("os.system", "frame desync"),
    "zip_frame_desync": ("os.system", "frame desync"),
    "int_base0": ("os.system", None),
    "no_proto_int_first": ("os.system", None),
    "no_proto_binint": ("os.system", None),
    "attribute_path": ("torch.nn.modules.conv.torch.serialization.os.system", None),
    "safetensors_polyglot": ("os.system", "safetensors/pickle polyglot"),
    "zip_only_upper_data_pkl": ("os.system", None),
    "zip_case_clash": ("os.system", "archive ambiguity"),
    "zip_two_directories": ("os.system", "archive ambiguity"),
    "zip_duplicate_names": ("os.system", "archive ambiguity"),
    "zip_local_name_mismatch": ("os.system", "archive ambiguity"),
    "zip_bad_crc": ("os.system", "archive ambiguity"),
    "zip_high_version": ("os.system", "archive ambiguity"),
    "v7_tar": ("os.system", None),
    "shard": ("os.system", None),
    "npy_object_array": ("posix.system", None),
    "joblib_payload": ("posix.system", None),
    "torchscript_from_file": ("torch.from_file", None),
    "logging_file_handler": ("logging.FileHandler", None),
    "numpy_savetxt": ("numpy.savetxt", None),
    "osx_support_read_output": ("_osx_support._read_output", None),
    "imaplib_stream": ("imaplib.IMAP4_stream", None),
    "collect_env_run": ("torch.utils.collect_env.run", None),
}


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    out = tmp_path_factory.mktemp("peer")
    marker = out / "MARKER"
    return write_peer_attacks(str(out / "files"), str(marker)), marker, out


def test_every_peer_attack_is_live_under_a_real_load(peer):
    paths, marker, out = peer
    assert set(paths) == set(EXPECTED)
    assert live_payloads(paths, str(marker), str(out)) == set(paths), "a fixture that does not run proves nothing"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_peer_attack_is_unsafe_and_named(peer, name):
    paths, marker, _ = peer
    result = scan_file(paths[name])
    assert result.verdict == UNSAFE, result.findings
    global_name, structure = EXPECTED[name]
    assert global_name in {f.name for f in result.findings if f.severity == UNSAFE}, result.findings
    if structure:
        assert structure in {f.name for f in result.findings}, result.findings
    assert not marker.exists()


def test_frame_desync_is_walked_both_ways(peer):
    result = scan_file(peer[0]["frame_desync"])
    assert {"pickle 1", "pickle 1 (read straight on)"} <= set(result.streams)
    [desync] = [f for f in result.findings if f.name == "frame desync"]
    assert desync.opcode == "FRAME" and "C unpickler" in desync.reason


@pytest.mark.parametrize(
    "name, text",
    [
        ("zip_case_clash", "differ only in case"),
        ("zip_two_directories", "different central directories"),
        ("zip_duplicate_names", "duplicate entry names"),
        ("zip_local_name_mismatch", "in its local header"),
        ("zip_bad_crc", "bad CRC-32"),
        ("zip_high_version", "above 6.3"),
    ],
)
def test_each_archive_ambiguity_says_what_readers_disagree_on(peer, name, text):
    reasons = [f.reason for f in scan_file(peer[0][name]).findings if f.name == "archive ambiguity"]
    assert any(text in r for r in reasons), reasons


def test_every_pickle_any_reader_could_choose_is_scanned(peer):
    # the two-directory archive: torch's payload data.pkl and zipfile's clean one are both read
    result = scan_file(peer[0]["zip_two_directories"])
    assert sum(1 for s in result.streams if s.endswith("data.pkl") or "data.pkl (" in s) >= 2


def test_reader_refuses_a_data_pkl_that_readers_choose_differently(peer):
    from ckpt_tool.reader import open_checkpoint

    with pytest.raises(FormatError, match="entries named data.pkl"):
        open_checkpoint(peer[0]["zip_case_clash"])


def test_denied_names_stay_denied_through_attribute_paths_whatever_is_allowed(peer):
    path = peer[0]["attribute_path"]
    for allow in (("torch.nn.modules.*",), ("torch.*",)):
        assert scan_file(path, Policy(allow)).verdict == UNSAFE
    code, out = _cli("scan", path, "--allow", "torch.nn.modules.*")
    assert code == 1 and "unsafe" in out
    wide = Policy(("torch.*",))
    for name in (
        "torch.storage._load_from_bytes",
        "torch.from_file",
        "torch.utils.collect_env.run",
        "torch.jit.unsupported_tensor_ops.execWrapper",
        "torch.utils.data.datapipes.utils.decoder.basichandlers",
        "torch.serialization.load",
    ):
        assert wide.judge(name)[0] == UNSAFE, name
    # an alias of os inside an allowed module, and a path ending in a way to run code
    assert Policy(("tempfile.*",)).judge("tempfile._os.system", module="tempfile")[0] == UNSAFE
    assert Policy(("mypkg.*",)).judge("mypkg.models.os.system", module="mypkg.models")[0] == UNSAFE
    # module patterns cover a module's own names, not attribute paths through them
    assert Policy(("mypkg.*",)).judge("mypkg.models.Outer.Inner", module="mypkg.models")[0] == SUSPICIOUS
    assert Policy(("mypkg.models.Outer.Inner",)).judge("mypkg.models.Outer.Inner", module="mypkg.models")[0] == SAFE
    assert Policy(("mypkg.*",)).judge("mypkg.models.Net", module="mypkg.models")[0] == SAFE


@pytest.mark.parametrize(
    "name",
    [
        "_osx_support._read_output",
        "imaplib.IMAP4_stream",
        "test.support.script_helper.run_python_until_end",
        "logging.FileHandler",
        "logging.handlers.SocketHandler",
        "numpy.savetxt",
        "numpy.lib.format.open_memmap",
        "torch.multiprocessing.spawn",
        "sqlite3.connect",
        "site.addsitedir",
        "torch.utils.tensorboard.SummaryWriter",
    ],
)
def test_gadgets_that_write_files_run_processes_open_sockets_or_load_code_are_unsafe(name):
    assert Policy().judge(name)[0] == UNSAFE


def test_directory_walk_sniffs_every_file_by_content(peer, tmp_path):
    import shutil

    paths = peer[0]
    for name in ("v7_tar", "shard", "no_proto_int_first", "no_proto_binint", "npy_object_array"):
        shutil.copy(paths[name], tmp_path)
    (tmp_path / "notes.txt").write_text("cats are nice\n")  # opens with GLOBAL's 'c', names nothing importable
    found = sorted(os.path.basename(p) for p in iter_model_files([str(tmp_path)]))
    assert found == ["checkpoint.tar", "model-00001.shard", "objects.npy", "weights.bytes", "weights.data"]
    report = scan([str(tmp_path)])
    assert {f.verdict for f in report.files} == {UNSAFE}


# --- files that are not checkpoints must not be false alarms ------------------------------------


def test_plain_npy_and_npz_are_safe(tmp_path):
    import numpy as np

    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    np.save(tmp_path / "s.npy", np.zeros(2, dtype=[("x", "<f8"), ("n", "<U3")]))
    np.savez(tmp_path / "b.npz", w=np.ones(3), i=np.arange(2))
    for name in ("a.npy", "s.npy", "b.npz"):
        result = scan_file(str(tmp_path / name))
        assert result.verdict == SAFE, (name, result.findings)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-8])
    cut = scan_file(str(tmp_path / "cut.npy"))
    assert cut.verdict == BROKEN and "truncated" in cut.findings[0].reason


def test_benign_joblib_of_numpy_arrays_is_safe(tmp_path):
    import joblib
    import numpy as np

    path = tmp_path / "arrays.joblib"
    joblib.dump(
        {
            "w": np.random.default_rng(0).normal(size=(50, 20)),
            "ids": np.arange(7),
            "names": ["a", "b"],
            "objects": np.array([1, "x"], dtype=object),
        },
        path,
    )
    result = scan_file(str(path))
    assert result.verdict == SAFE, result.findings
    assert "joblib.numpy_pickle.NumpyArrayWrapper" in result.globals


# --- crashes and hangs: one line, a verdict or exit 2, bounded work ----------------------------


def _stored_zip(data: bytes, *, flags: int = 0, method: int = 0, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else data
    name = b"archive/data.pkl"
    crc = zlib.crc32(data) & 0xFFFFFFFF
    local = (
        b"PK\x03\x04"
        + struct.pack("<HHHHHIIIHH", 20, flags, method, 0, 0x21, crc, len(body), len(data), len(name), 0)
        + name
        + body
    )
    cd = (
        b"PK\x01\x02"
        + struct.pack(
            "<HHHHHHIIIHHHHHII", 20, 20, flags, method, 0, 0x21, crc, len(body), len(data), len(name), 0, 0, 0, 0, 0, 0
        )
        + name
    )
    return local + cd + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(cd), len(local), 0)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile")
    clean = pickle.dumps({"a": 1}, protocol=2)
    flood = b"\x80\x02" + b"N0" * 3_000_000 + b"N."  # 6 million trivial opcodes, deflated to a few KB
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    flooded = deflate.compress(flood) + deflate.flush()
    files = {
        "encrypted.pth": _stored_zip(clean, flags=1),
        "bad_deflate.pth": _stored_zip(clean, method=8, raw=b"\xff\xfe not deflate data"),
        "bad_lzma.pth": _stored_zip(clean, method=14, raw=b"\x09\x14\x05\x00garbage lzma"),
        "flood.pth": _stored_zip(flood, method=8, raw=flooded),
        "shared_key.pkl": _shared_list_key(),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = str(out / name)
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


def _shared_list_key() -> bytes:
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures"))
    try:
        import make_malicious
    finally:
        sys.path.pop(0)
    return make_malicious.shared_list_key("")


@pytest.mark.parametrize(
    "name, text",
    [
        ("encrypted.pth", "encrypted"),
        ("bad_deflate.pth", "corrupt compressed data"),
        ("bad_lzma.pth", "corrupt compressed data"),
        ("flood.pth", "stopped after 2,000,000 opcodes"),
        ("shared_key.pkl", "used as a dict key"),
    ],
)
def test_hostile_archives_get_a_verdict_not_a_crash(hostile, name, text):
    result = scan_file(hostile[name])
    assert result.verdict == BROKEN, result.findings
    assert any(text in f.reason for f in result.findings), result.findings
    if name == "flood.pth":
        assert any("6,000,004 bytes in all" in f.reason for f in result.findings)  # says how much was read


@pytest.mark.parametrize("name", ["encrypted.pth", "bad_deflate.pth", "bad_lzma.pth", "flood.pth", "shared_key.pkl"])
def test_hostile_archives_are_one_line_errors_in_the_readers(hostile, name, tmp_path):
    for args in (
        ["inspect", hostile[name]],
        ["diff", hostile[name], hostile[name]],
        ["migrate", hostile[name], "--strip-prefix", "module.", "--dry-run"],
    ):
        code, out = _cli(*args)
        assert code == 2, (args, out)
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out


def test_high_version_archive_reads_as_torch_reads_it(peer):
    from ckpt_tool.reader import open_checkpoint

    with pytest.raises(NotImplementedError):
        zipfile.ZipFile(peer[0]["zip_high_version"])  # Python's zipfile refuses it; torch (and ckpt) read it
    assert open_checkpoint(peer[0]["zip_high_version"]).format == "torch-zip"


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_zip_signatures_inside_tensor_bytes_are_not_ambiguity(tmp_path):
    import torch

    path = tmp_path / "sigs.pth"
    sigs = b"PK\x05\x06" * 8 + b"PK\x01\x02" * 8 + b"PK\x03\x04" * 8
    torch.save({"w": torch.tensor(list(sigs), dtype=torch.uint8)}, path)
    result = scan_file(str(path))
    assert result.verdict == SAFE, result.findings
