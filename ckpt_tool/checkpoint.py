"""The description every command works on: tensors as references into a file, never their bytes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .bulk import fast_constructor

# the buffers torch's normalisation layers save, by name (they are not model.parameters())
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")

# a progress callback: (bytes handled just now, bytes to handle in all)
Progress = Callable[[int, int], None]

# dtype name -> (bytes per element, safetensors code, is floating point)
DTYPES: dict[str, tuple[int, str | None, bool]] = {
    "float64": (8, "F64", True),
    "float32": (4, "F32", True),
    "float16": (2, "F16", True),
    "bfloat16": (2, "BF16", True),
    "float8_e4m3fn": (1, "F8_E4M3", True),
    "float8_e5m2": (1, "F8_E5M2", True),
    "float8_e4m3fnuz": (1, "F8_E4M3FNUZ", True),
    "float8_e5m2fnuz": (1, "F8_E5M2FNUZ", True),
    "float8_e8m0fnu": (1, "F8_E8M0", True),
    "complex128": (16, "C128", False),
    "complex64": (8, "C64", False),
    "complex32": (4, None, False),
    "int64": (8, "I64", False),
    "int32": (4, "I32", False),
    "int16": (2, "I16", False),
    "int8": (1, "I8", False),
    "uint64": (8, "U64", False),
    "uint32": (4, "U32", False),
    "uint16": (2, "U16", False),
    "uint8": (1, "U8", False),
    "bool": (1, "BOOL", False),
    "qint8": (1, None, False),
    "quint8": (1, None, False),
    "qint32": (4, None, False),
    "quint4x2": (1, None, False),
    "quint2x4": (1, None, False),
}

# Every dtype torch defines (2.14), by the name torch pickles it under (``str(dtype)`` less
# ``torch.``); DTYPES above holds the ones ckpt reads and writes. tests/test_checkpoint.py checks
# both tables against torch.
TORCH_DTYPES = frozenset(
    {
        *DTYPES,
        "bcomplex32",
        "float4_e2m1fn_x2",
        "bits1x8",
        "bits2x4",
        "bits4x2",
        "bits8",
        "bits16",
        *(f"int{i}" for i in range(1, 8)),
        *(f"uint{i}" for i in range(1, 8)),
    }
)
# the second names torch gives some of them (``torch.half`` is ``torch.float16``): torch writes the
# first name, but a pickle may name either
TORCH_DTYPE_ALIASES = {
    "double": "float64",
    "float": "float32",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
    "bit": "uint1",
}

DENSE = "dense"
QUANTIZED = "quantized"
DTENSOR_SHARD = "dtensor_shard"
SPARSE_KINDS = frozenset({"sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc"})
QUANTIZED_DTYPES = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})

SAFETENSORS_TO_DTYPE: dict[str, str] = {code: name for name, (_, code, _) in DTYPES.items() if code}


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name such as ``"bfloat16"``."""
    return DTYPES[dtype][0]


def is_floating(dtype: str) -> bool:
    return DTYPES.get(dtype, (0, None, False))[2]


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def total_numel(refs: Iterable[TensorRef]) -> int:
    """The elements of all ``refs`` (one pass, no property call per ref: 100,000 refs in a few ms)."""
    return sum(map(math.prod, [r.shape for r in refs]))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides: list[int] = []
    acc = 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= max(dim, 1)
    return tuple(reversed(strides))


# slots: a header of 100,000 tensors holds 100,000 refs (200 bytes each, against 580 with a __dict__)
@dataclass(frozen=True, slots=True)
class TensorRef:
    """One tensor described by where its bytes live; no bytes are held.

    ``storage`` names the storage the tensor views: two tensors with the same ``storage`` share
    memory (tied weights). ``data_offset`` is the absolute byte offset of the storage in ``file``
    (``None`` when the file holds no bytes for it, e.g. a meta tensor).
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage: str
    storage_offset: int
    storage_nbytes: int
    data_offset: int | None
    file: str
    requires_grad: bool = False
    # ``dense``, a sparse layout (``sparse_coo``, ``sparse_csr``...), ``quantized`` or ``dtensor_shard``
    kind: str = DENSE
    # a composite's component tensors (sparse indices/values, per-channel scales) by name
    parts: tuple[tuple[str, TensorRef], ...] = ()
    # plain data a composite needs (qscheme, scale, zero_point, axis, is_coalesced, a DTensor's shape)
    attrs: tuple[tuple[str, Any], ...] = ()
    # how the reader converted the input object (a DTensor taken as its full local tensor)
    note: str = ""

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        if self.kind in SPARSE_KINDS:
            return sum(p.nbytes for _, p in self.parts)
        return self.numel * itemsize(self.dtype)

    @property
    def attr(self) -> dict[str, Any]:
        return dict(self.attrs)

    @property
    def part(self) -> dict[str, TensorRef]:
        return dict(self.parts)

    @property
    def offset(self) -> int | None:
        """Absolute byte offset of the first element in ``file``."""
        if self.data_offset is None:
            return None
        return self.data_offset + self.storage_offset * itemsize(self.dtype)

    @property
    def is_contiguous(self) -> bool:
        if self.numel <= 1:
            return True
        for dim, got, want in zip(self.shape, self.stride, contiguous_strides(self.shape)):
            if dim != 1 and got != want:
                return False
        return True

    @property
    def span_elements(self) -> int:
        """Elements of the storage the view touches, from its first element to its last."""
        if self.numel == 0:
            return 0
        return 1 + sum((d - 1) * s for d, s in zip(self.shape, self.stride))

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "stride": list(self.stride),
            "numel": self.numel,
            "nbytes": self.nbytes,
            "storage": self.storage,
            "storage_offset": self.storage_offset,
            "offset": self.offset,
            "contiguous": self.is_contiguous,
            **({"kind": self.kind} if self.kind != DENSE else {}),
        }


# TensorRef(...) of every field, positionally, in a third of the time (see fast_constructor)
build_ref = fast_constructor(TensorRef)


def dense_ref(
    key: str,
    dtype: str,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    storage: str,
    storage_nbytes: int,
    data_offset: int | None,
    file: str,
    storage_offset: int = 0,
    requires_grad: bool = False,
) -> TensorRef:
    """``TensorRef(key, dtype, shape, stride, storage, storage_offset, storage_nbytes, data_offset, file,
    requires_grad)``, built in a third of the time (:func:`~ckpt_tool.bulk.fast_constructor`): most of
    the cost of reading a 100,000-tensor header was the frozen dataclass's ``__init__``. Equal to the
    ordinary construction (tests/test_scale.py checks it field by field)."""
    return build_ref(
        key,
        dtype,
        shape,
        stride,
        storage,
        storage_offset,
        storage_nbytes,
        data_offset,
        file,
        requires_grad,
        DENSE,
        (),
        (),
        "",
    )


@dataclass(frozen=True)
class Candidate:
    """A place in a checkpoint's object tree that holds a state dict."""

    path: str
    tensors: int
    parameters: int


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds, read header-only.

    ``tensors`` is the state dict chosen (by ``key`` or by default) in file order; ``root`` is the
    whole decoded object tree (plain data, :class:`TensorRef` and inert placeholders).
    """

    path: str
    format: str
    file_size: int
    tensors: dict[str, TensorRef]
    state_path: str | None
    candidates: tuple[Candidate, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)
    placeholders: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    root: Any = field(default=None, repr=False, compare=False)
    # entries of the chosen state dict that are not tensors (``_extra_state`` of get_extra_state)
    objects: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # the state dict's ``_metadata`` attribute (module prefix -> {"version": n}), which torch pickles
    module_metadata: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # TorchScript: tensor attributes that are neither parameters nor buffers (not in ``state_dict()``)
    attributes: dict[str, TensorRef] = field(default_factory=dict, repr=False, compare=False)

    @property
    def parameters(self) -> int:
        return total_numel(self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def shared_storages(self) -> dict[str, list[str]]:
        """Storages viewed by more than one tensor, with the keys that view them."""
        refs = self.tensors.values()
        if len({ref.storage for ref in refs}) == len(refs):  # nothing shared: the common case, settled at once
            return {}
        # a list only for a storage met twice (100,000 one-key lists cost more than the walk)
        first: dict[str, str] = {}
        groups: dict[str, list[str]] = {}
        for ref in refs:
            key = ref.key
            seen = first.setdefault(ref.storage, key)
            if seen is not key:
                groups.setdefault(ref.storage, [seen]).append(key)
        return {s: groups[s] for s in first if s in groups} if groups else {}


def in_module(key: str, module: str) -> bool:
    """Whether ``key`` is ``module`` or lies under it, by module path (``""`` holds every key).

    Example:
        >>> in_module("classifier.6.bias", "classifier.6"), in_module("classifier.60.bias", "classifier.6")
        (True, False)
    """
    module = module.rstrip(".")
    return module == "" or key == module or key.startswith(module + ".")


def common_prefix(keys: list[str]) -> str:
    """The longest dotted prefix shared by every key (``"module."``), or ``""``.

    Example:
        >>> common_prefix(["module.fc.weight", "module.fc.bias"])
        'module.fc.'
    """
    if len(keys) == 0:
        return ""
    # the text every key starts with is the common start of the smallest and the largest key; its
    # dotted components are shared by every key, and none is a key's last component (a dot follows)
    first, last = min(keys), max(keys)
    n = 0
    for a, b in zip(first, last):
        if a != b:
            break
        n += 1
    return first[: first.rfind(".", 0, n) + 1]
