"""Target architectures: torchvision names, ``package.module:factory``, ``file.py:factory``, ``timm:NAME``,
``hf:PATH`` (a Hugging Face ``config.json``, or a directory holding one).

torch and torchvision are imported here only, and only when a model must be built. ``hf:`` reads local
files only: nothing is downloaded and no remote code is run.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from .cache import _checksum, read_cached, write_cached  # noqa: F401 - the cache's entries, re-exported
from .errors import ArchError, UsageError


def parse_arch_args(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["num_classes=10", "dropout=0.2"]`` -> ``{"num_classes": 10, "dropout": 0.2}``.

    Values are Python literals; anything that is not one is kept as a string.
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise UsageError(f"--arch-arg {item!r} is not NAME=VALUE")
        try:
            out[name.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name.strip()] = value
    return out


def build_model(
    spec: str,
    arch_args: dict[str, Any] | None = None,
    device: str = "cpu",
    fallback: str | None = None,
    deps: list[Dep] | None = None,
) -> Any:
    """Build the ``nn.Module`` a spec names, with random weights (never downloads any).

    Args:
        spec: ``"vgg16"`` (torchvision), ``"pkg.module:factory"``, ``"path/to/file.py:factory"``,
            ``"timm:NAME"`` or ``"hf:path/to/config.json"`` (or ``"hf:DIR"`` holding one).
        arch_args: keyword arguments for the factory (for ``hf:``, config fields that replace the file's).
        device: ``"meta"`` builds without allocating memory.
        fallback: the device to build on when building on ``device`` fails (user code that calls
            ``torch.from_numpy``, ``torch.Tensor(list)`` or ``.item()`` cannot run on the meta device).
        deps: when given, receives the source files the build imported from outside the stdlib and site-packages.

    Whatever the factory prints goes to stderr: stdout is the report's.
    """
    from .torch_extra import require_torch

    require_torch(f"--arch {spec}: building the model", torchvision=":" not in spec)
    if spec.startswith(HF_PREFIX):
        _require_transformers(spec)
    import torch

    args = dict(arch_args or {})
    with contextlib.redirect_stdout(sys.stderr), _user_imports(spec, deps):
        factory = resolve_factory(spec, args)
        try:
            with torch.device(device):
                model = factory(**args)
        except ArchError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code can raise anything
            # never for hf: a large language model built for real on the CPU could exhaust the memory
            if fallback is not None and fallback != device and not spec.startswith(HF_PREFIX):
                return build_model(spec, arch_args, fallback, deps=deps)
            if isinstance(exc, TypeError):
                raise ArchError(f"--arch {spec}: cannot build it with {args} ({exc})") from None
            raise ArchError(f"--arch {spec}: building it failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ArchError(f"--arch {spec}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


@dataclass(frozen=True)
class Dep:
    """A user source file a build imported: its module name, absolute path and content at build time."""

    module: str
    path: str
    size: int
    mtime_ns: int
    sha256: str


def _installed_roots() -> tuple[str, ...]:
    """The interpreter's stdlib and site-packages: what the installed versions in a key already cover
    (with any other ``site-packages`` a ``.pth`` file put on ``sys.path``)."""
    paths = sysconfig.get_paths()
    dirs = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    dirs += [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")]
    roots = {os.path.realpath(d) for d in dirs}
    return tuple(sorted(r.rstrip(os.sep) + os.sep for r in roots))


def _is_user_code(spec: str) -> bool:
    return ":" in spec and not spec.startswith(("timm:", HF_PREFIX))


def _fingerprint(module: str, path: str) -> Dep | None:
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None
    return Dep(module, path, st.st_size, st.st_mtime_ns, digest)


@contextlib.contextmanager
def _user_imports(spec: str, deps: list[Dep] | None) -> Iterator[None]:
    """Import user code the way ``python FILE.py`` sees its siblings, and record what it imported.

    A ``file.py:factory`` build has the file's directory first on ``sys.path`` (restored afterwards).
    Modules the build imported from outside the stdlib and site-packages are appended to ``deps`` and
    then dropped from ``sys.modules``, so the next build (another file's ``models`` package, or an edited
    sibling) imports them afresh from what is on disk, and records them again.
    """
    if not _is_user_code(spec):
        yield
        return
    source = spec.rpartition(":")[0]
    before = set(sys.modules)
    saved_path = list(sys.path)
    if source.endswith(".py"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(source)))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        roots = _installed_roots()
        for name in [n for n in sys.modules if n not in before]:
            file = getattr(sys.modules[name], "__file__", None)
            if not isinstance(file, str):
                continue  # builtins, namespace packages: nothing on disk to fingerprint
            path = os.path.abspath(file)
            if os.path.realpath(path).startswith(roots) or name.split(".")[0] == "ckpt_tool":
                continue  # covered by the versions in the key; ckpt's own modules stay (their classes are in use)
            del sys.modules[name]
            dep = _fingerprint(name, path)
            if deps is not None and dep is not None:
                deps.append(dep)


def _deps_current(spec: str, deps: tuple[Dep, ...]) -> bool:
    """Whether every recorded source file is unchanged and still what its module name resolves to.

    Cheap when nothing changed (one ``stat`` per file); a file whose size or mtime moved is re-hashed, so
    a ``touch`` alone keeps the entry. Never imports anything.
    """
    source = spec.rpartition(":")[0]
    search = [os.path.dirname(os.path.abspath(source))] if source.endswith(".py") else []
    search += sys.path
    for dep in deps:
        try:
            st = os.stat(dep.path)
        except OSError:
            return False
        if (st.st_size, st.st_mtime_ns) != (dep.size, dep.mtime_ns):
            now = _fingerprint(dep.module, dep.path)
            if now is None or now.sha256 != dep.sha256:
                return False
        if dep.path.endswith(".py") and _module_file(dep.module, search) != dep.path:
            return False  # shadowed by another file, or moved into a package
    return True


def resolve_factory(spec: str, args: dict[str, Any]) -> Any:
    if spec.startswith(HF_PREFIX):
        return _hf_factory(spec)
    if spec.startswith("timm:"):
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            raise ArchError(f"--arch {spec}: timm is not installed (pip install timm)") from None
        name = spec[len("timm:") :]
        args.setdefault("pretrained", False)
        return lambda **kw: timm.create_model(name, **kw)
    if ":" in spec:
        source, _, attr = spec.rpartition(":")
        if source.endswith(".py"):
            module = _load_file(source, spec)
        else:
            try:
                module = importlib.import_module(source)
            except ImportError as exc:
                raise ArchError(f"--arch {spec}: cannot import {source} ({exc})") from None
        factory = getattr(module, attr, None)
        if factory is None or not callable(factory):
            raise ArchError(f"--arch {spec}: {source} has no callable {attr!r}")
        return factory
    import torchvision

    names = set(torchvision.models.list_models())
    if spec not in names:
        near = difflib.get_close_matches(spec.lower(), sorted(names), n=6, cutoff=0.6)
        hint = f" (did you mean {', '.join(near)}?)" if near else " (see torchvision.models.list_models())"
        raise ArchError(f"--arch {spec}: not a torchvision model{hint}")
    args.setdefault("weights", None)
    return lambda **kw: torchvision.models.get_model(spec, **kw)


def _load_file(source: str, spec: str) -> Any:
    if not os.path.isfile(source):
        raise ArchError(f"--arch {spec}: no such file {source}")
    name = "_ckpt_user_arch_" + os.path.splitext(os.path.basename(source))[0]
    module_spec = importlib.util.spec_from_file_location(name, source)
    if module_spec is None or module_spec.loader is None:
        raise ArchError(f"--arch {spec}: cannot load {source}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code
        raise ArchError(f"--arch {spec}: importing {source} failed: {type(exc).__name__}: {exc}") from None
    return module


# --- hf:PATH: a Hugging Face config.json, built with transformers from local files only -------------

HF_PREFIX = "hf:"
HF_EXTRA = "ckpt-tool[hf]"


def hf_config_path(spec: str) -> str:
    """The ``config.json`` an ``hf:`` spec names: the file itself, or ``config.json`` in the directory."""
    path = spec[len(HF_PREFIX) :]
    if not path:
        raise ArchError(f"--arch {spec}: give a config.json or a directory holding one (hf:PATH)")
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ArchError(f"--arch {spec}: no such file {path} (hf: reads a local config.json; nothing is downloaded)")
    return path


def _require_transformers(spec: str) -> None:
    from .torch_extra import has

    if not has("transformers"):
        raise ArchError(f"--arch {spec}: needs transformers, which is not installed", hint=f"pip install '{HF_EXTRA}'")


def _hf_config(spec: str) -> dict[str, Any]:
    path = hf_config_path(spec)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArchError(f"--arch {spec}: {path} is not a JSON config ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ArchError(f'--arch {spec}: {path} has no "model_type": not a Hugging Face config.json')
    return raw


def _hf_factory(spec: str) -> Any:
    """A factory that builds the config's model class from the file (arguments override its fields).

    Only classes transformers itself defines are built: a config that needs remote code (``auto_map``
    with an unknown ``model_type``) is refused, since ckpt never runs code a file names.
    """
    raw = _hf_config(spec)
    # no network, whatever the environment says: the hub client reads this when transformers imports it
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        transformers = importlib.import_module("transformers")
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError as exc:
        raise ArchError(
            f"--arch {spec}: importing transformers failed ({exc})", hint=f"pip install '{HF_EXTRA}'"
        ) from None
    transformers.logging.set_verbosity_error()  # config warnings are not ours to report
    model_type = raw["model_type"]
    if model_type not in CONFIG_MAPPING:
        why = (
            "its model is remote code (auto_map), which ckpt never runs"
            if "auto_map" in raw
            else f"transformers {transformers.__version__} does not know this model type"
        )
        raise ArchError(f"--arch {spec}: model_type {model_type!r}: {why}")
    names = [n for n in raw.get("architectures") or [] if isinstance(n, str)]
    cls: Any
    if names:
        cls = getattr(transformers, names[0], None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ArchError(
                f"--arch {spec}: architectures[0] {names[0]!r} is not a transformers model class "
                f"(transformers {transformers.__version__})"
            )
    else:  # no class named: the base model of the type, as AutoModel picks it
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        try:
            cls = MODEL_MAPPING[CONFIG_MAPPING[model_type]]
        except KeyError:
            raise ArchError(
                f"--arch {spec}: model_type {model_type!r} has no base model class; "
                'name one in the config\'s "architectures"'
            ) from None

    def build(**overrides: Any) -> Any:
        fields = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures")}
        config = CONFIG_MAPPING[model_type].from_dict({**fields, **overrides})
        # eager attention needs no kernel lookup; the config's dtype is kept, as from_pretrained keeps it
        return cls._from_config(config, attn_implementation="eager")

    return build


# --- target signatures: key -> (shape, dtype) of a model's state dict, cached on disk ----------------------

# 2: tie groups and _extra_state keys are part of a signature
SIGNATURE_SCHEMA = 2


@dataclass(frozen=True, slots=True)  # slots: a checkpoint as a target holds one per tensor
class TargetTensor:
    """One entry of a model's ``state_dict()``: what ``load_state_dict`` will expect under its key."""

    shape: tuple[int, ...]
    dtype: str
    kind: str  # "parameter" or "buffer"


@dataclass(frozen=True)
class TargetSignature:
    """The state-dict layout of an architecture, built on the meta device or read from the cache.

    ``auto_filled`` lists keys torch fills in itself when a state dict without version metadata
    lacks them (BatchNorm's ``num_batches_tracked``). ``cache`` says where the table came from:
    ``hit``, ``built`` (and stored), ``rebuilt`` (a stale or corrupt entry was replaced), ``off``
    (``use_cache=False``), ``uncacheable`` (user code whose source file cannot be fingerprinted) or
    ``unwritable`` (built, but the cache directory cannot be written).

    ``ties`` lists the groups of keys that name one tensor on the built model (GPT-2's
    ``transformer.wte.weight`` and ``lm_head.weight``): loading one member sets them all.
    ``extra_state`` lists the ``_extra_state`` keys of modules that define ``set_extra_state``:
    a strict load requires them, whatever they hold.
    ``deps`` lists the user source files the build imported beyond the factory's own file (siblings,
    local packages): a cached entry is used only while each is unchanged.
    """

    spec: str
    arch_args: dict[str, Any]
    tensors: dict[str, TargetTensor]
    auto_filled: tuple[str, ...] = ()
    cache: str = "off"
    ties: tuple[tuple[str, ...], ...] = ()
    extra_state: tuple[str, ...] = ()
    deps: tuple[Dep, ...] = ()

    def partners(self) -> dict[str, tuple[str, ...]]:
        """Key -> the other keys of its tie group (keys without a tie are left out)."""
        return {k: tuple(o for o in group if o != k) for group in self.ties for k in group}


def signature_of(model: Any) -> tuple[dict[str, TargetTensor], tuple[str, ...]]:
    """The state-dict layout of an ``nn.Module`` (works on meta tensors: no values are touched)."""
    import torch

    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tensors = {
        key: TargetTensor(
            tuple(int(d) for d in value.shape),
            str(value.dtype).removeprefix("torch."),
            "parameter" if key in params else "buffer",
        )
        for key, value in model.state_dict().items()
        if isinstance(value, torch.Tensor)
    }
    norm_base = torch.nn.modules.batchnorm._NormBase
    auto = tuple(
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, module in model.named_modules()
        if isinstance(module, norm_base) and module.track_running_stats
    )
    return tensors, tuple(k for k in auto if k in tensors)


def ties_of(model: Any) -> tuple[tuple[str, ...], ...]:
    """Groups of state-dict keys that are one tensor on ``model`` (tied weights), in state-dict order.

    Works on meta tensors: members are told by identity of the parameter or buffer object, which is
    what tying (``lm_head.weight = wte.weight``) shares.
    """
    groups: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if hasattr(value, "shape"):
            groups.setdefault(id(value), []).append(key)
    return tuple(tuple(keys) for keys in groups.values() if len(keys) > 1)


def extra_state_of(model: Any) -> tuple[str, ...]:
    """The ``_extra_state`` keys ``model.load_state_dict(strict=True)`` requires (modules with ``set_extra_state``)."""
    import torch

    base = torch.nn.Module.set_extra_state
    return tuple(
        f"{name}._extra_state" if name else "_extra_state"
        for name, module in model.named_modules()
        if getattr(type(module), "set_extra_state", base) is not base
    )


def signature_from_model(model: Any, spec: str = "model", arch_args: dict[str, Any] | None = None) -> TargetSignature:
    """The full :class:`TargetSignature` of a built model (tensors, torch's fill-ins, ties, extra state)."""
    tensors, auto = signature_of(model)
    return TargetSignature(spec, dict(arch_args or {}), tensors, auto, "off", ties_of(model), extra_state_of(model))


def target_signature(
    spec: str, arch_args: dict[str, Any] | None = None, *, use_cache: bool = True, cache_dir: str | None = None
) -> TargetSignature:
    """The key/shape/dtype table of ``spec``'s model, from the cache when a valid entry exists.

    A cache hit imports neither torch nor torchvision. Entries are keyed by the spec, its
    arguments, the torch/torchvision (and timm) versions and, for user code, the source file's
    sha256; an entry that does not match its key or its checksum is rebuilt, never trusted. For user
    code the entry also lists the local source files the build imported (``deps``); one that changed,
    went missing or is no longer what its module name resolves to makes the entry stale (rebuilt).

    Example:
        >>> sig = target_signature("resnet18", {"num_classes": 10})
        >>> sig.tensors["fc.weight"].shape
        (10, 512)
    """
    args = dict(arch_args or {})
    from .arch_table import lookup  # torchvision's classification models, shipped: no torch import

    shipped = lookup(spec, args) if use_cache else None  # use_cache=False: build afresh, whatever is stored
    if shipped is not None:  # cache "table": from ckpt's shipped signatures
        return TargetSignature(spec, args, shipped.tensors, shipped.auto_filled, "table")
    key = _cache_key(spec, args) if use_cache else None
    path = os.path.join(cache_dir or default_cache_dir(), _entry_name(key)) if key is not None else None
    status = "off" if not use_cache else "uncacheable"
    if path is not None and key is not None:
        cached, status = _read_entry(path, key)
        if cached is not None and not _deps_current(spec, cached.deps):
            cached, status = None, "corrupt"  # a file it imported changed: stale, rebuilt
        if cached is not None:
            return replace(cached, spec=spec, arch_args=args, cache="hit")
    deps: list[Dep] = []
    model = build_model(spec, args, device="meta", fallback="cpu", deps=deps)
    sig = replace(signature_from_model(model, spec, args), deps=tuple(deps))
    if path is not None and key is not None:
        status = "rebuilt" if status == "corrupt" else "built"
        if not _write_entry(path, key, sig):
            status = "unwritable"
    return replace(sig, cache=status)


def default_cache_dir() -> str:
    """``signatures/`` in the cache root (:func:`ckpt_tool.cache.cache_root`)."""
    from .cache import cache_root

    return os.path.join(cache_root(), "signatures")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cache_key(spec: str, args: dict[str, Any]) -> dict[str, Any] | None:
    """What a cached signature depends on, or ``None`` when user code cannot be fingerprinted."""
    key: dict[str, Any] = {
        "schema": SIGNATURE_SCHEMA,
        "spec": spec,
        "args": repr(sorted(args.items())),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
    }
    if spec.startswith("timm:"):
        key["timm"] = _version("timm")
    elif spec.startswith(HF_PREFIX):
        path = hf_config_path(spec)
        key["spec"] = HF_PREFIX + os.path.abspath(path)
        key["transformers"] = _version("transformers")
        with open(path, "rb") as f:
            key["source_sha256"] = hashlib.sha256(f.read()).hexdigest()
    elif ":" in spec:
        source, _, attr = spec.rpartition(":")
        file = source if source.endswith(".py") else _module_file(source)
        if file is None or not os.path.isfile(file):
            return None
        key["spec"] = f"{os.path.abspath(file)}:{attr}" if source.endswith(".py") else spec
        with open(file, "rb") as f:
            key["source_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return key


def _module_file(dotted: str, search: list[str] | None = None) -> str | None:
    """The source file of ``pkg.module`` found on ``sys.path`` (or ``search``) without importing anything
    (which find_spec would); a package directory wins over a module of the same name, as in Python."""
    parts = dotted.split(".")
    for entry in sys.path if search is None else search:
        base = os.path.join(entry or os.getcwd(), *parts)
        for candidate in (os.path.join(base, "__init__.py"), base + ".py"):
            if os.path.isfile(candidate):
                return os.path.abspath(candidate)
    return None


def _entry_name(key: dict[str, Any] | None) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".json"


def _read_entry(path: str, key: dict[str, Any]) -> tuple[TargetSignature | None, str]:
    """``(signature, "hit")``, or ``(None, "missing" | "corrupt")``; a bad entry is reported, never used."""
    body, status = read_cached(path, key)
    if body is None:
        return None, status
    try:
        tensors = {
            str(k): TargetTensor(tuple(int(d) for d in shape), str(dtype), str(kind))
            for k, shape, dtype, kind in body["tensors"]
        }
        return TargetSignature(
            "",
            {},
            tensors,
            tuple(str(a) for a in body["auto_filled"]),
            "hit",
            tuple(tuple(str(k) for k in g) for g in body["ties"]),
            tuple(str(k) for k in body["extra_state"]),
            tuple(Dep(str(m), str(p), int(n), int(t), str(h)) for m, p, n, t, h in body.get("deps", [])),
        ), "hit"
    except (KeyError, TypeError, ValueError):
        return None, "corrupt"


def _write_entry(path: str, key: dict[str, Any], sig: TargetSignature) -> bool:
    body = {
        "tensors": [[k, list(t.shape), t.dtype, t.kind] for k, t in sig.tensors.items()],
        "auto_filled": list(sig.auto_filled),
        "ties": [list(g) for g in sig.ties],
        "extra_state": list(sig.extra_state),
        "deps": [[d.module, d.path, d.size, d.mtime_ns, d.sha256] for d in sig.deps],
    }
    return write_cached(path, key, body)


# --- the cache itself: other facts about an architecture (its shape flow) live beside its signature ----


def cache_slot(
    kind: str, spec: str, args: dict[str, Any], extra: dict[str, Any], deps: tuple[Dep, ...] = ()
) -> tuple[str, dict[str, Any]] | None:
    """``(path, key)`` of a cache entry of ``kind`` about ``spec(**args)``, or ``None`` for code that cannot be
    fingerprinted. ``extra`` is what else the entry depends on; the key holds every version a signature's does,
    and the contents of ``deps`` (a :class:`TargetSignature`'s, checked current when it was read), so the
    entry goes stale with the signature when a file the build imported changes."""
    key = _cache_key(spec, args)
    if key is None:
        return None
    key = {**key, "kind": kind, **extra}
    if deps:
        key["deps"] = sorted([d.path, d.sha256] for d in deps)
    return os.path.join(os.path.dirname(default_cache_dir()), kind, _entry_name(key)), key
