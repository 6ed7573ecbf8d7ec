"""scan: verdicts on benign checkpoints of every kind, every malicious fixture, broken files, the tables."""

from __future__ import annotations

import os
import pickle

import pytest
from scan_helpers import corrupt_copies, write_benign, write_malicious

from ckpt_tool.errors import InputError, UsageError
from ckpt_tool.formats.pickle_vm import Trace
from ckpt_tool.scan import (
    ALLOWED,
    BROKEN,
    SAFE,
    SKIPPED,
    SUSPICIOUS,
    UNSAFE,
    Policy,
    _walk_opcodes,
    iter_model_files,
    sarif,
    scan,
    scan_file,
)

# the global each payload must be caught by (the name the scanner reports)
EXPECTED = {
    "global_os_system": "os.system",
    "stack_global": "os.system",
    "stack_global_memo": "subprocess.call",
    "builtins_chain": "builtins.getattr",
    "builtins_exec": "builtins.exec",
    "nested_loads": "pickle.loads",
    "inst_opcode": "os.system",
    "obj_opcode": "os.system",
    "setstate_build": "os.system",
    "as_bin": "os.system",
    "as_ckpt": "os.system",
    "as_safetensors": "builtins.getattr",
    "legacy_sys_info": "os.system",
    "legacy_odd_magic": "os.system",
    "torch_zip_payload": "posix.system",
    "torch_legacy_payload": "posix.system",
    "torch_zip_extra_pickle": "os.system",
}


@pytest.fixture(scope="module")
def benign(tmp_path_factory):
    return write_benign(str(tmp_path_factory.mktemp("benign")))


@pytest.fixture(scope="module")
def malicious(tmp_path_factory):
    out = tmp_path_factory.mktemp("malicious")
    return write_malicious(str(out / "files"), str(out / "MARKER"))


# --- the tables -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
        "torch.bfloat16",
        "numpy.core.multiarray._reconstruct",
        "argparse.Namespace",
        "__builtin__.set",
        "lightning.fabric.utilities.data.AttributeDict",
    ],
)
def test_allowed_names_are_safe(name):
    assert Policy().judge(name)[0] == SAFE


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "posix.system",
        "nt.system",
        "subprocess.Popen",
        "builtins.eval",
        "builtins.exec",
        "builtins.getattr",
        "__builtin__.__import__",
        "builtins.open",
        "runpy._run_code",
        "pickle.loads",
        "_pickle.loads",
        "marshal.loads",
        "webbrowser.open",
        "pip._internal.main",
        "shutil.rmtree",
        "socket.socket",
        "importlib.import_module",
        "sys.modules",
        "ctypes.CDLL",
        "torch.hub.load",
        "numpy.testing._private.utils.runstring",
        "builtins.print",
    ],
)
def test_denied_names_are_unsafe(name):
    severity, reason = Policy().judge(name)
    assert severity == UNSAFE
    assert reason


def test_unknown_classes_are_suspicious_and_unresolved_names_unsafe():
    assert Policy().judge("mypkg.models.Net")[0] == SUSPICIOUS
    assert Policy().judge("torch.nn.modules.conv.Conv2d")[0] == SUSPICIOUS
    assert Policy().judge("?.?", resolved=False)[0] == UNSAFE


def test_an_unknown_storage_class_is_suspicious_not_a_broken_pickle(tmp_path):
    """The scan reads a storage of a class it does not know as one of bytes and judges the class; it
    once reported the pickle unparseable, naming a 'uint8' storage type the file never named."""
    import zipfile

    torch = pytest.importorskip("torch")
    src, out = tmp_path / "ok.pth", tmp_path / "odd.pth"
    torch.save({"w": torch.zeros(2), "b": torch.zeros(3)}, src)
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as o:
        for name in z.namelist():
            data = z.read(name)
            o.writestr(name, data.replace(b"FloatStorage", b"FooooStorage") if name.endswith("data.pkl") else data)
    result = scan_file(str(out))
    assert result.verdict == SUSPICIOUS, [(f.severity, f.name, f.reason) for f in result.findings]
    assert [f.name for f in result.findings] == ["torch.FooooStorage"]


def test_attribute_chains_and_dunders_are_unsafe():
    # protocol 4 resolves dotted names attribute by attribute: an allowed class's method is a way out
    assert Policy().judge("pathlib.Path.write_text")[0] == UNSAFE
    assert Policy().judge("collections.OrderedDict.__init__.__globals__")[0] == UNSAFE
    assert Policy().judge("pathlib.Path")[0] == SAFE


def test_torchscript_classes_are_trusted_only_in_torchscript():
    assert Policy().judge("__torch__.torchvision.models.resnet.ResNet", torchscript=True)[0] == SAFE
    assert Policy().judge("__torch__.torchvision.models.resnet.ResNet", torchscript=False)[0] == SUSPICIOUS


def test_project_allow_list_extends_but_never_overrides_the_deny_list():
    policy = Policy(("mypkg.models.Net", "otherpkg.*"))
    assert policy.judge("mypkg.models.Net")[0] == SAFE
    assert policy.judge("mypkg.models.Other")[0] == SUSPICIOUS
    assert policy.judge("otherpkg.layers.Block")[0] == SAFE
    assert Policy(("os.*", "os.system")).judge("os.system")[0] == UNSAFE


def test_every_allowed_entry_has_a_reason():
    assert all(isinstance(reason, str) and len(reason) > 10 for reason in ALLOWED.values())


# --- benign files -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["state_dict", "nested_optimizer", "lightning", "legacy", "safetensors"])
def test_benign_checkpoints_are_safe(benign, kind):
    result = scan_file(benign[kind])
    assert result.verdict == SAFE, result.findings
    assert result.findings == ()
    if kind != "safetensors":
        assert "torch._utils._rebuild_tensor_v2" in result.globals


def test_scan_agrees_with_torch_weights_only_on_plain_checkpoints(benign):
    import torch

    # ground truth: torch's own restricted loader accepts what we call safe (numpy and friends aside)
    for kind in ("state_dict", "legacy"):
        torch.load(benign[kind], weights_only=True)
        assert scan_file(benign[kind]).verdict == SAFE


def test_lightning_hyper_parameters_and_optimizer_state_are_seen(benign):
    result = scan_file(benign["lightning"])
    assert "pytorch_lightning.utilities.parsing.AttributeDict" in result.globals
    nested = scan_file(benign["nested_optimizer"])
    assert {"argparse.Namespace", "numpy.dtype"} <= set(nested.globals)


def test_torchscript_reads_every_pickle_in_the_archive(benign):
    result = scan_file(benign["torchscript"])
    assert result.format == "torchscript"
    assert any(s.endswith("constants.pkl") for s in result.streams)
    assert any(s.endswith(".debug_pkl") for s in result.streams)
    assert any(g.startswith("__torch__.") for g in result.globals)


def test_legacy_format_reads_all_five_pickles(benign):
    result = scan_file(benign["legacy"])
    assert result.format == "torch-legacy"
    assert result.streams == tuple(f"pickle {i}" for i in range(1, 6))


def test_full_pickled_model_is_suspicious_and_allow_makes_it_safe(benign):
    result = scan_file(benign["full_model"])
    assert result.verdict == SUSPICIOUS
    assert "torchvision.models.squeezenet.SqueezeNet" in {f.name for f in result.findings}
    trusted = scan_file(benign["full_model"], Policy(("torchvision.models.*", "torch.nn.modules.*")))
    assert trusted.verdict == SAFE


def test_sharded_directory_scans_each_shard(benign):
    report = scan([os.path.dirname(benign["sharded"])])
    assert [os.path.basename(f.path) for f in report.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert report.ok


# --- malicious files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_payload_is_unsafe_and_named(malicious, name):
    result = scan_file(malicious[name])
    assert result.verdict == UNSAFE
    assert EXPECTED[name] in {f.name for f in result.findings if f.severity == UNSAFE}


def test_payload_next_to_valid_tensors_still_lists_the_tensors(malicious):
    result = scan_file(malicious["torch_zip_payload"])
    assert "torch._utils._rebuild_tensor_v2" in result.globals
    unsafe = [f for f in result.findings if f.severity == UNSAFE]
    assert unsafe[0].stream.endswith("data.pkl") and unsafe[0].opcode == "GLOBAL"


def test_legacy_payload_in_the_third_pickle_is_found(malicious):
    result = scan_file(malicious["legacy_sys_info"])
    assert [f.stream for f in result.findings if f.name == "os.system"] == ["pickle 3"]


def test_pickle_disguised_as_safetensors_is_read_as_a_pickle(malicious):
    result = scan_file(malicious["as_safetensors"])
    assert result.format == "pickle"
    assert result.verdict == UNSAFE


def test_torch_weights_only_refuses_every_payload(malicious):
    import torch

    for name in ("torch_zip_payload", "torch_legacy_payload", "legacy_sys_info", "global_os_system"):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(malicious[name], weights_only=True)


def test_a_pickle_that_breaks_the_interpreter_is_still_walked(tmp_path):
    # APPEND on a dict makes our interpreter (and pickle) fail; the os.system before it must still count
    path = tmp_path / "broken_payload.pkl"
    path.write_bytes(b"}cos\nsystem\na.")
    result = scan_file(str(path))
    assert result.verdict == UNSAFE
    assert {f.severity for f in result.findings} == {UNSAFE, BROKEN}


def test_opcode_walk_resolves_stack_global_through_the_memo():
    trace = Trace()
    data = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93."
    _walk_opcodes(data, trace)
    assert [(e.opcode, e.name, e.resolved) for e in trace.globals] == [("STACK_GLOBAL", "os.system", True)]
    unresolved = Trace()
    _walk_opcodes(b"\x80\x04K\x01K\x02\x93.", unresolved)
    assert [e.resolved for e in unresolved.globals] == [False]


def test_unresolvable_stack_global_is_unsafe(tmp_path):
    # the module name is the result of a call: nothing static can say what it will be
    path = tmp_path / "computed.pkl"
    path.write_bytes(b"\x80\x04cbuiltins\nstr\n\x8c\x02os\x85R\x8c\x06system\x93.")
    result = scan_file(str(path))
    assert result.verdict == UNSAFE
    assert any("cannot be resolved" in f.reason for f in result.findings)


def test_trailing_data_after_a_legacy_file_is_reported_and_walked(benign, tmp_path):
    path = tmp_path / "trailing.pth"
    with open(benign["legacy"], "rb") as f:
        data = f.read()
    path.write_bytes(data + b"cos\nsystem\n(S'x'\ntR.")
    result = scan_file(str(path))
    assert result.verdict == UNSAFE
    assert "trailing data" in {f.name for f in result.findings}
    assert any(f.stream == "trailing data" and f.name == "os.system" for f in result.findings)


def test_second_pickle_after_a_plain_pickle_is_scanned(tmp_path):
    path = tmp_path / "two.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2) + b"cos\nsystem\n(S'x'\ntR.")
    result = scan_file(str(path))
    assert [f.stream for f in result.findings if f.name == "os.system"] == ["pickle 2"]


# --- broken and odd inputs --------------------------------------------------------------------


def test_broken_inputs_are_broken_with_a_precise_message(benign, tmp_path):
    paths = corrupt_copies(benign["state_dict"], benign["safetensors"], str(tmp_path))
    expect = {
        "empty.pth": "file is empty",
        "truncated.pth": "corrupt zip archive",
        "truncated.pkl": "pickle 1",
        "garbage.bin": "not a recognised model file",
        "st_truncated.safetensors": "past the",
        "st_bad_json.safetensors": "not valid JSON",
        "st_bad_span.safetensors": "needs 16 bytes but data_offsets span 12",
        "no_data_pkl.pt": "without data.pkl",
    }
    for name, text in expect.items():
        result = scan_file(paths[name])
        assert result.verdict == BROKEN, name
        assert any(text in f.reason for f in result.findings), (name, result.findings)


def test_lfs_pointer_is_skipped_with_a_note(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    result = scan_file(str(path))
    assert result.verdict == SKIPPED
    assert "git-lfs pointer" in result.notes[0] and "sha256:abc" in result.notes[0]
    assert scan([str(path)]).ok


def test_missing_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        scan([str(tmp_path / "nope.pth")])


def test_bad_allow_name_is_a_usage_error(benign):
    with pytest.raises(UsageError, match="--allow"):
        scan([benign["state_dict"]], allow=["notdotted"])


def test_directory_walk_finds_disguised_pickles_and_skips_text(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.data").write_bytes(pickle.dumps({"w": 1}, protocol=2))
    (tmp_path / "sub" / "notes.txt").write_text("cats are nice\n")  # opens like a protocol-0 pickle ("c")
    (tmp_path / "README.md").write_text("# hi\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.pkl").write_bytes(b"cos\nsystem\n.")
    found = [os.path.relpath(p, tmp_path) for p in iter_model_files([str(tmp_path)])]
    assert found == [os.path.join("sub", "weights.data")]


def test_config_allow_list_is_read_from_pyproject(benign, tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.ckpt]\nallow = ["torchvision.models.*", "torch.nn.modules.*"]\n')
    report = scan([benign["full_model"]], config_dir=str(tmp_path))
    assert report.ok
    assert report.allowed == ("torchvision.models.*", "torch.nn.modules.*")


def test_sarif_log_has_one_result_per_finding(malicious):
    report = scan([malicious["global_os_system"], malicious["torch_zip_payload"]])
    log = sarif(report, "1.0")
    assert log["version"] == "2.1.0"
    run = log["runs"][0]
    assert {r["id"] for r in run["tool"]["driver"]["rules"]} == {"CKPT001", "CKPT002", "CKPT003"}
    assert len(run["results"]) == sum(len(f.findings) for f in report.files)
    first = run["results"][0]
    assert first["ruleId"] == "CKPT001" and first["level"] == "error"
    assert first["locations"][0]["physicalLocation"]["region"] == {"byteOffset": 0}
    assert "os.system" in first["message"]["text"]


def test_scan_reads_no_tensor_bytes(benign, tmp_path):
    # zero every storage byte after the archive's pickles: the verdict must not change, as nothing reads them
    import zipfile

    src = benign["state_dict"]
    dst = tmp_path / "zeroed.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, bytes(len(data)) if "/data/" in info.filename else data)
    assert scan_file(str(dst)).verdict == SAFE


def _tar(path, members: dict[str, bytes]) -> str:
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def test_torch_tar_format_is_walked_and_other_tars_are_not_models(tmp_path):
    evil = _tar(
        tmp_path / "old.pth.tar", {"sys_info": pickle.dumps({}, protocol=2), "pickle": b"cos\nsystem\n(S'x'\ntR."}
    )
    result = scan_file(evil)
    assert result.format == "torch-legacy-tar" and result.verdict == UNSAFE
    benign = scan_file(_tar(tmp_path / "plain.pth.tar", {"pickle": pickle.dumps({"a": 1}, protocol=2)}))
    assert benign.verdict == SUSPICIOUS and "only partly analysed" in benign.findings[0].reason
    data = tmp_path / "data"
    data.mkdir()
    _tar(data / "images.tar", {"a.png": b"\x89PNG...."})
    assert list(iter_model_files([str(data)])) == []
    assert scan_file(str(data / "images.tar")).verdict == BROKEN


def test_committed_malicious_fixtures_are_all_unsafe():
    from scan_helpers import ROOT

    report = scan([os.path.join(ROOT, "fixtures", "malicious")])
    assert len(report.files) == len(EXPECTED)
    assert {f.verdict for f in report.files} == {UNSAFE}


def test_python2_names_are_judged_by_what_pickle_maps_them_to():
    # pickle.load maps these for protocols 0-2 (fix_imports): the Python 3 name is what would run
    assert Policy().judge("commands.getoutput") == Policy().judge("subprocess.getoutput")
    assert Policy().judge("urllib2.urlopen")[0] == UNSAFE
    assert Policy().judge("copy_reg._reconstructor")[0] == SAFE
    assert Policy().judge("__builtin__.xrange")[0] == SAFE


def test_plain_pickles_of_plain_data_are_safe(tmp_path):
    import argparse
    from collections import OrderedDict

    import numpy as np

    data = {
        "weights": OrderedDict(w=np.ones((2, 3), dtype=np.float32)),
        "step": 3,
        "name": "run",
        "args": argparse.Namespace(lr=0.1),
        "ids": {1, 2},
        "blob": b"\x00\x01",
    }
    for protocol in (0, 2, 4, 5):
        path = tmp_path / f"data_p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        result = scan_file(str(path))
        assert result.verdict == SAFE, (protocol, result.findings)
        assert "argparse.Namespace" in result.globals
        assert any(g.startswith("numpy.") for g in result.globals)  # the array was seen, and allowed


def test_python_source_in_an_archive_is_suspicious(benign, tmp_path):
    import shutil
    import zipfile

    path = tmp_path / "packaged.pt"
    shutil.copy(benign["state_dict"], path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("resnet18/mymodels/net.py", "import os\nos.system('x')\n")
    result = scan_file(str(path))
    assert result.verdict == SUSPICIOUS
    assert "resnet18/mymodels/net.py" in result.findings[0].reason
    # TorchScript's own code/ directory is TorchScript, compiled by torch.jit, not imported: read as code
    assert "python source" not in {f.name for f in scan_file(benign["torchscript"]).findings}


def test_benign_torchscript_is_suspicious_never_safe_and_says_why(benign):
    result = scan_file(benign["torchscript"])
    assert result.verdict == SUSPICIOUS
    [finding] = result.findings
    assert finding.name == "TorchScript code" and "never called safe" in finding.reason


def test_the_weights_only_set_is_what_torch_s_own_loader_accepts():
    """Each allowed name is tried against torch's weights-only unpickler: ckpt's table says which pass."""
    import io

    import torch._weights_only_unpickler as weights_only

    from ckpt_tool.scan.policy import ALLOWED, TORCH_WEIGHTS_ONLY

    def accepted(name: str) -> bool:
        module, _, attr = name.rpartition(".")
        try:
            weights_only.load(io.BytesIO(b"\x80\x02c" + f"{module}\n{attr}\n".encode() + b"."), encoding="utf-8")
        except Exception as exc:  # noqa: BLE001 - only the refusal of the global matters here
            return "Unsupported global" not in str(exc)
        return True

    wrong = [n for n in ALLOWED if accepted(n) != (n in TORCH_WEIGHTS_ONLY)]
    assert wrong == []
    assert "argparse.Namespace" not in TORCH_WEIGHTS_ONLY and "torch._utils._rebuild_tensor_v2" in TORCH_WEIGHTS_ONLY


def test_a_safe_file_torch_s_weights_only_load_refuses_says_so(tmp_path):
    import argparse

    import torch
    from click.testing import CliRunner

    from ckpt_tool.cli import main

    sd = torch.nn.Linear(2, 2).state_dict()
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pth")
    torch.save(sd, tmp_path / "plain.pth")
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(tmp_path / "ns.pth", weights_only=True)  # what the note is about
    result = CliRunner().invoke(main, ["scan", str(tmp_path / "ns.pth"), str(tmp_path / "plain.pth")])
    assert result.exit_code == 0, result.output  # still safe: argparse.Namespace is inert
    assert f"{tmp_path / 'ns.pth'}: safe\n  note: torch.load(weights_only=True) refuses this file: it names " in (
        result.output
    )
    assert "argparse.Namespace" in result.output and str(tmp_path / "plain.pth") + ": safe" not in result.output
    assert scan_file(str(tmp_path / "plain.pth")).notes == ()
