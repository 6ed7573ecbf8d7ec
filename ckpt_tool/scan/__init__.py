"""Static safety analysis of model files: every pickle stream is read, nothing is ever run.

A pickle is a program: loading one may import and call anything it names. ``scan`` walks every
pickle a loader would run (a torch zip's ``data.pkl`` and every other pickle in the archive, all
the pickles of the legacy format, plain pickles under any extension), records each global the
stream imports and each call it makes, and judges them against two tables below: ``ALLOWED``
(what torch's ``weights_only`` loader accepts plus a few inert data classes) and ``DENIED``
(known ways to run code). Anything else is ``suspicious``. safetensors files hold no code; they
are checked structurally instead.

torch is never imported here.
"""

import os
import re
from collections.abc import Iterable, Iterator

from ..bulk import paused
from ..config import ProjectConfig, config_allow, load_config
from ..errors import FormatError, InputError, UsageError
from ..formats import sniff as fmt
from ..formats.pickle_vm import PickleVM, Trace
from ..formats.safetensors import header_defects, headers_memoized
from ..formats.ziparchive import list_archive
from ..reader import parse_lfs_pointer
from .policy import (
    ALLOWED,
    BROKEN,
    DENIED_BUILTINS,
    DENIED_MODULES,
    SAFE,
    SEVERITY_ORDER,
    SKIPPED,
    SUSPICIOUS,
    TORCH_WEIGHTS_ONLY,
    TORCHSCRIPT_ALLOWED_PREFIXES,
    UNSAFE,
    Policy,
)
from .report import FileScan, Finding, ScanReport, _Streams
from .sarif import sarif
from .walkers import (
    _lenient_persistent_load,
    _scan_npy,
    _scan_pickle_file,
    _scan_safetensors,
    _scan_tar,
    _scan_zip,
    _walk_opcodes,
)

__all__ = [
    "ALLOWED",
    "BROKEN",
    "DENIED_BUILTINS",
    "DENIED_MODULES",
    "SAFE",
    "SEVERITY_ORDER",
    "SKIPPED",
    "SUSPICIOUS",
    "TORCHSCRIPT_ALLOWED_PREFIXES",
    "UNSAFE",
    "FileScan",
    "Finding",
    "Policy",
    "ScanReport",
    "iter_model_files",
    "policy_for",
    "sarif",
    "scan",
    "scan_file",
    "_walk_opcodes",
]

# files a directory walk always looks at; other files only when their content is a model format
MODEL_EXTENSIONS = (
    ".pt",
    ".pth",
    ".bin",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".joblib",
    ".dill",
    ".safetensors",
    ".model",
    ".mar",
    ".pth.tar",
)
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__"}


def _judge(out: _Streams, policy: Policy, torchscript: bool) -> tuple[list[Finding], list[str], list[str]]:
    findings = list(out.findings)
    names: set[str] = set()
    calls: dict[str, int] = {}
    seen: set[tuple[str, str, str]] = set()
    for stream, trace in out.traces:
        for event in trace.globals:
            names.add(event.name)
            severity, reason = policy.judge(event.name, event.resolved, torchscript, event.module or None)
            if severity != SAFE and (stream, event.name, severity) not in seen:
                seen.add((stream, event.name, severity))
                findings.append(Finding(severity, event.name, reason, stream, event.opcode, event.position))
        for event in trace.calls:
            label = f"{event.opcode} {event.name}"
            calls[label] = calls.get(label, 0) + 1
            if not event.resolved and event.opcode != "BUILD" and (stream, label, UNSAFE) not in seen:
                seen.add((stream, label, UNSAFE))
                findings.append(
                    Finding(
                        UNSAFE,
                        event.name,
                        "calls a value the stream computed (a chain such as getattr(...)(...)), not a named global",
                        stream,
                        event.opcode,
                        event.position,
                    )
                )
    return findings, sorted(names), [f"{label} x{n}" if n > 1 else label for label, n in sorted(calls.items())]


# how the note on a file torch's default load refuses begins (the CLI shows it for safe files too)
WEIGHTS_ONLY_NOTE = "torch.load(weights_only=True) refuses this file"


def _python3_name(name: str) -> str:
    """A global as torch's loader resolves it: Python 2 names (``__builtin__.set``) mapped as pickle maps them."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    module, attr = _compat_pickle.NAME_MAPPING.get(
        (module, attr), (_compat_pickle.IMPORT_MAPPING.get(module, module), attr)
    )
    return f"{module}.{attr}"


def _weights_only_note(names: Iterable[str]) -> list[str]:
    """What ``torch.load(weights_only=True)`` would refuse in a file ckpt may still call safe."""
    beyond = [n for n in names if _python3_name(n) not in TORCH_WEIGHTS_ONLY and not n.startswith("__torch__.")]
    if not beyond:
        return []
    return [
        f"{WEIGHTS_ONLY_NOTE}: it names {', '.join(beyond[:4])}"
        f"{f' and {len(beyond) - 4} more' if len(beyond) > 4 else ''}, which torch's weights-only loader "
        "does not allow by default (ckpt finds them inert); pass them to torch.serialization.add_safe_globals, "
        "or keep the state dict alone with `ckpt migrate FILE -o OUT.pth`"
    ]


def _verdict(findings: Iterable[Finding]) -> str:
    severities = {f.severity for f in findings}
    for severity in (UNSAFE, BROKEN, SUSPICIOUS):
        if severity in severities:
            return severity
    return SAFE


@paused
def scan_file(path: str, policy: Policy | None = None) -> FileScan:
    """Scan one file statically and judge it.

    Example:
        >>> scan_file("models/tiny_cnn.pth").verdict
        'safe'
    """
    policy = policy or Policy()
    try:
        size = os.path.getsize(path)
        kind = fmt.sniff(path)
    except (OSError, InputError) as exc:
        raise InputError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    out = _Streams()
    if size == 0:
        return FileScan(path, fmt.UNKNOWN, BROKEN, (Finding(BROKEN, "empty", "file is empty"),))
    if kind == fmt.LFS_POINTER:
        info = parse_lfs_pointer(path)
        note = (
            f"git-lfs pointer (oid {info.get('oid', '?')}, {info.get('size', '?')} bytes): the real file was "
            "not fetched, nothing to scan (run `git lfs pull`)"
        )
        return FileScan(path, kind, SKIPPED, notes=(note,))
    if kind == fmt.SHARDED:
        return FileScan(
            path,
            kind,
            SAFE,
            notes=(
                "a sharded set's JSON index holds no code; its shards are scanned "
                "as files (scan the directory, or `ckpt validate` the index)",
            ),
        )
    if kind in (fmt.ZIP, fmt.TORCHSCRIPT):
        _scan_zip(path, out)
    elif kind == fmt.DCP_SHARD:
        from .dcp import scan_distcp

        scan_distcp(path, out)
    elif kind == fmt.SAFETENSORS:
        _scan_safetensors(path, out)
    elif kind == fmt.LEGACY_TAR:
        _scan_tar(path, out)
    elif kind == fmt.NPY:
        _scan_npy(path, size, out)
    else:
        # legacy, pickle and anything unrecognised: torch.load would unpickle it, so we read it as one
        _scan_pickle_file(path, size, out, kind)
    findings, names, calls = _judge(out, policy, torchscript=kind == fmt.TORCHSCRIPT)
    if kind in (fmt.ZIP, fmt.LEGACY, fmt.LEGACY_TAR, fmt.PICKLE) and _verdict(findings) == SAFE:
        out.notes.extend(_weights_only_note(names))
    order = {s: i for i, s in enumerate(SEVERITY_ORDER)}
    findings.sort(key=lambda f: (order[f.severity], f.stream, f.position if f.position is not None else -1, f.name))
    return FileScan(
        path=path,
        format=out.format or kind,
        verdict=_verdict(findings),
        findings=tuple(findings),
        globals=tuple(names),
        calls=tuple(calls),
        streams=tuple(name for name, _ in out.traces),
        notes=tuple(out.notes),
    )


def iter_model_files(paths: Iterable[str], indexes: bool = False) -> Iterator[str]:
    """Expand directories recursively into the model files they hold; files given are kept as they are.

    In a directory every file is sniffed by its content, whatever its name: a file is a model file
    when a loader would read it as one (a torch zip or TorchScript archive, safetensors, npy, a tar
    in torch's old layout, or a pickle, with or without a PROTO opcode). ``indexes`` adds sharded
    sets' ``*.index.json`` files.
    """
    for path in paths:
        if not os.path.exists(path):
            raise InputError(f"{path}: no such file or directory")
        if not os.path.isdir(path):
            yield path
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            for name in sorted(files):
                full = os.path.join(root, name)
                if not os.path.isfile(full):
                    continue
                if (
                    name.lower().endswith(MODEL_EXTENSIONS)
                    or (indexes and name.endswith(".index.json"))
                    or _looks_like_model(full)
                ):
                    yield full


_NAME = re.compile(r"[A-Za-z_][\w.]*")


def _looks_like_model(path: str) -> bool:
    if os.path.basename(path) == ".metadata" and fmt.sniff(os.path.dirname(path)) == fmt.DCP:
        return True  # a DCP directory's metadata pickle: dcp.load unpickles it, broken or not
    try:
        kind = fmt.sniff(path)
    except InputError:
        return False
    if kind == fmt.DCP_SHARD:
        return True  # one shard of a torch.distributed.checkpoint directory: its items hold pickles
    if kind in (fmt.ZIP, fmt.TORCHSCRIPT):
        try:
            listing = list_archive(path)
        except (FormatError, InputError):
            return False
        return any(
            e.name.lower().endswith((".pkl", ".debug_pkl", ".pickle", ".npy"))
            for e in (*listing.entries, *listing.others)
        )
    if kind == fmt.SAFETENSORS and header_defects(path)[0] is not None:
        return True
    if kind == fmt.NPY:
        return True
    if kind == fmt.LEGACY_TAR:
        import tarfile

        try:
            with tarfile.open(path) as tf:
                return bool({"pickle", "storages"} & set(tf.getnames()))
        except (tarfile.TarError, OSError, EOFError, ValueError):
            return False
    if kind in (fmt.LEGACY, fmt.PICKLE, fmt.SAFETENSORS) or (
        kind == fmt.UNKNOWN and _first_byte(path) in fmt.PICKLE_OPCODES
    ):
        # a clean parse is a pickle; so is a stream that names a real global before it breaks, as
        # pickle.load imports (and may call) it before it reaches the break. Text files that merely
        # open with a pickle opcode ("cats are nice") name nothing importable.
        trace = Trace()
        try:
            with open(path, "rb") as f:
                PickleVM(_lenient_persistent_load(), trace).load(f, os.path.getsize(path))
            return True
        except (FormatError, OSError):
            return any(_NAME.fullmatch(e.name) and e.module and _NAME.fullmatch(e.module) for e in trace.globals)
    return False


def _first_byte(path: str) -> int:
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError:
        return -1
    return head[0] if head else -1


def scan(paths: Iterable[str], allow: Iterable[str] = (), config_dir: str | None = None) -> ScanReport:
    """Scan files and directories; ``allow`` adds names to the allow list on top of ``[tool.ckpt] allow``.

    Args:
        paths: files or directories (walked recursively).
        allow: extra allowed globals, exact (``mypkg.Net``) or by module (``mypkg.*``).
        config_dir: where to look for ``pyproject.toml`` (default: the current directory and its parents).
    """
    policy = policy_for(load_config(config_dir), allow)
    with headers_memoized():  # a shard's header is asked for by the walk, its own scan and its index's
        files = tuple(scan_file(p, policy) for p in iter_model_files(list(paths)))
    return ScanReport(files, policy.extra_allowed)


def policy_for(config: ProjectConfig, allow: Iterable[str] = ()) -> Policy:
    """The project's policy: ``[tool.ckpt] allow`` plus ``--allow`` names, each checked."""
    extra = tuple(dict.fromkeys([*config_allow(config), *allow]))
    for name in extra:
        if not name or " " in name or "." not in name:
            raise UsageError(f"--allow {name!r} is not a dotted name such as mypkg.models.Net or mypkg.*")
    return Policy(extra)
