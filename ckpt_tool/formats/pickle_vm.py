"""A pickle interpreter that never imports or calls anything a stream names.

It understands every opcode of protocols 0 to 5 and builds plain data: dicts, lists, tuples,
numbers, strings and bytes. Every global becomes a :class:`GlobalRef`; a call of a global
(REDUCE, NEWOBJ, INST, OBJ) becomes an inert :class:`Placeholder`, except for the handful of
torch rebuild functions whose meaning we reproduce here (they become :class:`PickledTensor`).
The interpreter also records every global and every call, which is what ``scan`` judges.
"""

from __future__ import annotations

import functools
import io
import math
import re
import struct
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple

from ..bulk import fast_constructor, gc_paused
from ..checkpoint import TORCH_DTYPE_ALIASES, TORCH_DTYPES
from ..errors import FormatError
from .pickle_memo import Memo
from .pickle_stream import OPCODES_PER_STORED_BYTE, FrameReader, SequentialReader, WorkLimit, opcode_budget

# torch storage classes as pickled in persistent ids -> dtype names
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}

# every name a pickle may give a torch dtype (``torch.half`` as well as ``torch.float16``)
TORCH_DTYPE_NAMES = TORCH_DTYPES | TORCH_DTYPE_ALIASES.keys()
_DTYPE_ALIASES = TORCH_DTYPE_ALIASES


@dataclass(frozen=True)
class GlobalRef:
    """A global named by the stream (``module.name``); never imported."""

    module: str
    name: str

    @functools.cached_property
    def qualname(self) -> str:  # asked for at every call of the global: worked out once
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<global {self.qualname}>"


@dataclass(eq=False)
class Placeholder:
    """An object the stream would have constructed; holds what it would have been built from."""

    name: str
    args: Any = ()
    state: Any = None
    items: list[Any] = field(default_factory=list)
    dictitems: dict[Any, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<{self.name}>"


@dataclass(frozen=True)
class TorchDType:
    name: str

    def __repr__(self) -> str:
        return f"torch.{self.name}"


NO_ENTRIES: Mapping[str, Any] = types.MappingProxyType({})


# slots: a file of 100,000 tensors holds 100,000 of each of these
@dataclass(frozen=True, slots=True)
class StorageRef:
    """A storage named by a persistent id; the format reader says where its bytes are."""

    key: str
    dtype: str
    location: str
    numel: int
    data_offset: int | None = None
    nbytes: int = 0
    file: str = ""


# StorageRef(...) of every field, positionally, in a third of the time (one per storage of a file)
build_storage_ref = fast_constructor(StorageRef)


@dataclass(eq=False, slots=True)
class PickledTensor:
    storage: StorageRef | None
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False
    is_parameter: bool = False
    kind: str = "tensor"
    # the tensors a composite is made of (sparse indices and values, per-channel scales) and its
    # plain-data attributes (quantization scheme, scale and zero point; a DTensor's global shape);
    # a plain tensor shares one read-only empty mapping for both (not two dicts of its own: 13 MB
    # for 100,000 tensors), so each is replaced, never changed in place
    parts: Mapping[str, PickledTensor] = field(default_factory=lambda: NO_ENTRIES)
    attrs: Mapping[str, Any] = field(default_factory=lambda: NO_ENTRIES)
    note: str = ""

    def __repr__(self) -> str:
        return f"<tensor {self.dtype}{list(self.shape)}>"


@dataclass(frozen=True)
class TorchLayout:
    """A tensor layout named by ``torch.serialization._get_layout`` (``torch.sparse_coo``)."""

    name: str


class PickledOrderedDict(dict[Any, Any]):
    """A pickled ``collections.OrderedDict``, kept as a plain dict plus what BUILD set on it.

    A state dict's ``_metadata`` (per-module versions, which ``load_state_dict`` reads) lives in
    ``attributes``; it is ``None`` when the pickle set nothing.
    """

    attributes: dict[Any, Any] | None = None


class Event(NamedTuple):
    """One global import or call the stream asks for, with the opcode and byte position.

    A named tuple rather than a frozen dataclass: a 100,000-tensor file records two calls per
    tensor, and a tuple is built in a third of the time.
    """

    opcode: str
    name: str
    position: int
    resolved: bool = True
    module: str = ""  # for a global: the part that is imported (the rest is an attribute path)


@dataclass
class Trace:
    globals: list[Event] = field(default_factory=list)
    calls: list[Event] = field(default_factory=list)
    desync: list[int] = field(default_factory=list)  # where the C and the straight reading of FRAMEs part
    # False: ``calls`` stays empty. Describing a file needs the globals it names (its placeholders),
    # not its calls, which number two per tensor (200,000 events, 20 MB, for 100,000 tensors); scan
    # judges them
    record_calls: bool = True


def _rebuild_tensor(args: tuple[Any, ...], is_param: bool = False) -> PickledTensor:
    storage, offset, size, stride = args[0], args[1], args[2], args[3]
    requires_grad = bool(args[4]) if len(args) > 4 else False
    if not isinstance(storage, StorageRef):
        raise FormatError("tensor rebuild without a storage")
    return PickledTensor(storage, _int(offset), _ints(size), _ints(stride), storage.dtype, requires_grad, is_param)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise FormatError(f"expected an integer in a tensor description, got {type(v).__name__}")
    return v


def _ints(v: Any) -> tuple[int, ...]:
    if type(v) is tuple:
        for x in v:
            if type(x) is not int:
                break
        else:
            return v  # plain ints already (bools are refused below)
    if isinstance(v, Placeholder) and v.name == "torch.Size":
        v = v.args[0] if v.args else ()
    if not isinstance(v, (tuple, list)):
        raise FormatError("expected a shape or stride tuple in a tensor description")
    return tuple(_int(x) for x in v)


def _as_param(t: Any) -> Any:
    if isinstance(t, PickledTensor):
        t.is_parameter = True
    return t


# the qschemes a quantized tensor names (globals of torch, read as their names)
QSCHEMES = frozenset(
    {
        "per_tensor_affine",
        "per_channel_affine",
        "per_channel_affine_float_qparams",
        "per_tensor_symmetric",
        "per_channel_symmetric",
    }
)
# sparse layouts: the names of the tensors ``_rebuild_sparse_tensor`` receives, in order
SPARSE_PARTS: dict[str, tuple[str, ...]] = {
    "sparse_coo": ("indices", "values"),
    "sparse_csr": ("crow_indices", "col_indices", "values"),
    "sparse_csc": ("ccol_indices", "row_indices", "values"),
    "sparse_bsr": ("crow_indices", "col_indices", "values"),
    "sparse_bsc": ("ccol_indices", "row_indices", "values"),
}
# what a pickled DTensor is made of: read as the data they hold, never built
DTENSOR_GLOBALS = frozenset(
    {
        "torch.distributed.tensor.DTensor",
        "torch.distributed._tensor.api.DTensor",
        "torch.distributed.tensor._api.DTensor",
        "torch.distributed.tensor._dtensor_spec.DTensorSpec",
        "torch.distributed.tensor._dtensor_spec.TensorMeta",
        "torch.distributed.tensor._dtensor_spec.ShardOrderEntry",
        "torch.distributed.device_mesh.DeviceMesh",
        "torch.distributed._mesh_layout._MeshLayout",
        "torch.distributed._mesh_layout._FlatLayout",
        "torch.distributed.tensor.placement_types.Shard",
        "torch.distributed.tensor.placement_types.Replicate",
        "torch.distributed.tensor.placement_types.Partial",
        "torch.distributed.tensor.placement_types._StridedShard",
    }
)

# the calls _reduce_known gives their meaning, as plain data or tensor descriptions
REBUILT_AS_DATA = frozenset(
    {
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "collections.OrderedDict",
        "torch._tensor._rebuild_from_type_v2",
        "torch._utils._rebuild_qtensor",
        "torch.Size",
        "torch.device",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "_codecs.encode",
        "builtins.set",
        "builtins.frozenset",
        "__builtin__.set",
        "__builtin__.frozenset",
        "builtins.bytes",
        "__builtin__.bytes",
        "builtins.bytearray",
        "__builtin__.bytearray",
        "torch._utils._rebuild_sparse_tensor",
        "torch.serialization._get_layout",
        "torch._utils._rebuild_wrapper_subclass",
    }
)
# globals that are not called but read as what they name (a qscheme) or as the data of a DTensor
READ_AS_DATA = frozenset({*(f"torch.{q}" for q in QSCHEMES), *DTENSOR_GLOBALS})


def _rebuild_qtensor(args: tuple[Any, ...]) -> PickledTensor:
    """A quantized tensor: its integer storage plus the scheme, scale(s) and zero point(s)."""
    t = _rebuild_tensor(args[:4] + (args[5] if len(args) > 5 else False,))
    t.kind = "quantized"
    params = args[4] if len(args) > 4 else None
    if not (isinstance(params, tuple) and params and isinstance(params[0], GlobalRef)):
        raise FormatError("quantized tensor rebuild without its quantizer parameters")
    scheme = params[0].name
    if scheme in ("per_tensor_affine", "per_tensor_symmetric") and len(params) >= 3:
        t.attrs = {"qscheme": scheme, "scale": float(params[1]), "zero_point": _int(params[2])}
    elif len(params) >= 4 and isinstance(params[1], PickledTensor) and isinstance(params[2], PickledTensor):
        t.parts = {"scales": params[1], "zero_points": params[2]}
        t.attrs = {"qscheme": scheme, "axis": _int(params[3])}
    else:
        raise FormatError(f"quantized tensor with an unknown quantizer {scheme!r}")
    return t


def _rebuild_sparse(args: tuple[Any, ...]) -> PickledTensor:
    """A sparse tensor: its component tensors and dense size (``_rebuild_sparse_tensor(layout, data)``)."""
    layout, data = (args[0], args[1]) if len(args) >= 2 else (None, None)
    name = layout.name.removeprefix("torch.") if isinstance(layout, TorchLayout) else ""
    names = SPARSE_PARTS.get(name)
    if names is None or not isinstance(data, tuple) or len(data) < len(names) + 1:
        raise FormatError(f"sparse tensor rebuild with an unknown layout {name or layout!r}")
    parts = dict(zip(names, data))
    if not all(isinstance(p, PickledTensor) for p in parts.values()):
        raise FormatError(f"sparse {name} tensor rebuild without its component tensors")
    values = parts["values"]
    t = PickledTensor(None, 0, _ints(data[len(names)]), (), values.dtype, values.requires_grad, kind=name)
    t.parts = parts
    if name == "sparse_coo" and len(data) > 3 and isinstance(data[3], bool):
        t.attrs = {**t.attrs, "is_coalesced": data[3]}
    return t


def _placement(p: Any) -> str:
    kind = p.name.rpartition(".")[2] if isinstance(p, Placeholder) else repr(p)
    dim = p.state.get("dim") if isinstance(p, Placeholder) and isinstance(p.state, dict) else None
    return f"{kind}({dim})" if dim is not None else f"{kind}()"


def _mesh_size(mesh: Any) -> int | None:
    """Devices in a pickled DeviceMesh (its rank map, ``mesh`` in older torch), or None when unknown."""
    state = mesh.state if isinstance(mesh, Placeholder) else None
    state = state[1] if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) else state
    if isinstance(state, dict):
        for name in ("_rank_map", "mesh"):
            ranks = state.get(name)
            if isinstance(ranks, PickledTensor):
                size = 1
                for d in ranks.shape:
                    size *= d
                return size
    return None


def _rebuild_dtensor(inner: tuple[Any, ...], state: Any) -> Any:
    """A DTensor as its local tensor: whole when it holds the full value, else marked as one shard.

    ``_rebuild_wrapper_subclass(cls, dtype, size, ...)`` gives the global size; the object state
    holds ``_local_tensor`` and ``_spec`` (mesh, placements).
    """
    if isinstance(state, tuple) and len(state) == 2:
        state = state[1]
    local = state.get("_local_tensor") if isinstance(state, dict) else None
    spec = state.get("_spec") if isinstance(state, dict) else None
    spec_state = spec.state if isinstance(spec, Placeholder) else None
    if not isinstance(local, PickledTensor) or not isinstance(spec_state, dict) or len(inner) < 3:
        return None
    global_shape = _ints(inner[2])
    raw = spec_state.get("placements")
    placements = tuple(_placement(p) for p in raw) if isinstance(raw, (tuple, list)) else ()
    devices = _mesh_size(spec_state.get("mesh"))
    where = f"{', '.join(placements) or 'unknown placement'} on a mesh of {devices or 'unknown'} device(s)"
    partial = any(p.startswith("Partial") for p in placements)
    whole = local.shape == global_shape and (devices == 1 or not partial) and local.kind == "tensor"
    local.attrs = {**local.attrs, "dtensor_shape": global_shape, "dtensor_placements": placements}
    if len(inner) > 7 and isinstance(inner[7], bool):
        local.requires_grad = inner[7]
    if whole:
        local.note = f"DTensor ({where}) read as its full local tensor"
    else:
        local.kind = "dtensor_shard"
        local.note = (
            f"DTensor ({where}) holds {'a partial sum' if partial else 'one shard'} of shape "
            f"{list(local.shape)} of a tensor of shape {list(global_shape)}"
        )
    return local


def _reduce_known(name: str, args: Any) -> tuple[bool, Any]:
    """Reproduce the few calls whose result is plain data. Returns (handled, value)."""
    if not isinstance(args, tuple):
        return False, None
    if name in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
        return True, _rebuild_tensor(args)
    if name == "collections.OrderedDict":  # every tensor's backward hooks: asked for as often
        out: dict[Any, Any] = PickledOrderedDict()
        if args and isinstance(args[0], (list, tuple)):
            for pair in args[0]:
                if isinstance(pair, (list, tuple)) and len(pair) == 2:
                    out[_hashable(pair[0])] = pair[1]
        return True, out
    if name == "torch._utils._rebuild_tensor_v3" and len(args) >= 7:
        # untyped storage (numel counts bytes); the tensor's dtype comes as the seventh argument
        t = _rebuild_tensor(args)
        if not isinstance(args[6], TorchDType):
            raise FormatError("tensor rebuild without a dtype")
        t.dtype = args[6].name
        return True, t
    if name == "torch._utils._rebuild_qtensor":
        return True, _rebuild_qtensor(args)
    if name == "torch._utils._rebuild_sparse_tensor":
        return True, _rebuild_sparse(args)
    if name == "torch.serialization._get_layout" and args and isinstance(args[0], str):
        return True, TorchLayout(args[0])
    if name == "torch._utils._rebuild_parameter" and args:
        t = _as_param(args[0])
        if isinstance(t, PickledTensor) and len(args) > 1:
            t.requires_grad = bool(args[1])
        return True, t
    if name == "torch._utils._rebuild_parameter_with_state" and args:
        return True, _as_param(args[0])
    if name == "torch._tensor._rebuild_from_type_v2" and len(args) >= 3:
        func, inner = args[0], args[2]
        if (
            isinstance(func, GlobalRef)
            and func.qualname == "torch._utils._rebuild_wrapper_subclass"
            and isinstance(inner, tuple)
            and inner
            and isinstance(inner[0], GlobalRef)
            and inner[0].name == "DTensor"
        ):
            local = _rebuild_dtensor(inner, args[3] if len(args) > 3 else None)
            if local is not None:
                return True, local
            return False, None
        if isinstance(func, GlobalRef) and isinstance(inner, tuple):
            return _reduce_known(func.qualname, inner)
        return True, func
    if name == "torch._utils._rebuild_meta_tensor_no_storage" and len(args) >= 3:
        dtype = args[0].name if isinstance(args[0], TorchDType) else "float32"
        return True, PickledTensor(None, 0, _ints(args[1]), _ints(args[2]), dtype, kind="meta")
    if name in ("builtins.set", "builtins.frozenset", "__builtin__.set", "__builtin__.frozenset"):
        items = args[0] if args and isinstance(args[0], (list, tuple)) else []
        return True, frozenset(_hashable(x) for x in items)
    if name in ("builtins.bytes", "__builtin__.bytes") and not args:
        return True, b""
    if name in ("builtins.bytearray", "__builtin__.bytearray") and (not args or isinstance(args[0], bytes)):
        return True, bytearray(args[0] if args else b"")
    if name == "_codecs.encode" and args and isinstance(args[0], str):
        return True, args[0].encode("latin-1", errors="replace")
    if name == "torch.Size":
        return True, tuple(args[0]) if args and isinstance(args[0], (list, tuple)) else ()
    if name == "torch.device" and args and all(isinstance(a, (str, int)) for a in args):
        return True, ":".join(str(a) for a in args)
    return False, None


def _hashable(v: Any) -> Any:
    """A dict key or set item; unhashable ones fail here as they do in pickle.load (no repr: it can be
    exponential on shared structure)."""
    try:
        hash(v)
    except TypeError:
        raise FormatError(f"a {type(v).__name__} used as a dict key or set item (pickle.load fails here)") from None
    return v


# torch tensor records read whole by default; off, every opcode is read one by one (the tests compare the two)
FAST_RECORDS = True


class PickleVM:
    """Interprets pickle streams into inert data, reading them as CPython's C unpickler does.

    Args:
        persistent_load: turns a persistent id into a value (a :class:`StorageRef` for torch files).
        trace: where to record globals and calls (shared across the pickles of one file).
        budget: the most opcodes this interpreter runs over all its loads (see ``opcode_budget``:
            pass the budget of the bytes as stored on disk when the stream was decompressed);
            by default, that of the stream's own length.
        frames: ``"c"`` reads FRAME blocks as the C unpickler does (``torch.load``'s reading);
            ``"sequential"`` reads straight on, as ``pickletools`` does. Where the two readings part,
            the position is recorded in ``trace.desync``.
        fast_records: recognise torch's tensor records whole (by default ``FAST_RECORDS``); the
            result, trace, opcode count and errors are those of the opcode-by-opcode reading.
    """

    def __init__(
        self,
        persistent_load: Callable[[Any], Any] | None = None,
        trace: Trace | None = None,
        budget: int | None = None,
        frames: str = "c",
        fast_records: bool | None = None,
    ) -> None:
        self.persistent_load = persistent_load
        # torch's tensor records applied whole (pickle_records); the same result as opcode by opcode
        self.fast_records = FAST_RECORDS if fast_records is None else fast_records
        self.trace = trace if trace is not None else Trace()
        self.budget = budget
        self.frames = frames
        self.ops = 0
        self.records = 0  # tensor records read whole
        # (id, raised, answer): the loader's answer that a steady record (pickle_records.steady) got
        # and did not use, given to the reading that takes the record over instead of asking again
        self.answered: tuple[Any, bool, Any] | None = None

    def load(self, stream: IO[bytes], limit: int | None = None) -> Any:
        """Interpret one pickle from ``stream`` (reading no further than byte ``limit``) and return its value.

        Malformed input of any kind raises :class:`FormatError` (:class:`WorkLimit` when the stream
        asks for more work than its size allows): the interpreter runs nothing but its own code, so
        an exception in it means the stream contradicts the pickle format.
        """
        start = stream.tell()
        self.answered = None
        if limit is None:
            stream.seek(0, io.SEEK_END)
            limit = stream.tell()
            stream.seek(start)
        if self.budget is None:
            self.budget = opcode_budget(limit - start)
        reader = FrameReader(stream, limit) if self.frames == "c" else SequentialReader(stream, limit)
        machine = _Machine(self, reader)
        try:
            with gc_paused():  # the load's containers all stay alive in its memo: nothing to collect
                return machine.run()
        except FormatError:
            raise
        except (
            ValueError,
            TypeError,
            IndexError,
            KeyError,
            AttributeError,
            OverflowError,
            struct.error,
            RecursionError,
            UnicodeError,
            MemoryError,
        ) as exc:
            raise FormatError(f"malformed pickle after byte {start} ({type(exc).__name__}: {exc})") from None
        finally:
            reader.release()
            self.trace.desync.extend(reader.desync)

    def _persistent(self, pid: Any) -> Any:
        answered = self.answered
        if answered is not None:
            self.answered = None
            if answered[0] == pid:
                if answered[1]:
                    raise answered[2]
                return answered[2]
        if self.persistent_load is None:
            return Placeholder("<persistent id>", (pid,))
        return self.persistent_load(pid)


_STOP = True
_Handler = Callable[["_Machine"], Any]
_OPS: list[_Handler | None] = [None] * 256


def _op(*codes: bytes) -> Callable[[_Handler], _Handler]:
    def register(fn: _Handler) -> _Handler:
        for code in codes:
            _OPS[code[0]] = fn
        return fn

    return register


class _Machine:
    """The state of one load: stack, marks, memo. Opcodes are the functions in ``_OPS``."""

    def __init__(self, vm: PickleVM, reader: SequentialReader) -> None:
        self.vm = vm
        self.r = reader
        self.trace = vm.trace
        self.calls: list[Event] | None = vm.trace.calls if vm.trace.record_calls else None
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo = Memo()
        self.pos = 0
        self.result: Any = None

    def run(self) -> Any:
        r, vm, table = self.r, self.vm, _OPS
        budget = vm.budget if vm.budget is not None else opcode_budget(0)
        src = r.src
        records = vm.fast_records
        record_starts, record_window, run_record = _records.STARTS, _records.WINDOW, _records.run_record
        steady = _records.steady
        while True:
            buf, off = src.buf, src.off
            if r.cbuf or off >= len(buf):
                # inside a FRAME, or the read-ahead is spent: the reader's own reading
                self.pos = pos = r.pos()
                op = r.read(1)[0]
            else:
                # straight reading from the read-ahead buffer: the opcode byte is taken here
                op = buf[off]
                if records and op in record_starts:
                    if len(buf) - off < record_window and src.more():
                        src.fill_ahead(record_window)
                        buf, off = src.buf, src.off
                    if (op == 0x58 and steady(self, buf, off, src.base, budget)) or run_record(
                        self, buf, off, src.base, budget
                    ):
                        continue
                self.pos = pos = src.base + off
                src.off = off + 1
            vm.ops += 1
            if vm.ops > budget:
                raise WorkLimit(
                    f"stopped after {budget:,} opcodes at byte {pos} (more work than "
                    f"{OPCODES_PER_STORED_BYTE} opcodes per stored byte); the rest was not read"
                )
            handler = table[op]
            if handler is None:
                raise FormatError(f"unknown pickle opcode {bytes([op])!r} at byte {pos}")
            if handler(self) is _STOP:
                return self.result

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise FormatError("pickle MARK missing")
        m = self.marks.pop()
        items = self.stack[m:]
        del self.stack[m:]
        return items

    def pop(self) -> Any:
        if not self.stack:
            raise FormatError("pickle stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise FormatError("pickle stack underflow")
        return self.stack[-1]

    def make_global(self, module: str, name: str, opcode: str, resolved: bool = True) -> Any:
        self.trace.globals.append(Event(opcode, f"{module}.{name}", self.pos, resolved, module))
        if module == "torch" and name in TORCH_DTYPE_NAMES:
            return TorchDType(_DTYPE_ALIASES.get(name, name))
        return GlobalRef(module, name)

    def call(self, func: Any, args: Any, opcode: str) -> Any:
        is_global = isinstance(func, GlobalRef)
        name = (
            func.qualname if is_global else (func.name if isinstance(func, Placeholder) else f"<{type(func).__name__}>")
        )
        if self.calls is not None:
            self.calls.append(Event(opcode, name, self.pos, is_global))
        if is_global and opcode == "REDUCE":
            handled, value = _reduce_known(name, args)
            if handled:
                return value
        if name == "copyreg._reconstructor" and isinstance(args, tuple) and args:
            cls = args[0]
            return Placeholder(cls.qualname if isinstance(cls, GlobalRef) else repr(cls), args[1:])
        return Placeholder(name, args)


def _push(value_of: Callable[[_Machine], Any]) -> _Handler:
    def handler(m: _Machine) -> None:
        m.stack.append(value_of(m))

    return handler


def _unpack(fmt_: str, size: int) -> Callable[[_Machine], Any]:
    unpack = struct.Struct(fmt_).unpack

    def value(m: _Machine) -> Any:
        return unpack(m.r.read(size))[0]

    return value


def _sized(size_fmt: str, size: int) -> Callable[[_Machine], bytes]:
    """Bytes preceded by their length."""
    length = _unpack(size_fmt, size)

    def value(m: _Machine) -> bytes:
        return m.r.read(length(m))

    return value


_binbytes, _short_binbytes, _binbytes8 = _sized("<I", 4), _sized("<B", 1), _sized("<Q", 8)
_OPS[b"J"[0]] = _push(_unpack("<i", 4))
_OPS[b"K"[0]] = _push(lambda m: m.r.read(1)[0])
_OPS[b"M"[0]] = _push(_unpack("<H", 2))
_OPS[b"G"[0]] = _push(_unpack(">d", 8))
_OPS[b"N"[0]] = _push(lambda m: None)
_OPS[0x88] = _push(lambda m: True)
_OPS[0x89] = _push(lambda m: False)
_OPS[b"I"[0]] = _push(lambda m: _c_int(m.r.readline()))
_OPS[b"L"[0]] = _push(lambda m: _c_long(m.r.readline()))
_OPS[b"S"[0]] = _push(lambda m: _parse_string(m.r.readline()))
_OPS[b"T"[0]] = _push(lambda m: m.r.read(struct.unpack("<i", m.r.read(4))[0]).decode("latin-1"))
_OPS[b"U"[0]] = _push(lambda m: _short_binbytes(m).decode("latin-1"))
_OPS[b"V"[0]] = _push(lambda m: m.r.readline().decode("raw-unicode-escape"))
_OPS[b"X"[0]] = _push(lambda m: _utf8(_binbytes(m)))
_OPS[0x8C] = _push(lambda m: _utf8(_short_binbytes(m)))
_OPS[0x8D] = _push(lambda m: _utf8(_binbytes8(m)))
_OPS[b"B"[0]] = _push(_binbytes)
_OPS[b"C"[0]] = _push(_short_binbytes)
_OPS[0x8E] = _push(_binbytes8)
_OPS[0x96] = _push(lambda m: bytearray(_binbytes8(m)))
_OPS[b")"[0]] = _push(lambda m: ())
_OPS[b"]"[0]] = _push(lambda m: [])
_OPS[b"}"[0]] = _push(lambda m: {})
_OPS[0x8F] = _push(lambda m: set())
_OPS[b"t"[0]] = _push(lambda m: tuple(m.pop_mark()))
_OPS[0x85] = _push(lambda m: (m.pop(),))
_OPS[b"l"[0]] = _push(lambda m: m.pop_mark())
_OPS[b"d"[0]] = _push(lambda m: _pairs_to_dict(m.pop_mark()))
_OPS[0x91] = _push(lambda m: frozenset(_hashable(x) for x in m.pop_mark()))
_OPS[b"2"[0]] = _push(lambda m: m.top())
_OPS[b"P"[0]] = _push(lambda m: m.vm._persistent(m.r.readline().decode("ascii", "replace")))
_OPS[b"Q"[0]] = _push(lambda m: m.vm._persistent(m.pop()))


@_op(b"\x80")
def _proto(m: _Machine) -> None:
    proto = m.r.read(1)[0]
    if proto > 5:
        raise FormatError(f"unsupported pickle protocol {proto}")


@_op(b"\x95")
def _frame(m: _Machine) -> None:
    m.r.frame(struct.unpack("<Q", m.r.read(8))[0])


@_op(b".")
def _stop(m: _Machine) -> bool:
    if not m.stack:
        raise FormatError("pickle STOP with an empty stack")
    m.result = m.stack.pop()
    return _STOP


@_op(b"(")
def _mark(m: _Machine) -> None:
    m.marks.append(len(m.stack))


@_op(b"0")
def _pop(m: _Machine) -> None:
    # as the C unpickler: POP right after a MARK pops the mark
    if m.stack and len(m.stack) > (m.marks[-1] if m.marks else -1):
        m.stack.pop()
    else:
        m.pop_mark()


@_op(b"1")
def _pop_mark(m: _Machine) -> None:
    m.pop_mark()


@_op(b"\x8a")
def _long1(m: _Machine) -> None:
    n = m.r.read(1)[0]
    m.stack.append(int.from_bytes(m.r.read(n), "little", signed=True))


@_op(b"\x8b")
def _long4(m: _Machine) -> None:
    n = struct.unpack("<i", m.r.read(4))[0]
    if n < 0 or n > 4096:
        raise FormatError(f"pickle LONG4 of {n} bytes")
    m.stack.append(int.from_bytes(m.r.read(n), "little", signed=True))


@_op(b"F")
def _float(m: _Machine) -> None:
    try:
        m.stack.append(float(m.r.readline()))
    except ValueError as exc:
        raise FormatError("pickle FLOAT is not a number") from exc


@_op(b"\x97")
def _next_buffer(m: _Machine) -> None:
    raise FormatError("pickle asks for an out-of-band buffer (NEXT_BUFFER)")


@_op(b"\x98")
def _readonly_buffer(m: _Machine) -> None:
    pass  # READONLY_BUFFER: no-op on our data


@_op(b"\x86")
def _tuple2(m: _Machine) -> None:
    b = m.pop()
    a = m.pop()
    m.stack.append((a, b))


@_op(b"\x87")
def _tuple3(m: _Machine) -> None:
    c = m.pop()
    b = m.pop()
    a = m.pop()
    m.stack.append((a, b, c))


@_op(b"a")
def _append_one(m: _Machine) -> None:
    v = m.pop()
    _append(m.top(), [v])


@_op(b"e")
def _appends(m: _Machine) -> None:
    items = m.pop_mark()
    _append(m.top(), items)


@_op(b"s")
def _setitem(m: _Machine) -> None:
    v = m.pop()
    k = m.pop()
    _setitems(m.top(), [k, v])


@_op(b"u")
def _setitems_op(m: _Machine) -> None:
    items = m.pop_mark()
    _setitems(m.top(), items)


@_op(b"\x90")
def _additems(m: _Machine) -> None:
    items = m.pop_mark()
    s = m.top()
    if isinstance(s, set):
        s.update(_hashable(x) for x in items)
    elif isinstance(s, Placeholder):
        s.items.extend(items)
    else:
        raise FormatError("pickle ADDITEMS on a non-set")


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace")


@_op(b"c")
def _global(m: _Machine) -> None:
    module = _text(m.r.readline())
    name = _text(m.r.readline())
    m.stack.append(m.make_global(module, name, "GLOBAL"))


@_op(b"\x93")
def _stack_global(m: _Machine) -> None:
    name = m.pop()
    module = m.pop()
    if isinstance(module, str) and isinstance(name, str):
        m.stack.append(m.make_global(module, name, "STACK_GLOBAL"))
    else:
        m.stack.append(m.make_global("?", "?", "STACK_GLOBAL", resolved=False))


def _ext(size: int) -> _Handler:
    """EXT1/2/4: a global named by its number in copyreg's extension registry (unknown here)."""

    def handler(m: _Machine) -> None:
        ext = int.from_bytes(m.r.read(size), "little")
        m.stack.append(m.make_global("<extension>", str(ext), "EXT", resolved=False))

    return handler


_OPS[0x82], _OPS[0x83], _OPS[0x84] = _ext(1), _ext(2), _ext(4)


@_op(b"R")
def _reduce(m: _Machine) -> None:
    args = m.pop()
    func = m.pop()
    m.stack.append(m.call(func, args, "REDUCE"))


@_op(b"\x81")
def _newobj(m: _Machine) -> None:
    args = m.pop()
    cls = m.pop()
    m.stack.append(m.call(cls, args, "NEWOBJ"))


@_op(b"\x92")
def _newobj_ex(m: _Machine) -> None:
    kwargs = m.pop()
    args = m.pop()
    cls = m.pop()
    m.stack.append(m.call(cls, (args, kwargs), "NEWOBJ_EX"))


@_op(b"i")
def _inst(m: _Machine) -> None:
    module = _text(m.r.readline())
    name = _text(m.r.readline())
    cls = m.make_global(module, name, "INST")
    m.stack.append(m.call(cls, tuple(m.pop_mark()), "INST"))


@_op(b"o")
def _obj(m: _Machine) -> None:
    items = m.pop_mark()
    if not items:
        raise FormatError("pickle OBJ without a class")
    m.stack.append(m.call(items[0], tuple(items[1:]), "OBJ"))


@_op(b"b")
def _build(m: _Machine) -> None:
    state = m.pop()
    obj = m.top()
    name = obj.name if isinstance(obj, Placeholder) else type(obj).__name__
    if m.calls is not None:
        m.calls.append(Event("BUILD", name, m.pos))
    if isinstance(obj, Placeholder):
        obj.state = state if obj.state is None else (obj.state, state)
        if name in JOBLIB_ARRAY_WRAPPERS and isinstance(state, dict):
            m.stack[-1] = _joblib_array(m, state)
    elif isinstance(obj, PickledOrderedDict) and isinstance(state, dict):
        obj.attributes = state
    elif isinstance(obj, PickledTensor) and isinstance(state, tuple) and state and isinstance(state[0], dict):
        pass  # tensor subclass attributes: ignored


def _memo_put(key_of: Callable[[_Machine], int]) -> _Handler:
    def handler(m: _Machine) -> None:
        m.memo.put(key_of(m), m.top())

    return handler


def _memo_get(key_of: Callable[[_Machine], int]) -> _Handler:
    def handler(m: _Machine) -> None:
        m.stack.append(m.memo.get(key_of(m)))

    return handler


_OPS[b"p"[0]] = _memo_put(lambda m: _parse_int(m.r.readline()))
_OPS[b"q"[0]] = _memo_put(lambda m: m.r.read(1)[0])
_OPS[b"r"[0]] = _memo_put(_unpack("<I", 4))
_OPS[0x94] = _memo_put(lambda m: len(m.memo))
_OPS[b"g"[0]] = _memo_get(lambda m: _parse_int(m.r.readline()))
_OPS[b"h"[0]] = _memo_get(lambda m: m.r.read(1)[0])
_OPS[b"j"[0]] = _memo_get(_unpack("<I", 4))

# joblib.dump writes each numpy array's bytes raw, right after the wrapper's BUILD; joblib.load's
# unpickler reads them there (an object array as one more pickle), so we step over them as it does
JOBLIB_ARRAY_WRAPPERS = frozenset(
    {"joblib.numpy_pickle.NumpyArrayWrapper", "sklearn.externals.joblib.numpy_pickle.NumpyArrayWrapper"}
)


def _joblib_array(m: _Machine, state: dict[Any, Any]) -> Any:
    shape = _ints(state.get("shape", ()))
    dtype = state.get("dtype")
    itemsize = _numpy_itemsize(dtype)
    count = math.prod(shape)
    if itemsize is None:  # object dtype: joblib calls pickle.load on the file, here
        return _Machine(m.vm, m.r).run()
    if state.get("numpy_array_alignment_bytes") is not None:
        m.r.skip(m.r.read(1)[0])
    m.r.skip(count * itemsize)
    return Placeholder("numpy.ndarray", (shape, dtype.args[0] if isinstance(dtype, Placeholder) else None))


def _numpy_itemsize(dtype: Any) -> int | None:
    """Bytes per item of a pickled ``numpy.dtype`` ('f8', 'U5', 'V16'); None for an object dtype."""
    if not (isinstance(dtype, Placeholder) and dtype.args and isinstance(dtype.args[0], str)):
        raise FormatError("joblib array without a numpy dtype")
    code = dtype.args[0]
    if code.startswith("O") or any(
        isinstance(x, Placeholder) and x.name == "numpy.dtype" and _numpy_itemsize(x) is None
        for x in _flatten(dtype.state)
    ):
        return None
    kind, digits = code[:1], code[1:].split("[")[0]
    if kind in ("M", "m"):
        return 8
    if not digits.isdigit():
        raise FormatError(f"joblib array with an unknown dtype {code!r}")
    return int(digits) * (4 if kind == "U" else 1)


def _flatten(value: Any, depth: int = 0) -> Iterator[Any]:
    if depth > 32:
        raise FormatError("numpy dtype nests too deeply")
    if isinstance(value, (tuple, list)):
        for v in value:
            yield v
            yield from _flatten(v, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield v
            yield from _flatten(v, depth + 1)


def _parse_int(line: bytes) -> int:
    """A memo index: the C unpickler reads it in base 10."""
    try:
        return int(line)
    except ValueError as exc:
        raise FormatError("pickle integer argument is not a number") from exc


# C's strtol(s, &end, 0): optional space and sign, then hex (0x), octal (leading 0) or decimal
_STRTOL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1


def _c_int(line: bytes) -> Any:
    """INT's argument as the C unpickler reads it: strtol base 0 ("010" is 8, "0x10" is 16), then, when
    that does not take the whole line, Python's int(text, 0) ("0b1", "1_0"); "00" and "01" are bools."""
    text = line.split(b"\0", 1)[0]  # a C string ends at its first NUL
    match = _STRTOL.fullmatch(text)
    if match:
        sign, digits = match.groups()
        base = 16 if digits[1:2] in (b"x", b"X") else 8 if len(digits) > 1 and digits[:1] == b"0" else 10
        value = int(digits[2:] if base == 16 else digits, base) * (-1 if sign == b"-" else 1)
        if _LONG_MIN <= value <= _LONG_MAX:
            return bool(value) if len(line) == 2 and value in (0, 1) else value
    return _python_int(text, "INT")


def _c_long(line: bytes) -> int:
    """LONG's argument: Python's int(text, 0), a trailing L dropped."""
    return _python_int((line[:-1] if line.endswith(b"L") else line).split(b"\0", 1)[0], "LONG")


def _python_int(text: bytes, opcode: str) -> int:
    try:
        return int(text, 0)
    except ValueError as exc:
        raise FormatError(f"pickle {opcode} argument is not a number") from exc


def _parse_string(line: bytes) -> str:
    if len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"'):
        return line[1:-1].decode("unicode_escape", "replace")
    raise FormatError("pickle STRING argument is not quoted")


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise FormatError(f"pickle string is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _append(target: Any, items: list[Any]) -> None:
    if isinstance(target, list):
        target.extend(items)
    elif isinstance(target, Placeholder):
        target.items.extend(items)
    else:
        raise FormatError(f"pickle APPEND on a {type(target).__name__}")


def _setitems(target: Any, items: list[Any]) -> None:
    if len(items) % 2:
        raise FormatError("pickle SETITEMS with an odd number of items")
    dest = target.dictitems if isinstance(target, Placeholder) else target
    if not isinstance(dest, dict):
        raise FormatError(f"pickle SETITEM on a {type(target).__name__}")
    for i in range(0, len(items), 2):
        dest[_hashable(items[i])] = items[i + 1]


def _pairs_to_dict(items: list[Any]) -> dict[Any, Any]:
    if len(items) % 2:
        raise FormatError("pickle DICT with an odd number of items")
    return {_hashable(items[i]): items[i + 1] for i in range(0, len(items), 2)}


def storage_dtype(storage_type: Any) -> str:
    """The dtype a pickled storage class stands for (``torch.FloatStorage`` -> ``float32``)."""
    if isinstance(storage_type, TorchDType):
        return storage_type.name
    if isinstance(storage_type, GlobalRef):
        dtype = STORAGE_DTYPES.get(storage_type.name)
        if dtype is not None:
            return dtype
        if storage_type.name.endswith("Storage"):
            guess = storage_type.name[: -len("Storage")].lower()
            if guess in TORCH_DTYPE_NAMES:
                return _DTYPE_ALIASES.get(guess, guess)
    raise FormatError(f"unknown storage type {storage_type!r}")


def storage_dtypes() -> Callable[[Any], str | None]:
    """:func:`storage_dtype` for the reading of one file, worked out once per storage class object
    (a file of 100,000 storages names a few): the dtype, or None where the class names none."""
    known: dict[int, tuple[Any, str | None]] = {}  # id(a storage class) -> (it, its dtype)

    def dtype_of(storage_type: Any) -> str | None:
        hit = known.get(id(storage_type))
        if hit is None or hit[0] is not storage_type:
            try:
                dtype: str | None = storage_dtype(storage_type)
            except FormatError:
                dtype = None
            hit = known[id(storage_type)] = (storage_type, dtype)
        return hit[1]

    return dtype_of


def walk_tensors(root: Any, parts: bool = False) -> Iterator[PickledTensor]:
    """Every tensor in a decoded tree, once each (the tree may share and even cycle); with ``parts``
    also the tensors a composite is made of (a sparse tensor's indices and values)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, PickledTensor):
            yield obj
            if parts:
                stack.extend(obj.parts.values())
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, Placeholder):
            stack.extend([obj.args, obj.state, obj.items, obj.dictitems])


# the tensor-record path uses this module's types; imported last, so either module can be imported first
from . import pickle_records as _records  # noqa: E402
