"""After a write: is the output what the plan intended, value by value?

Two checks, both on the files as written:

1. *Re-read* (always, torch-free, streamed): the output is opened with ckpt's reader and every
   planned tensor is compared with its source byte for byte: the input's bytes (cast as planned),
   the values an adaptation computes from them (``ckpt_tool.adapt``: an input conv, a position embedding),
   or the target's initial values for filled and re-initialised keys. A tied alias is compared
   with its partner's source.
2. *Load* (with an architecture): the output is loaded the way users load it (``torch.load`` /
   ``safetensors``) into the target built on the CPU with ``load_state_dict(strict=True)``, and the
   loaded model's ``state_dict()`` is compared with the output tensor by tensor. This catches what
   a key check cannot: a tied alias written from a fresh initialisation overwrites its trained
   partner during the load.

Without torch (the core install) the load is replaced by a header check: the written keys and
shapes against the target's signature, reported as ``method="headers"``, never as a load.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .arch import TargetSignature
from .checkpoint import DENSE, DTYPES, SPARSE_KINDS, Checkpoint, TensorRef
from .compat import Compatibility, check, parameter_share
from .errors import FormatError, InputError
from .formats.pickle_vm import PickledTensor
from .plan import Entry, State
from .torch_extra import buildable
from .values import FileCache, iter_raw_chunks
from .writer import SAFETENSORS, StateDictValue, TensorSlot, Written

# bytes compared per step on each side: what the re-read holds at a time. 1 MiB pairs stay in the
# CPU's cache between the read and the compare; 4 MiB and more run measurably slower
VERIFY_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Verification:
    """What the checks after a write found.

    ``loads`` is the strict load into ``arch`` (True without one: not asked); ``differ`` lists the
    entries (tensors, and the plain data carried beside them) whose values are not what the plan
    intended (re-read or after the load); the counts say
    where the target's tensors came from, ``checkpoint_share`` the share of its parameter elements
    that came from the checkpoint.
    """

    arch: str | None
    loads: bool
    diff: Compatibility | None
    error: str | None = None
    checked: int = 0
    differ: tuple[str, ...] = ()
    from_checkpoint: int = 0
    filled: int = 0
    reinitialised: int = 0
    tied: int = 0
    computed: int = 0  # values the plan computes from checkpoint tensors (adapted, resampled, grown blocks)
    checkpoint_share: float | None = None
    # "load_state_dict": loaded into the built target; "headers": torch is not installed, so the written
    # headers were read back and compared with the target's signature (keys and shapes, no load);
    # "headers_memory": the same, because the target built for real would take over half the free memory
    method: str = "load_state_dict"

    @property
    def ok(self) -> bool:
        return self.loads and not self.differ and self.error is None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, **{f.name: getattr(self, f.name) for f in fields(self)}}


def origins(state: State) -> dict[str, int]:
    """How many planned tensors come from the checkpoint as they are, are computed from it, filled,
    re-initialised or tied to a partner."""
    counts = {"from_checkpoint": 0, "computed": 0, "filled": 0, "reinitialised": 0, "tied": 0}
    for e in state.values():
        if e.tied_to:
            counts["tied"] += 1
        elif e.from_checkpoint and e.transform:
            counts["computed"] += 1
        elif e.from_checkpoint:
            counts["from_checkpoint"] += 1
        elif e.reason == "reinit_mismatched":
            counts["reinitialised"] += 1
        else:
            counts["filled"] += 1
    return counts


def verify_output(
    written: Written,
    state: State,
    *,
    target_chunks: Callable[[str], Iterable[bytes]],
    cast: Callable[[bytes, str, str], bytes],
    aliases: Mapping[str, str],
    state_path: str | None,
    signature: TargetSignature | None = None,
    seed: int = 0,
    computed: Callable[[Entry], Iterable[bytes]] | None = None,
    objects: Iterable[tuple[str, Any]] = (),
    module_metadata: Mapping[str, Any] | None = None,
    extras: Mapping[str, Any] | None = None,
) -> Verification:
    """Both checks of the module docstring; ``target_chunks(key)`` gives the target's initial bytes of a key,
    ``computed(entry)`` the bytes an adapted or copied entry's values must have (before a cast).

    ``objects`` (the state dict's entries that are not tensors), ``module_metadata`` and ``extras``
    (plain data kept beside the state dict, by path) are what the plan carries: the re-read requires
    each of them back with the same types and values (a tuple stays a tuple, 1 stays an int).
    """
    differ, checked, out = _reread(written, state, target_chunks, cast, aliases, state_path, computed)
    differ += compare_objects(out, objects, module_metadata, extras or {})
    written_tensors = out.tensors
    counts: dict[str, Any] = dict(origins(state))
    if signature is None:
        return Verification(None, True, None, None, checked, tuple(differ), **counts)
    share = parameter_share(signature, [k for k, e in state.items() if e.from_checkpoint])
    too_large = _target_bytes(signature) > _memory_available() // 2
    if not buildable(signature.spec) or too_large:
        # every value was compared above; only the load into a model built for real is left out
        diff = _header_check(written_tensors, signature, aliases)
        return Verification(
            signature.spec,
            diff.loads,
            diff,
            None,
            checked,
            tuple(differ),
            checkpoint_share=round(share, 6),
            method="headers_memory" if too_large else "headers",
            **counts,
        )
    loads, diff, error, after = _load(written, signature, aliases, state_path, seed)
    differ += [k for k in after if k not in differ]
    return Verification(
        signature.spec, loads, diff, error, checked, tuple(differ), checkpoint_share=round(share, 6), **counts
    )


def _target_bytes(signature: TargetSignature) -> int:
    """What the target's tensors take once built on the CPU (a 70B language model: 140 GB in float16)."""
    from .checkpoint import itemsize, numel

    return sum(numel(t.shape) * itemsize(t.dtype) for t in signature.tensors.values() if t.dtype in DTYPES)


def _memory_available() -> int:
    """``MemAvailable`` from /proc/meminfo, else the physical memory; bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 1 << 62


# --- 1. re-read -----------------------------------------------------------------------------------


def _reread(
    written: Written,
    state: State,
    target_chunks: Callable[[str], Iterable[bytes]],
    cast: Callable[[bytes, str, str], bytes],
    aliases: Mapping[str, str],
    state_path: str | None,
    computed: Callable[[Entry], Iterable[bytes]] | None = None,
) -> tuple[list[str], int, Checkpoint]:
    from .reader import open_checkpoint

    out = open_checkpoint(written.path, state_path if written.format != SAFETENSORS else None)
    differ, checked = compare_values(
        out.tensors, state, written, target_chunks=target_chunks, cast=cast, aliases=aliases, computed=computed
    )
    return differ, checked, out


def compare_objects(
    out: Checkpoint,
    objects: Iterable[tuple[str, Any]],
    module_metadata: Mapping[str, Any] | None,
    extras: Mapping[str, Any],
) -> list[str]:
    """The carried plain data that the written checkpoint ``out`` does not hold as planned: state-dict
    entries by key, ``"_metadata"``, and kept extras by their path."""
    from .reader import walk_key

    differ = [key for key, value in objects if key not in out.objects or not same_tree(value, out.objects[key])]
    if module_metadata is not None and not same_tree(dict(module_metadata), out.module_metadata):
        differ.append("_metadata")
    for path, value in extras.items():
        if not same_tree(value, walk_key(out.root, path)[0]):
            differ.append(path)
    return differ


def same_tree(planned: Any, got: Any) -> bool:
    """Whether ``got`` (as read back) is ``planned``: same containers (a tuple is not a list), same keys in
    the same order, same scalar types and values (NaN equals NaN); a planned tensor slot matches any tensor."""
    if isinstance(planned, TensorSlot):
        return isinstance(got, PickledTensor)
    if isinstance(planned, StateDictValue):
        return same_tree(planned.items, got)
    if isinstance(planned, dict):
        return (
            isinstance(got, dict)
            and list(planned) == list(got)
            and all(same_tree(v, got[k]) for k, v in planned.items())
        )
    if isinstance(planned, (list, tuple)):
        return (
            type(got) is type(planned)
            and len(got) == len(planned)
            and all(same_tree(a, b) for a, b in zip(planned, got))
        )
    return type(planned) is type(got) and (planned == got or planned != planned and got != got)


def compare_values(
    found: Mapping[str, TensorRef],
    state: State,
    written: Written,
    *,
    target_chunks: Callable[[str], Iterable[bytes]],
    cast: Callable[[bytes, str, str], bytes],
    aliases: Mapping[str, str] | None = None,
    computed: Callable[[Entry], Iterable[bytes]] | None = None,
) -> tuple[list[str], int]:
    """Each planned entry against the written tensor ``found`` holds under its key, byte for byte:
    (the keys that differ or are missing, how many were compared)."""
    aliases = aliases or {}
    differ: list[str] = []
    checked = 0
    with FileCache() as files, _Ranges() as ranges:
        for key, e in state.items():
            ref = found.get(key) or found.get(aliases.get(key, ""))
            if ref is None or ref.shape != e.shape or ref.dtype != e.dtype:
                differ.append(key)
                continue
            want: Iterable[bytes]
            if e.transform:
                assert computed is not None, "a computed entry needs its values to verify"
                if e.ref is not None and written.backup and _same_file(e.ref.file, written.path):
                    e = replace(e, ref=replace(e.ref, file=written.backup))
                want = computed(e)
                if e.dtype != e.source_dtype:
                    want = (cast(c, e.source_dtype, e.dtype) for c in want)
            elif e.ref is not None:
                # rewritten in place: the input's bytes now live in the backup
                source = (
                    replace(e.ref, file=written.backup)
                    if written.backup and _same_file(e.ref.file, written.path)
                    else e.ref
                )
                if source.kind != DENSE or ref.kind != DENSE:
                    checked += 1
                    if not _same_composite(source, ref, files):
                        differ.append(key)
                    continue
                if e.dtype == e.source_dtype and _plain_range(source) and _plain_range(ref):
                    # the usual case, bytes carried as they are: compared in place, range against range
                    checked += 1
                    if not ranges.same(source, ref):
                        differ.append(key)
                    continue
                want = iter_raw_chunks(source, files, VERIFY_CHUNK_BYTES)
                if e.dtype != e.source_dtype:
                    want = (cast(c, e.source_dtype, e.dtype) for c in want)
            else:
                want = target_chunks(e.origin)
            checked += 1
            if ref.nbytes and not _same_bytes(iter_raw_chunks(ref, files, VERIFY_CHUNK_BYTES), want):
                differ.append(key)
    return differ, checked


def _plain_range(ref: TensorRef) -> bool:
    return ref.kind == DENSE and ref.is_contiguous and ref.offset is not None


class _Ranges:
    """Compares two files' byte ranges through two reused buffers.

    A fresh 1 MiB ``bytes`` per chunk costs 256 page faults, each time: over a 553 MB tensor set
    that was half the re-read's time. Reading into the same two buffers costs none.
    """

    def __init__(self) -> None:
        self._files: dict[str, io.FileIO] = {}
        self._a = bytearray(VERIFY_CHUNK_BYTES)
        self._b = bytearray(VERIFY_CHUNK_BYTES)

    def __enter__(self) -> _Ranges:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _file(self, path: str) -> io.FileIO:
        f = self._files.get(path)
        if f is None:
            try:
                f = self._files[path] = io.FileIO(path, "r")
            except OSError as exc:
                raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        return f

    def same(self, a: TensorRef, b: TensorRef) -> bool:
        """Whether ``a``'s and ``b``'s bytes are equal (both dense and contiguous)."""
        if a.nbytes != b.nbytes:
            return False
        ma, mb = memoryview(self._a), memoryview(self._b)
        done = 0
        while done < a.nbytes:
            n = min(len(self._a), a.nbytes - done)
            for view, ref in ((ma, a), (mb, b)):
                assert ref.offset is not None
                f = self._file(ref.file)
                f.seek(ref.offset + done)
                if f.readinto(view[:n]) != n:
                    raise FormatError(
                        f"{ref.file}: tensor {ref.key!r} is truncated (ends before byte {ref.offset + ref.nbytes})"
                    )
            # whole buffers compare with one memcmp; a short tail through a small copy
            if not (self._a == self._b if n == len(self._a) else ma[:n].tobytes() == mb[:n].tobytes()):
                return False
            done += n
        return True


def _same_composite(a: TensorRef, b: TensorRef, files: FileCache) -> bool:
    """A sparse or quantized tensor carried as it is: same layout, same plain data, every part bit-identical."""
    if a.kind != b.kind or a.attrs != b.attrs or [n for n, _ in a.parts] != [n for n, _ in b.parts]:
        return False
    pairs = list(zip((p for _, p in a.parts), (p for _, p in b.parts)))
    if a.kind not in SPARSE_KINDS:  # a quantized tensor's own bytes are its integer values
        pairs.append((a, replace(b, parts=())))
    for x, y in pairs:
        x, y = replace(x, kind=DENSE, parts=()), replace(y, kind=DENSE, parts=())
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.nbytes and not _same_bytes(
            iter_raw_chunks(x, files, VERIFY_CHUNK_BYTES), iter_raw_chunks(y, files, VERIFY_CHUNK_BYTES)
        ):
            return False
    return True


def _same_file(a: str, b: str) -> bool:
    import os

    return os.path.abspath(a) == os.path.abspath(b)


def _same_bytes(a: Iterable[bytes], b: Iterable[bytes]) -> bool:
    """Whether two chunk streams hold the same bytes, whatever their chunking (bounded memory)."""
    ia, ib = iter(a), iter(b)
    ba = bb = b""
    while True:
        if not ba:
            ba = bytes(next(ia, b""))
        if not bb:
            bb = bytes(next(ib, b""))
        if not ba or not bb:
            return not ba and not bb and next(ia, b"") == b"" and next(ib, b"") == b""
        if len(ba) == len(bb):  # the usual case, both read in the same chunks: one memcmp
            if ba != bb:
                return False
            ba = bb = b""
            continue
        n = min(len(ba), len(bb))
        if ba[:n] != bb[:n]:
            return False
        ba, bb = ba[n:], bb[n:]


# --- 2. load into the target ----------------------------------------------------------------------


def _header_check(
    written_tensors: Mapping[str, TensorRef], signature: TargetSignature, aliases: Mapping[str, str]
) -> Compatibility:
    """Without torch: the written headers, as the re-read found them, against the target."""
    state: dict[str, Any] = dict(written_tensors)
    for alias, name in aliases.items():
        if name in state and alias not in state:
            state[alias] = state[name]
    return check(state, signature)


def _load(
    written: Written, signature: TargetSignature, aliases: Mapping[str, str], state_path: str | None, seed: int
) -> tuple[bool, Compatibility, str | None, list[str]]:
    import torch

    from .arch import build_model

    torch.manual_seed(seed)
    # values are compared, so the model is built for real (this also covers user code that cannot run on meta)
    model = build_model(signature.spec, signature.arch_args, device="cpu")
    state = dict(_written_state(written, state_path))
    for alias, name in aliases.items():
        # safetensors' load_model and transformers re-tie shared names the same way
        if name in state and alias not in state:
            state[alias] = state[name]
    objects = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]  # _extra_state
    for alias, partner in check(state, signature, objects=objects).tied:
        state[alias] = state[partner]
    diff = check(state, signature, objects=objects)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch's first line only names the model; the second says what failed first
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        return False, diff, " ".join(lines[:2]), []
    loaded = model.state_dict()
    differ = [k for k, v in state.items() if isinstance(v, torch.Tensor) and k in loaded and not _equal(loaded[k], v)]
    return True, diff, None, differ


def _equal(got: Any, want: Any) -> bool:
    """Bit-identical after the cast ``copy_`` makes (NaN equals NaN)."""
    import torch

    if got.is_quantized or want.is_quantized:
        if not (got.is_quantized and want.is_quantized) or got.qscheme() != want.qscheme():
            return False
        if got.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            same_params = got.q_scale() == want.q_scale() and got.q_zero_point() == want.q_zero_point()
        else:
            same_params = (
                got.q_per_channel_axis() == want.q_per_channel_axis()
                and _equal(got.q_per_channel_scales(), want.q_per_channel_scales())
                and _equal(got.q_per_channel_zero_points(), want.q_per_channel_zero_points())
            )
        return same_params and _equal(got.int_repr(), want.int_repr())
    if got.layout != torch.strided or want.layout != torch.strided:
        return got.layout == want.layout and _equal(got.to_dense(), want.to_dense())
    a = got.detach().reshape(-1).contiguous()
    b = want.detach().to(got.dtype).reshape(-1).contiguous()
    if a.shape != b.shape:
        return False
    try:
        return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))
    except RuntimeError:  # a dtype without a byte view
        return bool(torch.equal(a, b))


def _written_state(written: Written, state_path: str | None) -> Iterator[tuple[str, Any]]:
    """The written tensors, read the way users read them (mmap'd where the format allows)."""
    import torch

    files = [f for f in written.files if not f.endswith(".index.json")]
    for path in files:
        if written.format == SAFETENSORS:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if state_path and len(files) == 1:
                for part in state_path.split("/"):
                    loaded = loaded[part]
            yield from loaded.items()
