"""Many-tensor checkpoints: the bench/ generators scaled down, read header-only, rendered the same.

The benchmarks (bench/bench_scale.py) run the same generators at full size; here a few thousand
tensors keep the suite fast. The layouts are checked against safetensors and torch themselves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
from click.testing import CliRunner

from ckpt_tool.checkpoint import TensorRef, dense_ref
from ckpt_tool.cli import main
from ckpt_tool.inspect import FOLD_ROWS, TensorRow, fold, inspect_checkpoint, numbered_module
from ckpt_tool.reader import open_checkpoint
from ckpt_tool.render import dumps, to_jsonable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import layouts  # noqa: E402

TENSORS = 3000  # above FOLD_ROWS, small enough to build in a second


def _stdlib(obj):
    """What dumps wrote before orjson: the standard encoder's text."""
    data = to_jsonable(obj)
    if isinstance(data, dict):
        data = {"schema_version": 1, **data}
    return json.dumps(data, indent=2, sort_keys=True)


@pytest.fixture(scope="session")
def scale(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    specs = layouts.flat_specs(TENSORS)
    paths = {
        "flat.safetensors": str(out / "flat.safetensors"),
        "flat.pth": str(out / "flat.pth"),
    }
    layouts.write_safetensors(paths["flat.safetensors"], specs)
    layouts.write_pth(paths["flat.pth"], specs)
    paths["sharded_st"] = layouts.write_sharded(str(out / "sharded_st"), specs, 4)
    paths["sharded_pth"] = layouts.write_sharded(str(out / "sharded_pth"), specs, 4, fmt="pth")
    deepseek = layouts.deepseek_specs(layers=3, dense_layers=1, experts=8)
    paths["deepseek"] = layouts.write_sharded(str(out / "deepseek"), deepseek, 5)
    paths["llama"] = layouts.write_sharded(str(out / "llama"), layouts.llama_specs(layers=2), 3)
    return paths, specs, deepseek


def test_sparse_safetensors_layouts_are_what_safetensors_reads(scale):
    from safetensors import safe_open

    paths, specs, deepseek = scale
    with safe_open(paths["flat.safetensors"], framework="np") as f:
        assert list(f.keys()) == sorted(k for k, _, _ in specs)
        assert f.get_slice("model.layers.0.attn.q.weight").get_shape() == [4, 2]
    shard = os.path.join(os.path.dirname(paths["deepseek"]), "model-00003-of-00005.safetensors")
    with safe_open(shard, framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F8_E4M3" in dtypes
    ckpt = open_checkpoint(paths["deepseek"])
    assert len(ckpt.tensors) == len(deepseek)
    weight = "model.layers.1.mlp.experts.7.down_proj.weight"
    assert ckpt.tensors[weight].dtype == "float8_e4m3fn"
    assert ckpt.tensors[weight.replace(".weight", ".weight_scale_inv")].shape == (56, 16)


def test_pth_and_safetensors_and_sharded_describe_the_same_tensors(scale, torch):
    paths, specs, _ = scale
    loaded = torch.load(paths["flat.pth"], weights_only=True)
    want = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in loaded.items()}
    for name in ("flat.pth", "flat.safetensors", "sharded_st", "sharded_pth"):
        ckpt = open_checkpoint(paths[name])
        assert {k: (r.shape, r.dtype) for k, r in ckpt.tensors.items()} == want, name
    assert len(open_checkpoint(paths["sharded_st"]).files) == 4


def test_dense_ref_is_the_ordinary_tensor_ref():
    args = ("a.weight", "bfloat16", (3, 2), (2, 1), "f#a.weight", 12, 8, "f")
    fast = dense_ref(*args)
    slow = TensorRef(*args[:5], 0, *args[5:])
    assert fast == slow and repr(fast) == repr(slow)
    fast = dense_ref(*args, 3, True)  # a view into its storage, a parameter that requires grad
    slow = TensorRef(*args[:5], 3, *args[5:], requires_grad=True)
    assert fast == slow and repr(fast) == repr(slow)
    # a TensorRef in every way: its type, its hash, frozen, a field replaced as on any other
    assert type(fast) is TensorRef and hash(fast) == hash(slow)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.key = "b"  # type: ignore[misc]
    assert dataclasses.replace(fast, key="b") == dataclasses.replace(slow, key="b")


def test_json_is_the_standard_encoders_text(scale):
    paths, _, _ = scale
    for name in ("flat.safetensors", "deepseek", "flat.pth"):
        report = inspect_checkpoint(paths[name])
        assert dumps(report) == _stdlib(report), name


@dataclasses.dataclass(frozen=True)
class _Listing:
    rows: tuple[TensorRow, ...]
    title: str = "rows"


@pytest.mark.torchfree
def test_a_long_listing_is_the_standard_encoders_text_piece_by_piece(monkeypatch):
    """Rows orjson would write otherwise (non-ASCII text, an integer beyond 64 bits) are written by
    the standard encoder in their piece, and the whole text is still the standard encoder's."""
    from ckpt_tool import render

    monkeypatch.setattr(render, "_ROWS_AT_ONCE", 100)
    rows = [
        TensorRow(name=f"m.{i}.weight", shape=(i, 2), dtype="float32", parameters=2 * i, nbytes=8 * i)
        for i in range(450)
    ]
    plain = _Listing(tuple(rows))
    assert render._native_listing(plain.rows) and dumps(plain) == _stdlib(plain)
    rows[150] = dataclasses.replace(rows[150], name="caf\u00e9.weight")  # the second piece
    rows[420] = dataclasses.replace(rows[420], nbytes=2**70)  # the last one
    rows[250] = dataclasses.replace(rows[250], note="a\x7f")  # DEL: \u007f, orjson writes the byte
    odd = _Listing(tuple(rows))
    same = dumps(odd) == _stdlib(odd)  # (not compared in the assert: pytest's diff of the two is slow)
    assert same
    assert "caf\\u00e9.weight" in dumps(odd) and str(2**70) in dumps(odd)
    with_stats = _Listing(tuple(rows[:300]) + (dataclasses.replace(rows[0], stats=1),))  # type: ignore[arg-type]
    assert not render._native_listing(with_stats.rows)  # a field that is not None: converted row by row


@pytest.mark.torchfree
@pytest.mark.parametrize(
    "value",
    [
        {"loss": float("nan"), "lr": 1e-05, "inf": float("inf")},  # orjson: null, 0.00001
        {"naïve": "é"},  # the standard encoder escapes non-ASCII
        {"big": 2**70},  # beyond orjson's 64-bit integers
        {"del": "a\x7fb"},  # the standard encoder escapes DEL, orjson writes the byte
        {3: [1, 2.5, (1, 2)], "nested": {"set": {3, 1}}},
    ],
)
def test_json_falls_back_where_orjson_would_differ(value):
    from ckpt_tool.checkpoint import Candidate

    for obj in (value, [value], Candidate(str(value), 1, 2)):
        assert dumps(obj) == _stdlib(obj)


def test_long_tables_fold_by_module_and_all_prints_every_row(scale):
    paths, specs, _ = scale
    folded = CliRunner().invoke(main, ["inspect", paths["flat.safetensors"]])
    assert folded.exit_code == 0, folded.output
    assert f"{TENSORS:,} tensors folded into 10 rows (numbered components as *)" in folded.output
    assert "model.layers.*.attn.q" in folded.output and "model.layers.0.attn.q.weight" not in folded.output
    assert len(folded.output.splitlines()) < 40
    flat = CliRunner().invoke(main, ["inspect", paths["flat.safetensors"], "--all"])
    assert flat.exit_code == 0 and "folded" not in flat.output
    assert sum(k in flat.output for k, _, _ in specs) == TENSORS
    as_json = json.loads(CliRunner().invoke(main, ["inspect", paths["flat.safetensors"], "--json"]).output)
    assert len(as_json["rows"]) == TENSORS


@pytest.mark.torchfree
def test_fold_groups_numbered_modules_then_prefixes():
    assert numbered_module("model.layers.7.mlp.experts.12.up.weight") == "model.layers.*.mlp.experts.*.up"
    assert numbered_module("0.weight") == "*" and numbered_module("bias") == "bias"
    from ckpt_tool.inspect import _numbered, _numbered_all

    modules = ["model.layers.12.mlp", "0.x", "a.0", "a.0b.1", "12", "a..3", "", "x\n3.y", "h.\u0663"]
    assert _numbered_all(modules) == [_numbered(m) for m in modules]  # one substitution for all, or one by one
    assert _numbered_all(modules[:5]) == ["model.layers.*.mlp", "*.x", "a.*", "a.0b.*", "*"]
    report = inspect_checkpoint("fixtures/tiny_cnn.pth")
    how, modules = fold(report.rows, limit=100)
    assert how == "by module" and len(modules) == 6
    how, modules = fold(report.rows, limit=1)
    assert how.startswith("by prefixes") and [m.name for m in modules] == ["features", "classifier"]
    assert sum(m.tensors for m in modules) == len(report.rows) and FOLD_ROWS == 1000


@pytest.mark.torchfree
def test_pager_only_on_a_terminal_and_never_with_no_pager(tmp_path, monkeypatch):
    from ckpt_tool import render

    marker = tmp_path / "paged.txt"
    monkeypatch.setenv(
        "PAGER", f"{sys.executable} -c \"import sys; open({str(marker)!r}, 'w').write(sys.stdin.read())\""
    )
    monkeypatch.setattr("shutil.get_terminal_size", lambda *a: os.terminal_size((80, 24)))
    long_text = "\n".join(f"row {i}" for i in range(100))

    render.page(long_text)  # stdout is not a terminal here
    assert not marker.exists()
    monkeypatch.setattr(render, "_stdout_is_terminal", lambda: True)
    render.page(long_text, enabled=False)
    assert not marker.exists()
    render.page("one line")  # fits the screen
    assert not marker.exists()
    render.page(long_text)
    assert marker.read_text() == long_text + "\n"
    monkeypatch.setenv("PAGER", "no-such-pager-anywhere")
    render.page(long_text)  # an unusable pager: printed instead, no traceback


def test_scan_validate_diff_of_many_tensors(scale):
    paths, _, _ = scale
    run = CliRunner().invoke
    for name in ("flat.safetensors", "flat.pth"):
        assert run(main, ["scan", paths[name]]).exit_code == 0
        assert run(main, ["validate", paths[name]]).exit_code == 0, run(main, ["validate", paths[name]]).output
    assert run(main, ["scan", os.path.dirname(paths["sharded_pth"])]).exit_code == 0
    assert run(main, ["validate", paths["sharded_st"]]).exit_code == 0
    same = run(main, ["diff", paths["flat.safetensors"], paths["sharded_pth"], "--json"])
    assert same.exit_code == 0, same.output
    report = json.loads(same.output)
    assert report["loads_strictly"] is True and len(report["keys"]) == TENSORS


@dataclasses.dataclass(frozen=True)
class _TwoListings:
    zrows: tuple[TensorRow, ...]  # declared first, written last (sorted keys)
    arows: tuple[TensorRow, ...]


@pytest.mark.torchfree
def test_two_long_listings_are_each_written_under_their_own_key():
    """inspect's ``rows`` and ``attributes`` of a TorchScript file: both long, in field order the
    reverse of the sorted keys."""
    rows = [TensorRow(name=f"r.{i}", shape=(i,), dtype="float32", parameters=i, nbytes=4 * i) for i in range(300)]
    attrs = [TensorRow(name=f"a.{i}", shape=(), dtype="int64", parameters=1, nbytes=8) for i in range(260)]
    for obj in (_TwoListings(tuple(rows), tuple(attrs)), _TwoListings(tuple(attrs), tuple(rows))):
        same = dumps(obj) == _stdlib(obj)  # (not compared in the assert: pytest's diff of the two is slow)
        assert same


@dataclasses.dataclass(frozen=True, slots=True)
class _Underscored:
    _first: int
    name: str


@pytest.mark.torchfree
def test_a_listing_of_rows_with_an_underscored_field_shows_it():
    obj = _Listing((_Underscored(1, "x"),) * 300)  # type: ignore[arg-type]
    same = dumps(obj) == _stdlib(obj)  # (orjson itself leaves ``_first`` out)
    assert same and '"_first": 1' in dumps(obj)
