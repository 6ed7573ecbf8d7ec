"""The guarantee on real-world layouts: every write carries every tensor, or refuses before writing.

For every layout of tests/corpus.py and every command that writes, through ``ckpt_tool.cli.main``:

- exit 0: every tensor is bit-identical to what torch reads from the source. With ``--arch`` the
  output goes through torch's strict ``load_state_dict`` into the right model and the loaded
  model's ``state_dict()`` is compared (a tied alias the source left out must equal its partner);
  without it the output is read back (``torch.load(weights_only=True)`` / ``safetensors``) and
  must hold exactly the source's keys. A ``.pth`` must also keep ``_metadata`` (its own test).
- exit 2: one line naming a key the command refused, and nothing written.
- anything else fails the case.

Commands (columns):
  convert.pth     ckpt convert SRC out.pth [--key K]
  convert.st      ckpt convert SRC out.safetensors [--key K]
  migrate.pth     ckpt migrate SRC -o out.pth [--key K] [--strip-prefix P]
  arch.pth        ckpt migrate SRC -o out.pth [--key K] [--strip-prefix P] --arch A [options]
  arch.st         the same, -o out.safetensors
  shards.st       ckpt convert SRC out.safetensors --max-shard-size 2KB [--key K] (Hugging Face style shards)

Expected outcomes are the table `MATRIX` below, which the tests read (it cannot drift from them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner
from corpus import LAYOUTS, Layout, build_model, source_state
from migrate_helpers import signature_cache_fixture  # noqa: F401 - fixtures are found by name

from ckpt_tool.cli import main

OK, REFUSE = "ok", "refuse"

# Each cell: the outcomes that keep the promise (ok: exit 0 and verified; refuse: exit 2 naming a
# key; ok|refuse: either, e.g. a .pth may carry a sparse tensor or refuse it and name --densify),
# then, after "!", the known defect of issue 9 that breaks the cell today (marked xfail, strict: it
# fails the suite once fixed, so remove the tag then). A safetensors file cannot hold a quantized
# or sparse tensor, nor get_extra_state's plain data, nor (safetensors 0.8) complex128, so refusing
# is its only honest answer there.
MATRIX = """
layout                 convert.pth  convert.st  migrate.pth  arch.pth        arch.st      shards.st
resnet18               ok           ok          ok           ok              ok           ok
torchvision-dp-nested  ok           ok          ok           ok              ok           ok
gpt2-safetensors       ok           ok          ok           ok              ok           ok
gpt2-sharded           ok           ok          ok           ok              ok           ok
gpt2-bin               ok           ok          ok           ok              ok           ok
bert-mlm-safetensors   ok           ok          ok           ok              ok           ok
bert-mlm-sharded       ok           ok          ok           ok              ok           ok
lightning              ok           ok          ok           ok              ok           ok
timm                   ok           ok          ok           ok              ok           ok
timm-ema               ok           ok          ok           ok              ok           ok
fsdp2                  ok           ok          ok           ok              ok           ok
compile                ok           ok          ok           ok              ok           ok
dataparallel           ok           ok          ok           ok              ok           ok
tied                   ok           ok          ok           ok              ok           ok
quantized              ok|refuse    refuse      ok|refuse    ok|refuse       refuse       refuse
sparse                 ok|refuse    refuse      ok|refuse    ok|refuse       refuse       refuse
extra-state            ok           refuse      ok           ok              refuse       refuse
dtypes                 ok           ok          ok           ok              ok           ok
complex128             ok           refuse      ok           ok              refuse       refuse
torchscript            ok           ok          ok           ok              ok           ok
"""

# The defects the tags name: (reason, a pattern that today's failure message matches, loose enough for
# the message of a half-fixed cell). A tagged cell that fails for another reason is a real failure (see
# `failing_for`), so an xfail cannot hide a bug.
DEFECTS: dict[str, tuple[str, str]] = {
    "ties": (
        "defect 1 (ties): --fill-missing fills the tied alias the source left out from the target's random "
        "init, and torch's load writes it over the trained shared weight",
        r"changed after torch's strict load: \[.*(wte|word_embeddings)",
    ),
    "dtensor": (
        "defect 2 (DTensor): FSDP2's DTensor parameters are dropped with exit 0; only the plain buffers are written",
        r"0\.weight",
    ),
    "quantized": (
        "defect 2 (quantized): the .pth output loses the quantizer (scale, zero point) of qint8/quint8/qint32 tensors",
        r"changed.*'q8'|UnknownQuantizer",
    ),
    "sparse": ("defect 2 (sparse): sparse COO/CSR tensors are dropped with exit 0", r"coo.*csr"),
    "extra": ("defect 2 (_extra_state): get_extra_state entries are missing from the output", r"block\._extra_state"),
    "meta": (
        "defect 6: --arch builds the target on the meta device, where quantize_per_channel/_to_sparse have "
        "no kernel, and exits 2 without naming a key",
        r"building it failed: NotImplementedError",
    ),
    "attributes": (
        "defect 7 (TorchScript): tensor attributes (_state, _context) are written as state-dict keys",
        r"_state",
    ),
    "fp8": (
        "defect 2 (dtypes): float8 fnuz tensors are refused for .safetensors, and --arch cannot read their "
        "values, although torch and the installed safetensors handle them",
        r"float8_e\w+",
    ),
    "complex": (
        "defect 2 (complex128): written to .safetensors as a dtype the installed safetensors cannot load "
        "(exit 0; with --arch an internal error)",
        r"C128|complex128",
    ),
    "versions": (
        "defect 2 (_metadata): module versions are dropped from the .pth output",
        r"module versions \(_metadata\) lost",
    ),
    "onnx": (
        "defect 8: an ONNX model gets 'not a recognised checkpoint' instead of being named",
        r"not a recognised checkpoint",
    ),
}
Tags = tuple[str, ...]


def _parse(table: str) -> tuple[tuple[str, ...], dict[tuple[str, str], tuple[frozenset[str], Tags]]]:
    header, *rows = table.strip().splitlines()
    commands = tuple(header.split()[1:])
    cells = {}
    for row in rows:
        layout, *values = row.split()
        assert len(values) == len(commands), row
        for command, value in zip(commands, values):
            outcomes, _, tags = value.partition("!")
            cells[layout, command] = frozenset(outcomes.split("|")), tuple(t for t in tags.split(",") if t)
    return commands, cells


COMMANDS, CELLS = _parse(MATRIX)
TENSOR_XFAIL = {cell: tags for cell, (_, tags) in CELLS.items() if tags}
EXPECTED = {cell: outcomes for cell, (outcomes, _) in CELLS.items()}

PTH_COMMANDS = ("convert.pth", "migrate.pth", "arch.pth")
# layouts whose state dict carries _metadata and whose .pth cells write (see MATRIX)
METADATA_LAYOUTS = (
    "resnet18",
    "torchvision-dp-nested",
    "lightning",
    "timm",
    "timm-ema",
    "compile",
    "dataparallel",
    "tied",
    "complex128",
)
METADATA_XFAIL: dict[tuple[str, str], Tags] = {}


def reason(tags: Tags) -> str:
    return "; then ".join(DEFECTS[t][0] for t in tags)


@contextlib.contextmanager
def failing_for(tags: Tags) -> Iterator[None]:
    """An assertion inside must match one of the tags' defects; any other failure is reported as a failure."""
    try:
        yield
    except AssertionError as exc:
        if tags and not any(re.search(DEFECTS[t][1], str(exc)) for t in tags):
            pytest.fail(f"fails, but not for {reason(tags)}:\n{exc}")
        raise


def test_matrix_covers_every_layout():
    assert sorted({layout for layout, _ in CELLS}) == sorted(LAYOUTS)


def expected(layout: str, command: str) -> frozenset[str]:
    return EXPECTED[layout, command]


def _cases(
    xfail: dict[tuple[str, str], Tags], layouts: tuple[str, ...] = LAYOUTS, commands: tuple[str, ...] = COMMANDS
) -> list[Any]:
    """(layout, command, tags) cases; a tagged one is a strict xfail that only an AssertionError satisfies."""
    cases = []
    for layout in layouts:
        for command in commands:
            tags = xfail.get((layout, command), ())
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason(tags))] if tags else []
            cases.append(pytest.param(layout, command, tags, id=f"{layout}-{command}", marks=marks))
    return cases


def ops_prefix(layout: Layout, command: str) -> str | None:
    """The prefix the command strips (migrate's operations; convert has none)."""
    return layout.strip_prefix if command.startswith(("migrate", "arch")) else None


def command_line(layout: Layout, command: str, out: str) -> list[str]:
    verb, _ = command.split(".")
    args = ["convert", layout.source, out] if verb in ("convert", "shards") else ["migrate", layout.source, "-o", out]
    if verb == "shards":
        args += ["--max-shard-size", "2KB"]
    if layout.key:
        args += ["--key", layout.key]
    if verb in ("migrate", "arch") and layout.strip_prefix:
        args += ["--strip-prefix", layout.strip_prefix]
    if verb == "arch":
        assert layout.arch is not None
        args += ["--arch", layout.arch, *layout.arch_options]
    return args


@dataclass(frozen=True)
class Written:
    """One cell's command, its result and where its output went."""

    args: tuple[str, ...]
    exit_code: int
    output: str
    stderr: str
    out: str


_WRITTEN: dict[tuple[str, str], Written] = {}


def written(corpus: Any, name: str, command: str, root: Any) -> Written:
    """Run one cell once per session (the tensor and the ``_metadata`` checks read the same output)."""
    if (name, command) not in _WRITTEN:
        layout = corpus.get(name)
        directory = root.mktemp(f"{name}-{command}")
        out = os.path.join(str(directory), "out" + (".pth" if command.endswith(".pth") else ".safetensors"))
        args = command_line(layout, command, out)
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        _WRITTEN[name, command] = Written(tuple(args), result.exit_code, result.output, result.stderr, out)
    return _WRITTEN[name, command]


def check_cell(layout: Layout, command: str, cell: Written) -> str:
    """``ok`` or ``refuse`` after checking the promise for one cell; fails otherwise."""
    if cell.exit_code == 2:
        check_refusal(layout, cell)
        return REFUSE
    assert cell.exit_code == 0, f"ckpt {' '.join(cell.args)} exited {cell.exit_code}:\n{cell.output}"
    want = renamed(source_state(layout), ops_prefix(layout, command))
    if command.startswith("arch"):
        check_loads(layout, cell.out, want)
    else:
        aliases = stored_aliases(want) if cell.out.endswith(".safetensors") else {}
        check_same_state(read_output(cell.out, layout.key), want, aliases)
    return OK


def check_refusal(layout: Layout, result: Written) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), result.output
    assert "Traceback" not in result.output
    directory = os.path.dirname(result.out)
    names = set(layout.objects) | {k[len(layout.strip_prefix) :] for k in layout.objects if layout.strip_prefix}
    assert names, f"exit 2, but {layout.name} holds nothing a writer may refuse: {lines[0]}"
    assert any(name in lines[0] for name in names), f"refusal names none of {sorted(names)}: {lines[0]}"
    assert os.listdir(directory) == [], f"a refused write left {os.listdir(directory)}"


def renamed(state: dict[str, Any], prefix: str | None) -> dict[str, Any]:
    """The state with ``prefix`` stripped as torch's own helper does it (``_metadata`` renamed too)."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    copy: dict[str, Any] = OrderedDict(state)
    if hasattr(state, "_metadata"):
        copy._metadata = OrderedDict(state._metadata)  # type: ignore[attr-defined]
    if prefix:
        consume_prefix_in_state_dict_if_present(copy, prefix)
    return copy


def read_output(path: str, key: str | None = None) -> dict[str, Any]:
    """The output as its users read it; a file they cannot read fails the cell."""
    import torch
    from safetensors.torch import load_file

    try:
        if os.path.exists(path + ".index.json"):  # shards: the index names the file of every tensor
            with open(path + ".index.json") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for name in files for k, v in load_file(os.path.join(os.path.dirname(path), name)).items()}
        if path.endswith(".safetensors"):
            return load_file(path)
        return _state_dict_of(torch.load(path, weights_only=True), key)
    except Exception as exc:  # noqa: BLE001 - any reason the reader gives is the finding
        raise AssertionError(f"{path}: the written file does not load: {type(exc).__name__}: {exc}") from None


def _state_dict_of(loaded: Any, key: str | None = None) -> Any:
    """A training checkpoint is written nested (its optimizer state carried beside the state dict, as
    migrate does for a .pth): the state dict, under the key the source used."""
    import torch

    from ckpt_tool.reader import PREFERRED_KEYS

    if isinstance(loaded, dict) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        for name in (key, *PREFERRED_KEYS) if key else PREFERRED_KEYS:
            value = loaded.get(name)
            if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
                return value
    return loaded


def check_same_state(got: dict[str, Any], want: dict[str, Any], aliases: dict[str, str]) -> None:
    """Exactly the source's keys, each bit-identical; a key in ``aliases`` may be left to its partner."""
    lost = sorted(k for k in set(want) - set(got) if aliases.get(k) not in got)
    assert not lost and set(got) <= set(want), f"keys lost {lost}, added {sorted(set(got) - set(want))}"
    changed = [k for k in got if not same_value(got[k], want[k])]
    assert not changed, f"changed: {changed}"


def stored_aliases(state: dict[str, Any]) -> dict[str, str]:
    """Names of the source that view the very bytes of an earlier name (same storage, offset, shape, strides).

    safetensors cannot share storage: its ``save_model`` writes such a name once and ``load_model``
    re-ties the others from the model, so a ``.safetensors`` output may leave them out.
    """
    import torch

    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_quantized:
            where = (
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
                value.dtype,
            )
            if where in first:
                aliases[key] = first[where]
            else:
                first[where] = key
    return aliases


def check_loads(layout: Layout, out: str, want: dict[str, Any]) -> None:
    """Torch's strict load into the right model, then every tensor of the model as the source had it.

    A ``.safetensors`` output may instead load with safetensors' own strict ``load_model``, which
    re-ties names the file leaves out because they share storage in the model.
    """
    model = build_model(layout)
    aliases = tie_partners(model)
    try:
        try:
            model.load_state_dict(read_output(out, layout.key), strict=True)
        except RuntimeError:
            if not out.endswith(".safetensors"):
                raise
            from safetensors.torch import load_model

            load_model(model, out, strict=True)
    except RuntimeError as exc:
        raise AssertionError(f"the output does not load strictly into {layout.arch}: {exc}") from None
    loaded = model.state_dict(keep_vars=False)
    changed = []
    for key, value in loaded.items():
        source = next((k for k in (key, *aliases.get(key, ())) if k in want), None)
        assert source is not None, f"{key}: the model holds it, the source has neither it nor a tied partner"
        if not same_value(value, want[source]):
            changed.append(key)
    assert not changed, f"changed after torch's strict load: {changed}"


def tie_partners(model: Any) -> dict[str, tuple[str, ...]]:
    """Keys of the model's state dict that share storage with another key (tied weights)."""
    import torch

    groups: dict[tuple[int, tuple[int, ...], Any], list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and not tensor.is_quantized:
            groups.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype), []).append(key)
    return {k: tuple(o for o in keys if o != k) for keys in groups.values() if len(keys) > 1 for k in keys}


def same_value(a: Any, b: Any) -> bool:
    """Same dtype, shape, layout and bits (NaN-safe); quantized: same integers and quantizer; plain data: ==."""
    import torch

    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return type(a) is type(b) and a == b
    if (a.dtype, a.shape, a.layout, a.is_quantized) != (b.dtype, b.shape, b.layout, b.is_quantized):
        return False
    if a.is_quantized:
        return _same_quantized(a, b)
    if a.layout == torch.sparse_coo:
        a, b = a.coalesce(), b.coalesce()
        return _same_bits(a.indices(), b.indices()) and _same_bits(a.values(), b.values())
    if a.layout == torch.sparse_csr:
        return all(
            _same_bits(x, y)
            for x, y in (
                (a.crow_indices(), b.crow_indices()),
                (a.col_indices(), b.col_indices()),
                (a.values(), b.values()),
            )
        )
    return _same_bits(a, b)


def _same_quantized(a: Any, b: Any) -> bool:
    import torch

    try:
        scheme = a.qscheme(), b.qscheme()
    except RuntimeError:  # a quantizer lost in the write: torch cannot even say which scheme it had
        return False
    if scheme[0] != scheme[1]:
        return False
    if scheme[0] in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        same_q = (a.q_scale(), a.q_zero_point()) == (b.q_scale(), b.q_zero_point())
    else:
        same_q = (
            a.q_per_channel_axis() == b.q_per_channel_axis()
            and _same_bits(a.q_per_channel_scales(), b.q_per_channel_scales())
            and _same_bits(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
        )
    return same_q and _same_bits(a.int_repr(), b.int_repr())


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize(("layout", "command", "tags"), _cases(TENSOR_XFAIL))
def test_write_keeps_every_tensor_or_refuses(corpus, layout, command, tags, tmp_path_factory):
    with failing_for(tags):
        outcome = check_cell(corpus.get(layout), command, written(corpus, layout, command, tmp_path_factory))
        assert outcome in expected(layout, command), f"{outcome}, expected {sorted(expected(layout, command))}"


@pytest.mark.parametrize(("layout", "command", "tags"), _cases(METADATA_XFAIL, METADATA_LAYOUTS, PTH_COMMANDS))
def test_pth_output_keeps_module_versions(corpus, layout, command, tags, tmp_path_factory):
    """``_metadata`` (module versions torch's loaders read) carried, renamed as torch's prefix helper renames it."""
    cell = written(corpus, layout, command, tmp_path_factory)
    assert cell.exit_code == 0, cell.output
    want = renamed(source_state(corpus.get(layout)), ops_prefix(corpus.get(layout), command))
    got = read_output(cell.out, corpus.get(layout).key)
    with failing_for(tags):
        assert dict(getattr(got, "_metadata", {})) == dict(want._metadata), (  # type: ignore[attr-defined]
            f"module versions (_metadata) lost: {dict(getattr(got, '_metadata', {}))}"
        )


# ---- the oracle itself can fail ---------------------------------------------------------------------


def _tampered(cell: Written, directory: Any, edit: Any) -> Written:
    """``cell`` with its output replaced by ``edit(state)``, written as the same format."""
    import torch
    from safetensors.torch import save_file

    state = edit(dict(read_output(cell.out)))
    out = str(directory / os.path.basename(cell.out))
    if out.endswith(".safetensors"):
        save_file(state, out)
    else:
        torch.save(state, out)
    return Written(cell.args, cell.exit_code, cell.output, cell.stderr, out)


def _flip(state: dict[str, Any], key: str) -> dict[str, Any]:
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1
    return state


@pytest.mark.parametrize("command", ["convert.pth", "convert.st", "arch.pth", "arch.st"])
def test_oracle_sees_a_changed_tensor(corpus, command, tmp_path_factory, tmp_path):
    cell = written(corpus, "dataparallel", command, tmp_path_factory)
    key = next(k for k in read_output(cell.out) if k.endswith("0.weight"))
    with pytest.raises(AssertionError, match="changed"):
        check_cell(corpus.get("dataparallel"), command, _tampered(cell, tmp_path, lambda s: _flip(s, key)))


@pytest.mark.parametrize("command", ["convert.pth", "convert.st"])
def test_oracle_sees_a_lost_tensor_that_was_no_alias(corpus, command, tmp_path_factory, tmp_path):
    cell = written(corpus, "tied", command, tmp_path_factory)
    edit = lambda s: {k: v.clone() for k, v in s.items() if k != "embed.weight"}  # noqa: E731
    with pytest.raises(AssertionError, match="keys lost"):
        check_cell(corpus.get("tied"), command, _tampered(cell, tmp_path, edit))


def test_oracle_sees_an_untied_alias_in_a_pth(corpus, tmp_path_factory, tmp_path):
    """A .pth must keep every name; only safetensors may leave a shared name to its partner."""
    cell = written(corpus, "tied", "convert.pth", tmp_path_factory)
    edit = lambda s: {k: v.clone() for k, v in s.items() if k != "proj.weight"}  # noqa: E731
    with pytest.raises(AssertionError, match="keys lost"):
        check_cell(corpus.get("tied"), "convert.pth", _tampered(cell, tmp_path, edit))


def test_oracle_sees_a_refusal_that_names_nothing(corpus, tmp_path):
    layout = corpus.get("sparse")
    cell = Written(
        ("convert",),
        2,
        "ckpt: error: cannot write this\n",
        "ckpt: error: cannot write this\n",
        str(tmp_path / "out.pth"),
    )
    with pytest.raises(AssertionError, match="names none"):
        check_cell(layout, "convert.pth", cell)


# ---- issue 9, defect 8: a write from an ONNX model is refused with what the file is -------------------
# (what inspect says about ONNX and TorchScript files is the reader's tests' business)


@pytest.mark.parametrize(
    "args", [["convert", "{src}", "{out}"], ["migrate", "{src}", "-o", "{out}"]], ids=["convert", "migrate"]
)
def test_write_from_an_onnx_model_names_it(corpus, args, tmp_path):
    src = corpus.get("onnx").source
    out = str(tmp_path / "out.safetensors")
    result = CliRunner().invoke(main, [a.format(src=src, out=out) for a in args], catch_exceptions=False)
    with failing_for(("onnx",)):
        _check_onnx_refusal(result, src, out)


def _check_onnx_refusal(result: Any, src: str, out: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ckpt: error: {src}"), result.stderr
    line = lines[0][len(f"ckpt: error: {src}") :].lower()  # the path itself says onnx
    assert "onnx" in line and "pytorch" in line and "safetensors" in line, lines[0]
    assert not os.path.exists(out)


def test_a_lightning_callbacks_state_is_no_state_dict_candidate(corpus):
    """ModelCheckpoint's state holds a score tensor among its paths and settings: not a second state dict."""
    from ckpt_tool.reader import open_checkpoint

    layout = corpus.get("lightning")
    ckpt = open_checkpoint(layout.source)
    assert any(k.startswith("ModelCheckpoint") for k in ckpt.extras["callbacks"])  # the callback state is there ...
    assert [c.path for c in ckpt.candidates] == ["state_dict"]  # ... and only the model's state dict is offered
    result = CliRunner().invoke(main, ["inspect", layout.source], catch_exceptions=False)
    assert "state dicts found" not in result.output and "candidates" not in result.output
