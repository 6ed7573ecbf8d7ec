"""Open any checkpoint as a :class:`Checkpoint`: safely, header-only, without torch."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

from .bulk import paused
from .checkpoint import (
    DENSE,
    DTENSOR_SHARD,
    DTYPES,
    QUANTIZED,
    SPARSE_KINDS,
    Candidate,
    Checkpoint,
    TensorRef,
    contiguous_strides,
    dense_ref,
    itemsize,
    numel,
    total_numel,
)
from .errors import FormatError, InputError, KeyPathError
from .formats import sniff as fmt
from .formats.pickle_vm import (
    READ_AS_DATA,
    REBUILT_AS_DATA,
    TORCH_DTYPE_NAMES,
    GlobalRef,
    PickledTensor,
    Placeholder,
    StorageRef,
    TorchDType,
    Trace,
    walk_tensors,
)
from .formats.safetensors import parse_json, read_safetensors
from .formats.torchfile import RawFile, read_legacy, read_pickle, read_zip

# where weights usually live, most likely first
PREFERRED_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_ema",
    "ema",
    "state_dict_ema",
    "params",
    "weights",
    "generator",
    "teacher",
    "student",
)
MODULE_TREE = "module tree"


def read_raw(path: str, trace: Trace | None = None) -> RawFile:
    """Decode a single torch/pickle file into its inert object tree (no tensor bytes). Without a
    ``trace`` given, the globals the file names are recorded, not its calls (see :class:`Trace`)."""
    trace = trace if trace is not None else Trace(record_calls=False)
    kind = fmt.sniff(path)
    size = _size(path)
    if kind in (fmt.ZIP, fmt.TORCHSCRIPT):
        return read_zip(path, size, trace, kind)
    if kind == fmt.LEGACY:
        return read_legacy(path, size, trace)
    if kind == fmt.PICKLE:
        return read_pickle(path, size, trace)
    _refuse(path, kind, size)
    raise AssertionError("unreachable")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _refuse(path: str, kind: str, size: int) -> None:
    if kind == fmt.LFS_POINTER:
        raise lfs_error(path)
    if kind == fmt.DCP_SHARD:
        from .formats.dcp import shard_error

        raise shard_error(path)
    if size == 0:
        raise InputError(f"{path}: file is empty")
    if kind == fmt.LEGACY_TAR:
        raise InputError(f"{path}: torch tar format from before 0.4 is not supported; re-save it with a newer torch")
    if looks_like_onnx(path):
        raise InputError(
            f"{path}: is an ONNX model; ckpt reads PyTorch (.pth/.pt/.bin/.ckpt, TorchScript) and safetensors files"
        )
    raise InputError(f"{path}: not a recognised checkpoint (no torch zip, safetensors, pickle or legacy torch header)")


# the fields an ONNX ModelProto starts with after ir_version (field 1): producer, domain, graph, opsets...
_ONNX_NEXT_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72}


def looks_like_onnx(path: str) -> bool:
    """An ONNX protobuf: its ``ir_version`` field first (tag 0x08, a small number), then another ModelProto field."""
    try:
        with open(path, "rb") as f:
            head = f.read(3)
    except OSError:
        return False
    if path.lower().endswith(".onnx"):
        return True
    return len(head) == 3 and head[0] == 0x08 and 1 <= head[1] <= 32 and head[2] in _ONNX_NEXT_TAGS


def lfs_error(path: str) -> InputError:
    from .errors import LfsPointerError

    info = parse_lfs_pointer(path)
    detail = f" (oid {info.get('oid', '?')}, {info.get('size', '?')} bytes)" if info else ""
    return LfsPointerError(f"{path}: is a git-lfs pointer{detail}; the real file was not fetched")


def parse_lfs_pointer(path: str) -> dict[str, str]:
    with open(path, "rb") as f:
        text = f.read(1024).decode("utf-8", "replace")
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in ("version", "oid", "size"):
            out[key] = value
    return out


@paused
def open_checkpoint(path: str, key: str | None = None, *, optimizer: bool = False) -> Checkpoint:
    """Describe the checkpoint at ``path`` without reading tensor bytes or importing torch.

    Args:
        path: a file of any supported format, a ``*.index.json``, or a directory holding one (or
            holding a single ``model.safetensors`` / ``pytorch_model.bin``).
        key: path to the nested state dict (``"model"``, ``"state_dict"``, ``"ckpt/ema"``);
            by default the obvious one is chosen.
        optimizer: let ``key`` name optimizer state (described flattened: ``state.0.exp_avg``);
            only ``inspect`` asks for it, since no model loads optimizer state.

    Example:
        >>> ckpt = open_checkpoint("fixtures/tiny_cnn.pth")
        >>> ckpt.tensors["classifier.fc2.weight"].shape
        (10, 32)
    """
    kind = fmt.sniff(path)
    if kind == fmt.DCP:
        from .formats.dcp import open_dcp

        return open_dcp(path, key)
    if kind == fmt.SHARDED:
        found = _find_index(path)
        if not found.endswith(".index.json"):
            return open_checkpoint(found, key, optimizer=optimizer)  # a directory holding one weights file
        return _open_sharded(found, key)
    size = _size(path)
    if kind == fmt.SAFETENSORS:
        header = read_safetensors(path)
        if key not in (None, ""):
            raise KeyPathError(f"{path}: --key {key!r} given, but a safetensors file holds one flat state dict")
        return Checkpoint(
            path=path,
            format=kind,
            file_size=size,
            tensors=header.tensors,
            state_path="",
            candidates=(Candidate("", len(header.tensors), header.elements),),
            metadata=header.metadata,
            files=(path,),
        )
    raw = read_raw(path)
    return describe_raw(raw, key, optimizer=optimizer)


def describe_raw(raw: RawFile, key: str | None = None, *, optimizer: bool = False) -> Checkpoint:
    """Turn a decoded torch file into a :class:`Checkpoint`, choosing the state dict."""
    candidates = find_candidates(raw.root)
    if key not in (None, ""):
        chosen_path, obj = resolve_key(raw.root, key, raw.path, candidates, optimizer=optimizer)
    elif not candidates:
        chosen_path, obj = None, None
    else:
        chosen_path, obj = _default_candidate(raw.root, candidates)
    flat = {id(o): to_state_dict(o, raw.path) for _, o in candidates}
    tensors = (flat.get(id(obj)) or to_state_dict(obj, raw.path)) if obj is not None else {}
    cands = tuple(Candidate(p, len(flat[id(o)]), total_numel(flat[id(o)].values())) for p, o in candidates)
    extras = summarize_extras(raw.root, chosen_path)
    # every object the pickle would have built comes from a global; the known torch ones became data
    placeholders = sorted({e.name for e in raw.trace.globals if not _known_global(e.name)})
    attributes: dict[str, TensorRef] = {}
    if isinstance(obj, Placeholder) and raw.script_classes:
        tensors, attributes = split_script_attributes(tensors, obj, raw.script_classes)
    return Checkpoint(
        path=raw.path,
        format=raw.format,
        file_size=raw.file_size,
        tensors=tensors,
        state_path=chosen_path,
        candidates=cands,
        extras=extras,
        placeholders=tuple(placeholders),
        files=(raw.path,),
        root=raw.root,
        objects=state_objects(obj),
        module_metadata=module_metadata(obj),
        attributes=attributes,
    )


def state_objects(obj: Any) -> dict[str, Any]:
    """The entries of a state dict that are not tensors (``_extra_state`` from ``get_extra_state``), in order."""
    if not isinstance(obj, dict) or _is_optimizer_state(obj):
        return {}
    return {str(k): v for k, v in obj.items() if not isinstance(v, PickledTensor)}


def module_metadata(obj: Any) -> dict[str, Any] | None:
    """A state dict's ``_metadata`` (module prefix -> ``{"version": n}``), which ``load_state_dict`` reads."""
    attributes = getattr(obj, "attributes", None)
    meta = attributes.get("_metadata") if isinstance(attributes, dict) else None
    if not isinstance(meta, dict):
        return None
    return {str(k): dict(v) if isinstance(v, dict) else v for k, v in meta.items()}


def split_script_attributes(
    tensors: dict[str, TensorRef], root: Placeholder, classes: dict[str, tuple[set[str], set[str]]]
) -> tuple[dict[str, TensorRef], dict[str, TensorRef]]:
    """TorchScript: (parameters and buffers, other tensor attributes), as ``torch.jit.load(f).state_dict()`` splits them.

    The archive's ``code/`` declares each class's ``__parameters__`` and ``__buffers__``; a class
    whose code is missing keeps all of its tensors in the state dict.
    """
    members: dict[str, bool] = {}

    def walk(obj: Placeholder, prefix: str, seen: set[int]) -> None:
        if id(obj) in seen or not isinstance(obj.state, dict):
            return
        seen.add(id(obj))
        declared = classes.get(obj.name)
        for name, value in obj.state.items():
            if isinstance(value, PickledTensor):
                members[prefix + str(name)] = declared is None or str(name) in declared[0] | declared[1]
            elif isinstance(value, Placeholder):
                walk(value, f"{prefix}{name}.", seen)

    walk(root, "", set())
    kept = {k: r for k, r in tensors.items() if members.get(k, True)}
    return kept, {k: r for k, r in tensors.items() if not members.get(k, True)}


def _known_global(name: str) -> bool:
    if name in REBUILT_AS_DATA or name in READ_AS_DATA:
        return True
    module, _, attr = name.rpartition(".")
    return module in ("torch", "torch.storage") and (attr.endswith("Storage") or attr in TORCH_DTYPE_NAMES)


def _is_optimizer_state(obj: dict[Any, Any]) -> bool:
    return "param_groups" in obj and "state" in obj


def _module_state(obj: Placeholder) -> dict[str, Any] | None:
    """The ``__dict__`` a pickled ``nn.Module`` would be restored from, if it looks like one."""
    state = obj.state
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    if isinstance(state, dict) and "_modules" in state and ("_parameters" in state or "_buffers" in state):
        return state
    return None


def _is_script_module(obj: Placeholder) -> bool:
    return obj.name.startswith("__torch__.") and isinstance(obj.state, dict)


# the key a file that holds one bare tensor (``torch.save(tensor, f)``) describes it under
BARE_TENSOR = "<tensor>"


# state-dict entries that stand for tensors without being one: a module's get_extra_state(), and
# the packed weights of a dynamically quantized layer (torch.ao.quantization.quantize_dynamic)
PACKED_PARAMS = "_packed_params._packed_params"
TENSOR_LIKE_SUFFIXES = ("_extra_state", PACKED_PARAMS, "_packed_params.dtype")


_SETTINGS = (str, int, float, bool, bytes, type(None))


def _state_dict_kind(obj: dict[Any, Any]) -> int:
    """2: a state dict; 1: a dict with tensors that looks more like settings (plain values
    outnumber what stands for tensors: Lightning's ModelCheckpoint state, one score tensor among
    its paths, or an EarlyStopping counter); 0: neither. Tensors, pickled objects (tensor
    subclasses, the ScriptObjects of a quantized LSTM) and the entries of
    :data:`TENSOR_LIKE_SUFFIXES` stand for tensors."""
    if not all(isinstance(k, str) for k in obj) or not any(isinstance(v, PickledTensor) for v in obj.values()):
        return 0
    settings = 0
    for k, v in obj.items():
        if isinstance(v, _SETTINGS) and not k.endswith(TENSOR_LIKE_SUFFIXES):
            settings += 1
    return 2 if 2 * settings < len(obj) else 1


def find_candidates(root: Any) -> list[tuple[str, Any]]:
    """Every place in the tree that holds a state dict: ``(key path, object)`` in tree order.

    Dicts of tensors that look like settings (``_state_dict_kind`` 1) are offered only when the
    tree holds nothing better: ``{"weight": t, "step": 10, "lr": 0.1}`` alone is still read."""
    found: list[tuple[str, Any]] = []
    settings: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def walk(obj: Any, path: str, depth: int) -> None:
        if depth > 12 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            if _is_optimizer_state(obj):
                return
            kind = _state_dict_kind(obj)
            if kind:
                (found if kind == 2 else settings).append((path, obj))
            for k, v in obj.items():
                if isinstance(v, (dict, list, tuple, Placeholder)):
                    walk(v, _join(path, str(k)), depth + 1)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                if isinstance(v, (dict, list, tuple, Placeholder)):
                    walk(v, _join(path, str(i)), depth + 1)
        elif isinstance(obj, Placeholder):
            if _module_state(obj) is not None or _is_script_module(obj):
                found.append((path, obj))
                return
            if obj.dictitems:
                walk(obj.dictitems, path, depth + 1)

    if isinstance(root, PickledTensor):  # torch.save(tensor): one tensor, under BARE_TENSOR
        return [("", root)]
    walk(root, "", 0)
    return found or settings


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


def _default_candidate(root: Any, candidates: list[tuple[str, Any]]) -> tuple[str, Any]:
    if len(candidates) == 1:
        return candidates[0]
    for path, obj in candidates:
        if path == "":
            return path, obj
    by_path = dict(candidates)
    for name in PREFERRED_KEYS:
        if name in by_path:
            return name, by_path[name]
    return max(candidates, key=lambda c: len(to_state_dict(c[1], "")))


def resolve_key(
    root: Any, key: str, path: str, candidates: list[tuple[str, Any]], *, optimizer: bool = False
) -> tuple[str, Any]:
    """Follow a key path (``model``, ``ckpt/ema`` or ``ckpt.ema``) to a state dict."""
    obj, walked = walk_key(root, key)
    if obj is None:
        choices = ", ".join(repr(p or "<top level>") for p, _ in candidates) or "none"
        raise KeyPathError(f"{path}: no state dict at --key {key!r} (candidates: {choices})")
    if isinstance(obj, Placeholder) and (_module_state(obj) is not None or _is_script_module(obj)):
        return walked, obj
    if isinstance(obj, Placeholder) and obj.dictitems:
        obj = obj.dictitems
    if isinstance(obj, dict) and not any(isinstance(v, PickledTensor) for v in obj.values()) and _nested_tensors(obj):
        if not optimizer:
            raise KeyPathError(
                f"{path}: --key {key!r} holds nested state such as an optimizer's, not a model state "
                "dict (`ckpt inspect --key` describes it)"
            )
        # optimizer state (``state`` -> parameter index -> ``exp_avg``...): described flattened
        return walked, _flatten_nested(obj)
    if not isinstance(obj, dict) or not any(isinstance(v, PickledTensor) for v in obj.values()):
        choices = ", ".join(repr(p or "<top level>") for p, _ in candidates) or "none"
        raise KeyPathError(f"{path}: --key {key!r} holds no tensors (candidates: {choices})")
    return walked, obj


def walk_key(root: Any, key: str) -> tuple[Any, str]:
    """Follow a key path through a decoded tree: ``(object, the path as walked)``, or ``(None, "")``."""
    sep = "/" if "/" in key else "."
    parts = key.split(sep)
    obj = root
    walked: list[str] = []
    i = 0
    while i < len(parts):
        container = obj.dictitems if isinstance(obj, Placeholder) and obj.dictitems else obj
        # the longest run of parts that is itself a key ("model.ema" may be one key)
        for j in range(len(parts), i, -1):
            name = sep.join(parts[i:j])
            if isinstance(container, dict) and name in container:
                obj = container[name]
                walked.append(name)
                i = j
                break
            if isinstance(container, dict) and _is_int(name) and int(name) in container:
                obj = container[int(name)]  # optimizer state is keyed by parameter index
                walked.append(name)
                i = j
                break
            if isinstance(container, (list, tuple)) and name.isdigit() and int(name) < len(container):
                obj = container[int(name)]
                walked.append(name)
                i = j
                break
        else:
            return None, ""
    return obj, "/".join(walked)


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _nested_tensors(obj: Any) -> bool:
    return next(walk_tensors(obj), None) is not None


def _flatten_nested(obj: dict[Any, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Nested dicts and lists of tensors as one dict keyed by dotted paths (``state.0.exp_avg``)."""
    out: dict[str, Any] = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, PickledTensor):
            out[name] = v
        elif isinstance(v, (dict, list, tuple)) and depth < 8:
            out.update(_flatten_nested(v, name + ".", depth + 1))  # type: ignore[arg-type]
    return out


def to_state_dict(obj: Any, path: str) -> dict[str, TensorRef]:
    """Flatten a candidate (a dict of tensors or a pickled module) into ``key -> TensorRef``."""
    out: dict[str, TensorRef] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, PickledTensor):
                out[str(k)] = tensor_ref(str(k), v, path)
    elif isinstance(obj, Placeholder):
        _module_tensors(obj, "", out, path, set())
    elif isinstance(obj, PickledTensor):
        out[BARE_TENSOR] = tensor_ref(BARE_TENSOR, obj, path)
    return out


def _module_tensors(obj: Placeholder, prefix: str, out: dict[str, TensorRef], path: str, seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    state = _module_state(obj)
    if state is not None:
        params = state.get("_parameters") or {}
        buffers = state.get("_buffers") or {}
        skip = state.get("_non_persistent_buffers_set") or ()
        for group, skipped in ((params, ()), (buffers, skip)):
            if isinstance(group, dict):
                for name, t in group.items():
                    if isinstance(t, PickledTensor) and name not in skipped:
                        out[prefix + str(name)] = tensor_ref(prefix + str(name), t, path)
        children = state.get("_modules") or {}
        if isinstance(children, dict):
            for name, child in children.items():
                if isinstance(child, Placeholder):
                    _module_tensors(child, f"{prefix}{name}.", out, path, seen)
        return
    if _is_script_module(obj):
        for name, value in obj.state.items():
            if isinstance(value, PickledTensor):
                out[prefix + str(name)] = tensor_ref(prefix + str(name), value, path)
            elif isinstance(value, Placeholder):
                _module_tensors(value, f"{prefix}{name}.", out, path, seen)


# shape -> (its contiguous strides, its elements), for shapes of non-negative sizes: a file has few
_LAYOUTS: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}


def tensor_ref(key: str, t: PickledTensor, path: str) -> TensorRef:
    """The :class:`TensorRef` of a decoded tensor, checked against its storage (composites: each part)."""
    s: StorageRef | None = t.storage
    if s is not None and t.kind == "tensor" and not (t.parts or t.attrs or t.note):
        # a plain contiguous tensor (nearly every one) within its storage: its layout was checked
        # once for its shape; anything else is checked below, which says what is wrong
        shape = t.shape
        layout = _LAYOUTS.get(shape)
        if layout is None and min(shape, default=0) >= 0 and len(_LAYOUTS) < 4096:
            layout = _LAYOUTS[shape] = (contiguous_strides(shape), math.prod(shape))
        size = DTYPES.get(t.dtype)
        if layout is not None and t.stride == layout[0] and size is not None and t.storage_offset >= 0:
            if not layout[1] or (t.storage_offset + layout[1]) * size[0] <= s.nbytes:
                return _plain_ref(key, t, s, path)
    # (a plain tensor has no parts or attributes: 100,000 of them skip the work)
    parts = tuple((name, tensor_ref(f"{key}#{name}", p, path)) for name, p in t.parts.items()) if t.parts else ()
    extra: dict[str, Any] = {"attrs": tuple(sorted(t.attrs.items())) if t.attrs else (), "note": t.note, "parts": parts}
    if t.kind in SPARSE_KINDS:
        return TensorRef(
            key, t.dtype, t.shape, (), f"{path}#{t.kind}:{key}", 0, 0, None, path, t.requires_grad, kind=t.kind, **extra
        )
    kind = t.kind if t.kind in (QUANTIZED, DTENSOR_SHARD) else DENSE
    if s is None:
        return TensorRef(
            key, t.dtype, t.shape, t.stride, f"{path}#meta:{key}", 0, 0, None, path, t.requires_grad, kind=kind, **extra
        )
    if parts or extra["attrs"] or t.note or kind != DENSE:
        ref = TensorRef(
            key=key,
            dtype=t.dtype,
            shape=t.shape,
            stride=t.stride,
            storage=f"{path}#{s.key}",
            storage_offset=t.storage_offset,
            storage_nbytes=s.nbytes,
            data_offset=s.data_offset,
            file=s.file or path,
            requires_grad=t.requires_grad,
            kind=kind,
            **extra,
        )
    else:
        ref = _plain_ref(key, t, s, path)
    if min(t.shape, default=0) < 0 or min(t.stride, default=0) < 0 or t.storage_offset < 0:
        raise FormatError(f"{path}: tensor {key!r} has a negative size, stride or offset")
    if t.dtype not in DTYPES:
        raise FormatError(f"{path}: tensor {key!r} has an unknown dtype {t.dtype!r}")
    end = (t.storage_offset + ref.span_elements) * itemsize(t.dtype)
    if ref.numel and end > s.nbytes:
        raise FormatError(f"{path}: tensor {key!r} reads past the end of its storage ({end} > {s.nbytes} bytes)")
    return ref


def _plain_ref(key: str, t: PickledTensor, s: StorageRef, path: str) -> TensorRef:
    """The ref of a plain tensor (nearly every one), built as dense_ref builds it."""
    return dense_ref(
        key,
        t.dtype,
        t.shape,
        t.stride,
        f"{path}#{s.key}",
        s.nbytes,
        s.data_offset,
        s.file or path,
        t.storage_offset,
        t.requires_grad,
    )


def summarize(value: Any, depth: int = 0) -> Any:
    """A JSON-able, bounded description of a non-tensor value."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:197] + "..."
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, PickledTensor):
        return f"<tensor {value.dtype}{list(value.shape)}>"
    if isinstance(value, TorchDType):
        return f"torch.{value.name}"
    if isinstance(value, GlobalRef):
        return f"<global {value.qualname}>"
    if isinstance(value, Placeholder):
        if value.dictitems and depth < 2:
            return {
                "<object>": value.name,
                **{str(k): summarize(v, depth + 1) for k, v in list(value.dictitems.items())[:50]},
            }
        return f"<object {value.name}>"
    if isinstance(value, dict):
        tensors = _count_tensors(value)
        if _is_optimizer_state(value):
            return f"<optimizer state: {tensors[0]} tensors, {tensors[1]} bytes>"
        if depth >= 2 or len(value) > 50:
            return f"<dict of {len(value)} entries, {tensors[0]} tensors>"
        return {str(k): summarize(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        tensors = _count_tensors(value)
        if depth >= 2 or len(value) > 20 or tensors[0]:
            return f"<{type(value).__name__} of {len(value)} items, {tensors[0]} tensors>"
        return [summarize(v, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


def _count_tensors(obj: Any) -> tuple[int, int]:
    tensors = [t for t in walk_tensors(obj) if t.dtype in DTYPES]
    return len(tensors), sum(numel(t.shape) * itemsize(t.dtype) for t in tensors)


def summarize_extras(root: Any, chosen: str | None) -> dict[str, Any]:
    """The entries beside the chosen state dict, summarized (see :func:`sibling_entries`)."""
    return {name: summarize(v) for name, v in sibling_entries(root, chosen)}


def sibling_entries(root: Any, chosen: str | None) -> list[tuple[str, Any]]:
    """Entries beside the chosen state dict at every level of its path, named by their path
    (every top-level entry when none is chosen).

    For ``model/state_dict`` these are the top-level entries other than ``model`` and the entries
    of ``model`` other than ``state_dict`` (``model/model_args``).
    """
    if chosen == "":
        return []
    out: list[tuple[str, Any]] = []
    node, walked = root, ""
    for part in chosen.split("/") if chosen is not None else [None]:
        container = node.dictitems if isinstance(node, Placeholder) and node.dictitems else node
        if not isinstance(container, dict):
            break
        out.extend((_join(walked, str(k)), v) for k, v in container.items() if str(k) != part)
        if part is None:  # no state dict chosen: every top-level entry
            break
        node = container.get(part, container.get(int(part)) if _is_int(part) else None)
        walked = _join(walked, part)
    return out


def _open_sharded(index_path: str, key: str | None) -> Checkpoint:
    try:
        with open(index_path, "rb") as f:
            index = parse_json(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{index_path}: sharded index is not valid JSON ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index_path}: sharded index has no weight_map of key -> shard file")
    base = os.path.dirname(os.path.abspath(index_path))
    shards: dict[str, Checkpoint] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = shard_location(base, shard, index_path)
        if not os.path.exists(shard_path):
            raise InputError(f"{index_path}: shard {shard!r} named in the index does not exist")
        shards[shard] = open_checkpoint(shard_path, key)
    tensors: dict[str, TensorRef] = {}
    for name, shard in weight_map.items():
        ref = shards[shard].tensors.get(name)
        if ref is None:
            raise FormatError(f"{index_path}: index puts {name!r} in {shard}, but that shard has no such tensor")
        tensors[name] = ref
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    files = tuple(s.path for s in shards.values())
    first = next(iter(shards.values()), None)
    return Checkpoint(
        path=index_path,
        format=f"{fmt.SHARDED} ({first.format if first else 'empty'})",
        file_size=sum(s.file_size for s in shards.values()),
        tensors=tensors,
        state_path="",
        candidates=(Candidate("", len(tensors), _elements(tensors, shards.values())),),
        metadata={str(k): str(v) for k, v in metadata.items()},
        files=files,
        placeholders=tuple(sorted({p for s in shards.values() for p in s.placeholders})),
    )


def _elements(tensors: dict[str, TensorRef], shards: Iterable[Checkpoint]) -> int:
    """The set's parameter count: the shards' own counts when the index takes every tensor they hold."""
    shards = list(shards)
    whole = all(len(s.candidates) == 1 and s.candidates[0].tensors == len(s.tensors) for s in shards)
    if whole and sum(len(s.tensors) for s in shards) == len(tensors):
        return sum(s.candidates[0].parameters for s in shards)
    return sum(math.prod(t.shape) for t in tensors.values())


def shard_location(base: str, shard: str, index_path: str) -> str:
    """A shard's path, refusing names that leave the index's directory."""
    if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
        raise FormatError(f"{index_path}: shard path {shard!r} escapes the checkpoint's directory")
    return os.path.join(base, shard)


# the single-file names Hugging Face and torch users give a directory's weights, best first
SINGLE_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt", "model.ckpt")


def _find_index(path: str) -> str:
    """The index to open for ``path``: the file itself, or the one index (or weights file) a directory holds."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise InputError(f"{path}: no such file")
        return path
    names = set(os.listdir(path))
    indexes = sorted(n for n in names if n.endswith(".index.json"))
    if not indexes:
        for name in SINGLE_FILE_NAMES:
            if name in names:
                return os.path.join(path, name)
        raise InputError(
            f"{path}: directory holds no *.index.json and none of {', '.join(SINGLE_FILE_NAMES)} "
            "(pass a checkpoint file instead)"
        )
    safetensors_first = [n for n in indexes if "safetensors" in n] or indexes
    if len(safetensors_first) > 1:
        raise InputError(f"{path}: several indexes ({', '.join(indexes)}); pass one of them")
    return os.path.join(path, safetensors_first[0])


def packed_params(ckpt: Checkpoint) -> dict[str, str]:
    """The state dict's packed weights of dynamically quantized layers (``quantize_dynamic``:
    ``LinearPackedParams`` saves ``(qweight, bias)``, or a ``torch.ScriptObject`` from
    ``linear_prepack``), key -> what they hold. Opaque to ckpt: nothing of them is built or run."""
    out = {}
    for key, value in ckpt.objects.items():
        if not key.endswith(PACKED_PARAMS):
            continue
        if isinstance(value, tuple) and value and isinstance(value[0], PickledTensor):
            parts = [tensor_ref(key, v, ckpt.path) for v in value if isinstance(v, PickledTensor)]
            names = ("weight", "bias")
            out[key] = ", ".join(f"{n} {r.dtype} {list(r.shape)}" for n, r in zip(names, parts))
        else:
            out[key] = f"an object ({value.name})" if isinstance(value, Placeholder) else type(value).__name__
    return out
