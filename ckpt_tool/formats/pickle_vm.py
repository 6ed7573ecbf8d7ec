"""A pickle interpreter that never imports or calls anything a stream names.

It understands every opcode of protocols 0 to 5 and builds plain data: dicts, lists, tuples,
numbers, strings and bytes. Every global becomes a :class:`GlobalRef`; a call of a global
(REDUCE, NEWOBJ, INST, OBJ) becomes an inert :class:`Placeholder`, except for the handful of
torch rebuild functions whose meaning we reproduce here (they become :class:`PickledTensor`).
The interpreter also records every global and every call, which is what ``scan`` judges.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import FormatError

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

TORCH_DTYPE_NAMES = {
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "float8_e8m0fnu", "complex128", "complex64", "complex32", "int64", "int32",
    "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool", "qint8", "quint8", "qint32",
    "quint4x2", "quint2x4", "double", "float", "half", "long", "int", "short", "cfloat", "cdouble",
}
_DTYPE_ALIASES = {"double": "float64", "float": "float32", "half": "float16", "long": "int64",
                  "int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128"}


@dataclass(frozen=True)
class GlobalRef:
    """A global named by the stream (``module.name``); never imported."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
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


@dataclass(frozen=True)
class StorageRef:
    """A storage named by a persistent id; the format reader says where its bytes are."""

    key: str
    dtype: str
    location: str
    numel: int
    data_offset: int | None = None
    nbytes: int = 0
    file: str = ""


@dataclass(eq=False)
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
    # plain-data attributes (quantization scheme, scale and zero point; a DTensor's global shape)
    parts: dict[str, PickledTensor] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
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


@dataclass(frozen=True)
class Event:
    """One global import or call the stream asks for, with the opcode and byte position."""

    opcode: str
    name: str
    position: int
    resolved: bool = True


@dataclass
class Trace:
    globals: list[Event] = field(default_factory=list)
    calls: list[Event] = field(default_factory=list)


class _Mark:
    __slots__ = ()


_MARK = _Mark()
MAX_PICKLE_TEXT = 1 << 20


class _Reader:
    """Reads from a stream that must not be read past ``limit`` (claims are checked, not trusted)."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream = stream
        self.start = stream.tell()
        self.limit = limit

    def pos(self) -> int:
        return self.stream.tell()

    def read(self, n: int) -> bytes:
        if n < 0 or self.pos() + n > self.limit:
            raise FormatError(f"pickle claims {n} bytes at offset {self.pos()}, past the end of the data")
        data = self.stream.read(n)
        if len(data) != n:
            raise FormatError("pickle data ends early (truncated)")
        return data

    def readline(self) -> bytes:
        line = self.stream.readline(MAX_PICKLE_TEXT)
        if not line.endswith(b"\n"):
            raise FormatError("pickle text argument is unterminated or too long")
        return line[:-1]


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
QSCHEMES = frozenset({"per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams",
                      "per_tensor_symmetric", "per_channel_symmetric"})
# sparse layouts: the names of the tensors ``_rebuild_sparse_tensor`` receives, in order
SPARSE_PARTS: dict[str, tuple[str, ...]] = {
    "sparse_coo": ("indices", "values"),
    "sparse_csr": ("crow_indices", "col_indices", "values"),
    "sparse_csc": ("ccol_indices", "row_indices", "values"),
    "sparse_bsr": ("crow_indices", "col_indices", "values"),
    "sparse_bsc": ("ccol_indices", "row_indices", "values"),
}
# what a pickled DTensor is made of: read as the data they hold, never built
DTENSOR_GLOBALS = frozenset({
    "torch.distributed.tensor.DTensor",
    "torch.distributed._tensor.api.DTensor", "torch.distributed.tensor._api.DTensor",
    "torch.distributed.tensor._dtensor_spec.DTensorSpec", "torch.distributed.tensor._dtensor_spec.TensorMeta",
    "torch.distributed.tensor._dtensor_spec.ShardOrderEntry", "torch.distributed.device_mesh.DeviceMesh",
    "torch.distributed._mesh_layout._MeshLayout", "torch.distributed._mesh_layout._FlatLayout",
    "torch.distributed.tensor.placement_types.Shard", "torch.distributed.tensor.placement_types.Replicate",
    "torch.distributed.tensor.placement_types.Partial", "torch.distributed.tensor.placement_types._StridedShard",
})

# the calls _reduce_known gives their meaning, as plain data or tensor descriptions
REBUILT_AS_DATA = frozenset({
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state", "collections.OrderedDict",
    "torch._tensor._rebuild_from_type_v2", "torch._utils._rebuild_qtensor", "torch.Size", "torch.device",
    "torch._utils._rebuild_meta_tensor_no_storage", "_codecs.encode", "builtins.set", "builtins.frozenset",
    "__builtin__.set", "__builtin__.frozenset", "builtins.bytes", "__builtin__.bytes", "builtins.bytearray",
    "__builtin__.bytearray", "torch._utils._rebuild_sparse_tensor", "torch.serialization._get_layout",
    "torch._utils._rebuild_wrapper_subclass",
})
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
    t.attrs["qscheme"] = scheme
    if scheme in ("per_tensor_affine", "per_tensor_symmetric") and len(params) >= 3:
        t.attrs["scale"], t.attrs["zero_point"] = float(params[1]), _int(params[2])
    elif len(params) >= 4 and isinstance(params[1], PickledTensor) and isinstance(params[2], PickledTensor):
        t.parts = {"scales": params[1], "zero_points": params[2]}
        t.attrs["axis"] = _int(params[3])
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
        t.attrs["is_coalesced"] = data[3]
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
    local.attrs.update({"dtensor_shape": global_shape, "dtensor_placements": placements})
    if len(inner) > 7 and isinstance(inner[7], bool):
        local.requires_grad = inner[7]
    if whole:
        local.note = f"DTensor ({where}) read as its full local tensor"
    else:
        local.kind = "dtensor_shard"
        local.note = (f"DTensor ({where}) holds {'a partial sum' if partial else 'one shard'} of shape "
                      f"{list(local.shape)} of a tensor of shape {list(global_shape)}")
    return local


def _reduce_known(name: str, args: Any) -> tuple[bool, Any]:
    """Reproduce the few calls whose result is plain data. Returns (handled, value)."""
    if not isinstance(args, tuple):
        return False, None
    if name in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
        return True, _rebuild_tensor(args)
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
        if (isinstance(func, GlobalRef) and func.qualname == "torch._utils._rebuild_wrapper_subclass"
                and isinstance(inner, tuple) and inner and isinstance(inner[0], GlobalRef)
                and inner[0].name == "DTensor"):
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
    if name == "collections.OrderedDict":
        out: dict[Any, Any] = PickledOrderedDict()
        if args and isinstance(args[0], (list, tuple)):
            for pair in args[0]:
                if isinstance(pair, (list, tuple)) and len(pair) == 2:
                    out[_hashable(pair[0])] = pair[1]
        return True, out
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
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


class PickleVM:
    """Interprets one pickle stream into inert data.

    Args:
        persistent_load: turns a persistent id into a value (a :class:`StorageRef` for torch files).
        trace: where to record globals and calls (shared across the pickles of one file).
    """

    def __init__(self, persistent_load: Callable[[Any], Any] | None = None, trace: Trace | None = None) -> None:
        self.persistent_load = persistent_load
        self.trace = trace if trace is not None else Trace()

    def load(self, stream: IO[bytes], limit: int | None = None) -> Any:
        """Interpret one pickle from ``stream`` (reading no further than byte ``limit``) and return its value.

        Malformed input of any kind raises :class:`FormatError`: the interpreter runs nothing but its
        own code, so an exception in it means the stream contradicts the pickle format.
        """
        start = stream.tell()
        try:
            return self._load(stream, limit)
        except FormatError:
            raise
        except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, struct.error,
                RecursionError, UnicodeError) as exc:
            raise FormatError(f"malformed pickle after byte {start} ({type(exc).__name__}: {exc})") from None

    def _load(self, stream: IO[bytes], limit: int | None) -> Any:
        if limit is None:
            here = stream.tell()
            stream.seek(0, io.SEEK_END)
            limit = stream.tell()
            stream.seek(here)
        r = _Reader(stream, limit)
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}
        trace = self.trace

        def pop_mark() -> list[Any]:
            if not marks:
                raise FormatError("pickle MARK missing")
            m = marks.pop()
            items = stack[m:]
            del stack[m:]
            return items

        def pop() -> Any:
            if not stack:
                raise FormatError("pickle stack underflow")
            return stack.pop()

        def top() -> Any:
            if not stack:
                raise FormatError("pickle stack underflow")
            return stack[-1]

        def make_global(module: str, name: str, opcode: str, pos: int, resolved: bool = True) -> Any:
            qual = f"{module}.{name}"
            trace.globals.append(Event(opcode, qual, pos, resolved))
            if module == "torch" and name in TORCH_DTYPE_NAMES:
                return TorchDType(_DTYPE_ALIASES.get(name, name))
            return GlobalRef(module, name)

        def call(func: Any, args: Any, opcode: str, pos: int) -> Any:
            name = func.qualname if isinstance(func, GlobalRef) else (
                func.name if isinstance(func, Placeholder) else f"<{type(func).__name__}>"
            )
            trace.calls.append(Event(opcode, name, pos, isinstance(func, GlobalRef)))
            if isinstance(func, GlobalRef) and opcode == "REDUCE":
                handled, value = _reduce_known(name, args)
                if handled:
                    return value
            if name == "copyreg._reconstructor" and isinstance(args, tuple) and args:
                cls = args[0]
                return Placeholder(cls.qualname if isinstance(cls, GlobalRef) else repr(cls), args[1:])
            return Placeholder(name, args)

        while True:
            pos = r.pos()
            code = r.read(1)
            op = code[0]
            if op == 0x80:  # PROTO
                proto = r.read(1)[0]
                if proto > 5:
                    raise FormatError(f"unsupported pickle protocol {proto}")
            elif op == 0x95:  # FRAME
                r.read(8)
            elif code == b".":  # STOP
                if not stack:
                    raise FormatError("pickle STOP with an empty stack")
                return stack.pop()
            elif code == b"(":
                marks.append(len(stack))
            elif code == b"0":
                if stack and len(stack) > (marks[-1] if marks else -1):
                    stack.pop()
                else:
                    pop_mark()
            elif code == b"1":
                pop_mark()
            elif code == b"2":
                stack.append(top())
            elif code == b"N":
                stack.append(None)
            elif op == 0x88:
                stack.append(True)
            elif op == 0x89:
                stack.append(False)
            elif code == b"J":
                stack.append(struct.unpack("<i", r.read(4))[0])
            elif code == b"K":
                stack.append(r.read(1)[0])
            elif code == b"M":
                stack.append(struct.unpack("<H", r.read(2))[0])
            elif code == b"I":
                line = r.readline()
                if line == b"00":
                    stack.append(False)
                elif line == b"01":
                    stack.append(True)
                else:
                    stack.append(_parse_int(line))
            elif code == b"L":
                stack.append(_parse_int(line[:-1] if (line := r.readline()).endswith(b"L") else line))
            elif op == 0x8A:  # LONG1
                n = r.read(1)[0]
                stack.append(int.from_bytes(r.read(n), "little", signed=True))
            elif op == 0x8B:  # LONG4
                n = struct.unpack("<i", r.read(4))[0]
                if n < 0 or n > 4096:
                    raise FormatError(f"pickle LONG4 of {n} bytes")
                stack.append(int.from_bytes(r.read(n), "little", signed=True))
            elif code == b"F":
                try:
                    stack.append(float(r.readline()))
                except ValueError as exc:
                    raise FormatError("pickle FLOAT is not a number") from exc
            elif code == b"G":
                stack.append(struct.unpack(">d", r.read(8))[0])
            elif code == b"S":
                stack.append(_parse_string(r.readline()))
            elif code == b"T":
                n = struct.unpack("<i", r.read(4))[0]
                stack.append(r.read(n).decode("latin-1"))
            elif code == b"U":
                stack.append(r.read(r.read(1)[0]).decode("latin-1"))
            elif code == b"V":
                stack.append(r.readline().decode("raw-unicode-escape"))
            elif code == b"X":
                stack.append(_utf8(r.read(struct.unpack("<I", r.read(4))[0])))
            elif op == 0x8C:
                stack.append(_utf8(r.read(r.read(1)[0])))
            elif op == 0x8D:
                stack.append(_utf8(r.read(struct.unpack("<Q", r.read(8))[0])))
            elif code == b"B":
                stack.append(r.read(struct.unpack("<I", r.read(4))[0]))
            elif code == b"C":
                stack.append(r.read(r.read(1)[0]))
            elif op == 0x8E:
                stack.append(r.read(struct.unpack("<Q", r.read(8))[0]))
            elif op == 0x96:
                stack.append(bytearray(r.read(struct.unpack("<Q", r.read(8))[0])))
            elif op == 0x97:
                raise FormatError("pickle asks for an out-of-band buffer (NEXT_BUFFER)")
            elif op == 0x98:
                pass  # READONLY_BUFFER: no-op on our data
            elif code == b")":
                stack.append(())
            elif code == b"t":
                stack.append(tuple(pop_mark()))
            elif op == 0x85:
                stack.append((pop(),))
            elif op == 0x86:
                b = pop()
                a = pop()
                stack.append((a, b))
            elif op == 0x87:
                c = pop()
                b = pop()
                a = pop()
                stack.append((a, b, c))
            elif code == b"]":
                stack.append([])
            elif code == b"l":
                stack.append(pop_mark())
            elif code == b"a":
                v = pop()
                _append(top(), [v])
            elif code == b"e":
                items = pop_mark()
                _append(top(), items)
            elif code == b"}":
                stack.append({})
            elif code == b"d":
                items = pop_mark()
                stack.append(_pairs_to_dict(items))
            elif code == b"s":
                v = pop()
                k = pop()
                _setitems(top(), [k, v])
            elif code == b"u":
                items = pop_mark()
                _setitems(top(), items)
            elif op == 0x8F:
                stack.append(set())
            elif op == 0x90:
                items = pop_mark()
                s = top()
                if isinstance(s, set):
                    s.update(_hashable(x) for x in items)
                elif isinstance(s, Placeholder):
                    s.items.extend(items)
                else:
                    raise FormatError("pickle ADDITEMS on a non-set")
            elif op == 0x91:
                stack.append(frozenset(_hashable(x) for x in pop_mark()))
            elif code == b"c":
                module = r.readline().decode("utf-8", "replace")
                name = r.readline().decode("utf-8", "replace")
                stack.append(make_global(module, name, "GLOBAL", pos))
            elif op == 0x93:  # STACK_GLOBAL
                name = pop()
                module = pop()
                if isinstance(module, str) and isinstance(name, str):
                    stack.append(make_global(module, name, "STACK_GLOBAL", pos))
                else:
                    stack.append(make_global("?", "?", "STACK_GLOBAL", pos, resolved=False))
            elif op in (0x82, 0x83, 0x84):  # EXT1/2/4: the copyreg extension registry
                n = {0x82: 1, 0x83: 2, 0x84: 4}[op]
                ext = int.from_bytes(r.read(n), "little")
                stack.append(make_global("<extension>", str(ext), "EXT", pos, resolved=False))
            elif code == b"R":
                args = pop()
                func = pop()
                stack.append(call(func, args, "REDUCE", pos))
            elif op == 0x81:  # NEWOBJ
                args = pop()
                cls = pop()
                stack.append(call(cls, args, "NEWOBJ", pos))
            elif op == 0x92:  # NEWOBJ_EX
                kwargs = pop()
                args = pop()
                cls = pop()
                stack.append(call(cls, (args, kwargs), "NEWOBJ_EX", pos))
            elif code == b"i":  # INST
                module = r.readline().decode("utf-8", "replace")
                name = r.readline().decode("utf-8", "replace")
                cls = make_global(module, name, "INST", pos)
                stack.append(call(cls, tuple(pop_mark()), "INST", pos))
            elif code == b"o":  # OBJ
                items = pop_mark()
                if not items:
                    raise FormatError("pickle OBJ without a class")
                stack.append(call(items[0], tuple(items[1:]), "OBJ", pos))
            elif code == b"b":  # BUILD
                state = pop()
                obj = top()
                name = obj.name if isinstance(obj, Placeholder) else type(obj).__name__
                trace.calls.append(Event("BUILD", name, pos))
                if isinstance(obj, Placeholder):
                    obj.state = state if obj.state is None else (obj.state, state)
                elif isinstance(obj, PickledOrderedDict) and isinstance(state, dict):
                    obj.attributes = state
                elif isinstance(obj, PickledTensor) and isinstance(state, tuple) and state and isinstance(state[0], dict):
                    pass  # tensor subclass attributes: ignored
            elif code == b"P":
                pid = r.readline().decode("ascii", "replace")
                stack.append(self._persistent(pid))
            elif code == b"Q":
                stack.append(self._persistent(pop()))
            elif code == b"p":
                memo[_parse_int(r.readline())] = top()
            elif code == b"q":
                memo[r.read(1)[0]] = top()
            elif code == b"r":
                memo[struct.unpack("<I", r.read(4))[0]] = top()
            elif op == 0x94:
                memo[len(memo)] = top()
            elif code in (b"g", b"h", b"j"):
                idx = (
                    _parse_int(r.readline()) if code == b"g"
                    else r.read(1)[0] if code == b"h"
                    else struct.unpack("<I", r.read(4))[0]
                )
                if idx not in memo:
                    raise FormatError(f"pickle memo entry {idx} is read before it is written")
                stack.append(memo[idx])
            else:
                raise FormatError(f"unknown pickle opcode {code!r} at byte {pos}")

    def _persistent(self, pid: Any) -> Any:
        if self.persistent_load is None:
            return Placeholder("<persistent id>", (pid,))
        return self.persistent_load(pid)


def _parse_int(line: bytes) -> int:
    try:
        return int(line)
    except ValueError as exc:
        raise FormatError("pickle integer argument is not a number") from exc


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
