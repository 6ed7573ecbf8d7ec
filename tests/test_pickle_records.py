"""torch's tensor records read whole (``pickle_records``) against the opcode-by-opcode reading.

The shortcut is safe only if it changes nothing: the same value (structure and sharing), the same
globals and calls at the same byte positions, the same opcode count, the same error, the reader left
at the same place. Checked on real ``torch.save`` outputs of many kinds, the corpus layouts, hostile
files, every single-byte mutation of a small torch pickle, every work budget around a record, and
random state dicts.
"""

from __future__ import annotations

import collections
import io
import os
import sys
import zipfile
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_tool.errors import CkptError, FormatError
from ckpt_tool.formats import pickle_vm
from ckpt_tool.formats.pickle_memo import Memo
from ckpt_tool.formats.pickle_vm import (
    GlobalRef,
    PickledOrderedDict,
    PickledTensor,
    PickleVM,
    Placeholder,
    StorageRef,
    TorchDType,
    TorchLayout,
    Trace,
)
from ckpt_tool.formats.torchfile import storage_loader
from ckpt_tool.reader import read_raw
from ckpt_tool.scan import scan_file

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def canonical(value: Any) -> Any:
    """A comparable picture of a decoded tree: every field, and which objects are one and the same."""
    seen: dict[int, int] = {}

    atoms = (bool, int, float, str, bytes, GlobalRef, TorchDType, TorchLayout)

    def walk(v: Any, depth: int) -> Any:
        if v is None or isinstance(v, atoms):
            return (type(v).__name__, repr(v))
        if type(v) is tuple and all(x is None or isinstance(x, atoms) for x in v):
            return ("tuple", [repr(x) for x in v])  # immutable plain values: which object is not observable
        if id(v) in seen:
            return ("same as", seen[id(v)])
        seen[id(v)] = len(seen)
        if depth > 200:
            return ("deep",)
        if isinstance(v, PickledTensor):
            fields = (v.storage_offset, v.shape, v.stride, v.dtype, v.requires_grad, v.is_parameter, v.kind, v.note)
            return ("tensor", walk(v.storage, depth + 1), fields, walk(v.parts, depth + 1), walk(v.attrs, depth + 1))
        if isinstance(v, StorageRef):
            return ("storage", v.key, v.dtype, v.location, v.numel, v.data_offset, v.nbytes, v.file)
        if isinstance(v, Placeholder):
            parts = (v.args, v.state, v.items, v.dictitems)
            return ("object", v.name, *(walk(p, depth + 1) for p in parts))
        if isinstance(v, PickledOrderedDict):
            items = [(walk(k, depth + 1), walk(x, depth + 1)) for k, x in v.items()]
            return ("ordered", items, walk(v.attributes, depth + 1))
        if isinstance(v, dict):
            return ("dict", [(walk(k, depth + 1), walk(x, depth + 1)) for k, x in v.items()])
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, [walk(x, depth + 1) for x in v])
        if isinstance(v, (set, frozenset)):
            return (type(v).__name__, sorted(repr(x) for x in v))
        return (type(v).__name__, repr(v))

    return walk(value, 0)


def outcome(data: bytes, fast: bool, frames: str = "c", budget: int | None = None) -> tuple[Any, ...]:
    """Everything one load of ``data`` shows, and how many records were read whole."""
    storages: dict[str, StorageRef] = {}
    vm = PickleVM(
        storage_loader(storages, lambda k, d, loc, n: StorageRef(k, d, loc, n)),
        Trace(),
        budget,
        frames=frames,
        fast_records=fast,
    )
    stream = io.BytesIO(data)
    memos: list[Any] = []
    run = pickle_vm._Machine.run

    def keep_memo(machine: Any) -> Any:
        memos.append(machine.memo)
        return run(machine)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pickle_vm._Machine, "run", keep_memo)
        try:
            value: Any = ("value", vm.load(stream))
        except CkptError as exc:
            value = ("error", type(exc).__name__, str(exc))
    # the memo too, in one picture with the value: which entry is which object of the result
    pictured = canonical((value, [memo.as_dict() for memo in memos], storages))
    shown = (pictured, vm.trace.globals, vm.trace.calls, vm.trace.desync, vm.ops, stream.tell())
    return shown, vm.records


def assert_same(data: bytes, frames: str = "c", budget: int | None = None) -> int:
    """The two readings agree on ``data``; returns how many records the fast one read whole."""
    slow, none = outcome(data, False, frames, budget)
    fast, records = outcome(data, True, frames, budget)
    assert none == 0
    for name, a, b in zip(("value, memo and storages", "globals", "calls", "desync", "ops", "position"), slow, fast):
        assert a == b, f"{name} differs"
    return records


def _tensor_count(data: bytes) -> int:
    vm = PickleVM(storage_loader({}, lambda k, d, loc, n: StorageRef(k, d, loc, n)), fast_records=False)
    return sum(1 for _ in pickle_vm.walk_tensors(vm.load(io.BytesIO(data))))


def data_pkl(obj: Any, **save: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **save)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


DTYPES = [
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64",
]  # fmt: skip


def _kinds() -> dict[str, Any]:
    torch.manual_seed(0)
    base = torch.arange(1000.0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    many = collections.OrderedDict((f"layer{i}.w", torch.zeros(2, 1)) for i in range(5500))
    many["late.int8"] = torch.zeros(3, dtype=torch.int8)  # a storage class first named past memo index 65535
    many["late.view"] = many["layer5000.w"][1:]  # a shared key read back with LONG_BINGET
    many["late.int8.again"] = torch.ones(2, dtype=torch.int8)
    return {
        "shapes": collections.OrderedDict(
            scalar=torch.tensor(3.0),
            one=torch.zeros(7),
            two=torch.zeros(3, 4),
            three=torch.zeros(2, 3, 4),
            four=torch.zeros(1, 2, 3, 4),
            five=torch.zeros(1, 2, 1, 2, 1),
            empty=torch.zeros(0, 3),
            binint2=torch.zeros(300),
            binint=torch.zeros(1).expand(70000, 2),
            offset2=base[300:],
            offset4=torch.zeros(70010)[70000:],
        ),
        "dtypes": {name: torch.zeros(3).to(getattr(torch, name)) for name in DTYPES if hasattr(torch, name)},
        "views": {
            "base": base,
            "tail": base[5:],
            "grid": base.view(20, 50),
            "step": base[::2],
            "t": base.view(20, 50).t(),
        },
        "params": {
            "p": torch.nn.Parameter(torch.zeros(2, 2)),
            "frozen": torch.nn.Parameter(torch.zeros(2), requires_grad=False),
            "grad": torch.zeros(3, requires_grad=True),
        },
        "state_dict": model.state_dict(),
        "nested": {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "meta": {"lr": [0.1, 1e-3]}},
        "module": model,
        "list": [torch.zeros(2), (torch.ones(1), {"x": torch.zeros(1, 1)}), "text", 1.5, None],
        "many": many,
    }


@pytest.fixture(scope="module")
def kinds() -> dict[str, Any]:
    return _kinds()


@pytest.mark.parametrize(
    "name", ["shapes", "dtypes", "views", "params", "state_dict", "nested", "module", "list", "many"]
)
def test_real_torch_saves_read_the_same_both_ways(kinds, name):
    data = data_pkl(kinds[name])
    records = assert_same(data)
    assert_same(data, frames="sequential")
    n = _tensor_count(data)
    # every tensor record but the very first (its location string is not yet in the memo) is read whole
    assert records >= n - 1 - (name == "dtypes") * len(DTYPES), (records, n)


def test_the_many_tensors_case_reaches_long_memo_indices(kinds):
    data = data_pkl(kinds["many"])
    assert b"r" in data and b"j" in data  # LONG_BINPUT and LONG_BINGET both occur
    assert assert_same(data) >= 5500


@pytest.mark.parametrize("protocol", [1, 3, 4, 5])
def test_other_pickle_protocols_read_the_same(kinds, protocol):
    assert_same(data_pkl(kinds["shapes"], pickle_protocol=protocol))
    assert_same(data_pkl(kinds["views"], pickle_protocol=protocol), frames="sequential")


def _small() -> bytes:
    t = torch.zeros(4, 2)
    return data_pkl(collections.OrderedDict(a=t, b=torch.zeros(3, dtype=torch.float16), c=t[1:], d=torch.zeros(2)))


SMALL = _small()


def test_every_single_byte_mutation_of_a_small_torch_pickle_reads_the_same():
    assert assert_same(SMALL) >= 3
    values = (0x00, 0x01, 0x05, 0xFF, *b"hjqrKMXc()tRQ\x85\x88")
    for at in range(2, len(SMALL)):
        for v in values:
            if SMALL[at] != v:
                assert_same(SMALL[:at] + bytes([v]) + SMALL[at + 1 :])
        assert_same(SMALL[:at])  # truncated
        assert_same(SMALL[:at] + SMALL[at + 1 :])  # a byte removed


def _steady_pickle() -> bytes:
    """Past 256 memo entries, so that its last records are steady ones (pickle_records.steady)."""
    torch.manual_seed(0)
    sd = collections.OrderedDict((f"blocks.{i}.w", torch.zeros(2, 3)) for i in range(36))
    sd["blocks.last.bias"] = torch.zeros(5, dtype=torch.float16)
    sd["blocks.last.view"] = sd["blocks.3.w"][1:]
    sd["blocks.last.grid"] = torch.zeros(4, 1, 3)
    return data_pkl(sd)


STEADY = _steady_pickle()


def _steady_reads(data: bytes) -> int:
    from ckpt_tool.formats import pickle_records

    read = 0
    steady = pickle_records.steady

    def counting(*args: Any) -> bool:
        nonlocal read
        done = steady(*args)
        read += done
        return done

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pickle_records, "steady", counting)
        outcome(data, True)
    return read


def test_every_single_byte_mutation_of_the_steady_records_reads_the_same():
    """The steady record's shortcut takes nothing for granted that a mutation can break."""
    assert _steady_reads(STEADY) >= 3
    # two steady records (the last before the float16 one, and the very last), key strings included
    spans = [(STEADY.index(b"blocks.35.w") - 5, STEADY.index(b"blocks.last.bias") - 5)]
    spans.append((STEADY.index(b"blocks.last.grid") - 5, len(STEADY)))
    values = (0x00, 0x05, 0xFF, *b"hjqrKXtR\x85\x88")
    for at in (i for a, b in spans for i in range(a, b)):
        for v in values:
            if STEADY[at] != v:
                assert_same(STEADY[:at] + bytes([v]) + STEADY[at + 1 :])
        assert_same(STEADY[:at])  # truncated
        assert_same(STEADY[:at] + STEADY[at + 1 :])  # a byte removed
    ops = outcome(STEADY, False)[0][4]
    for budget in range(ops - 90, ops + 2):  # every budget that ends inside the last records
        assert_same(STEADY, budget=budget)


def test_memo_writes_ahead_of_a_steady_record_read_the_same():
    """A write ahead of the memo's run, or over an entry a record reads, leaves no steady shortcut
    that could miss it."""
    import pickletools
    import struct

    at = STEADY.index(b"blocks.35.w") - 5
    n = sum(1 for op, _, pos in pickletools.genops(STEADY) if pos < at and op.name in ("BINPUT", "LONG_BINPUT"))
    for index in (n + 3, n + 40, 4):  # the record's fourth write; past the memo's end; 'storage', which it reads
        data = STEADY[:at] + b"Nr" + struct.pack("<I", index) + b"0" + STEADY[at:]  # None written there
        assert_same(data)
        assert _steady_reads(data) < _steady_reads(STEADY)


def test_every_work_budget_around_the_records_stops_at_the_same_opcode():
    ops = outcome(SMALL, False)[0][4]
    assert ops > 60
    for budget in range(1, ops + 2):
        assert_same(SMALL, budget=budget)


def test_a_memo_read_before_its_write_fails_alike():
    # the second record reads the rebuild function from memo entry 3; point it at one never written
    at = SMALL.index(b"h\x03((")
    broken = SMALL[:at] + b"h\x7f" + SMALL[at + 2 :]
    shown, _ = outcome(broken, True)
    assert "memo entry 127 is read before it is written" in repr(shown[0])
    assert_same(broken)


@pytest.mark.parametrize("legacy", [False, True])
def test_whole_files_read_and_scan_the_same(kinds, tmp_path, monkeypatch, legacy):
    path = str(tmp_path / "x.pth")
    torch.save(kinds["nested"], path, _use_new_zipfile_serialization=not legacy)
    assert_file_same(path, monkeypatch)


def assert_file_same(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``read_raw`` and ``scan_file`` of ``path`` give the same answers with and without the shortcut."""
    seen = []
    for fast in (False, True):
        monkeypatch.setattr(pickle_vm, "FAST_RECORDS", fast)
        try:
            raw = read_raw(path)
            read: Any = (canonical(raw.root), raw.trace, canonical(raw.storages), canonical(raw.extra_pickles))
        except CkptError as exc:
            read = ("error", type(exc).__name__, str(exc))
        seen.append((read, repr(scan_file(path))))
    assert seen[0][0] == seen[1][0]
    assert seen[0][1] == seen[1][1]


@pytest.mark.parametrize(
    "layout", ["tied", "quantized", "sparse", "extra-state", "dtypes", "complex128", "torchscript", "dataparallel"]
)
def test_corpus_layouts_read_the_same(corpus, monkeypatch, layout):
    assert_file_same(corpus.get(layout).source, monkeypatch)


def test_hostile_and_malicious_files_read_and_scan_the_same(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        from scan_helpers import write_peer_attacks
    finally:
        sys.path.pop(0)
    paths = write_peer_attacks(str(tmp_path / "peer"), str(tmp_path / "MARKER"))
    malicious = os.path.join(ROOT, "fixtures", "malicious")
    files = [*paths.values(), *(os.path.join(malicious, n) for n in sorted(os.listdir(malicious)))]
    files += [os.path.join(ROOT, "fixtures", n) for n in ("tiny_cnn.pth", "tiny_cnn_dataparallel_nested.pth")]
    for path in files:
        if os.path.isfile(path):
            assert_file_same(path, monkeypatch)


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def state_dicts(draw: st.DrawFn) -> Any:
    out: dict[str, Any] = {}
    made: list[Any] = []
    for i in range(draw(st.integers(1, 12))):
        how = draw(st.sampled_from(["new", "new", "view", "param", "nested", "plain"]))
        if how == "view" and made:
            src = draw(st.sampled_from(made)).reshape(-1)
            start = draw(st.integers(0, max(0, src.numel() - 1)))
            value: Any = src[start:]
        elif how == "plain":
            value = draw(st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=5)))
        else:
            shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 300, 70000]), max_size=4))
            while torch.Size(shape).numel() > 100_000:
                shape.pop()
            dtype = getattr(torch, draw(st.sampled_from(["float32", "float16", "int64", "bool", "bfloat16"])))
            value = torch.zeros(shape, dtype=dtype)
            if how == "param" and dtype.is_floating_point:
                value = torch.nn.Parameter(value, requires_grad=draw(st.booleans()))
            made.append(value.detach() if how == "param" else value)
            if how == "nested":
                value = {"inner": value, "n": i}
        out[draw(st.text(min_size=1, max_size=8)) + str(i)] = value
    return collections.OrderedDict(out) if draw(st.booleans()) else out


@SETTINGS
@given(state_dicts())
def test_random_state_dicts_read_the_same(sd):
    assert_same(data_pkl(sd))


def test_memo_indices_off_the_run_cost_one_entry_and_read_back_as_written():
    memo = Memo()
    memo.put(4_000_000_000, "far")  # a hostile LONG_BINPUT: no 4-billion-entry table
    memo.put(-3, "negative")  # PUT's text argument may be negative
    memo.put(2, "ahead")
    memo.put(0, "a")
    assert (memo.items, len(memo)) == (["a"], 4)
    memo.put(1, "b")  # the run reaches the entry written ahead of it
    assert memo.items == ["a", "b", "ahead"] and len(memo) == 5
    memo.put(2, "again")
    assert [memo.get(i) for i in (0, 1, 2, -3, 4_000_000_000)] == ["a", "b", "again", "negative", "far"]
    assert memo.as_dict() == {0: "a", 1: "b", 2: "again", -3: "negative", 4_000_000_000: "far"}
    with pytest.raises(FormatError, match="memo entry 3 is read before it is written"):
        memo.get(3)


@pytest.mark.parametrize(
    "data, value",
    [
        (b"\x80\x02K\x07r\x00\x94\x35\x77j\x00\x94\x35\x77\x86.", (7, 7)),  # LONG_BINPUT far off
        (b"(K\x01p-5\nK\x02p0\n\x94g-5\ng0\nh\x02t.", (1, 2, 1, 2, 2)),  # negative PUT, MEMOIZE after it
    ],
)
def test_memo_writes_off_the_run_read_back(data, value):
    assert PickleVM().load(io.BytesIO(data)) == value
    assert_same(data)


@pytest.mark.parametrize("refuse", [True, False])
@pytest.mark.parametrize("which", [-1, 33])
def test_a_steady_record_asks_the_loader_once_when_it_refuses_the_storage(refuse, which):
    """A ``persistent_load`` that raises for a storage of a steady record, or answers with something
    other than a storage, is asked once for it, as the opcode reading asks it (the loader may have
    effects of its own); the result is the same. The record refused is the very last, or one inside
    a run of steady records (read on from the record before it)."""
    refused = ""  # (none, for the first reading) then the storage of the record refused

    def run(fast: bool) -> tuple[list[Any], Any]:
        asked: list[Any] = []

        def load(pid: Any) -> Any:
            asked.append(pid)
            if pid[2] != refused:
                return StorageRef(pid[2], "float32", pid[3], pid[4])
            if refuse:
                raise FormatError("storage refused")
            return Placeholder("not a storage", (pid,))

        try:
            value: Any = canonical(PickleVM(load, Trace(), fast_records=fast).load(io.BytesIO(STEADY)))
        except CkptError as exc:
            value = str(exc)
        return [canonical(p) for p in asked], value

    refused = run(False)[0][which][1][2].strip("'")  # (a pid's picture: its fields' reprs)
    assert _steady_reads(STEADY) >= 3
    assert run(True) == run(False)
