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

from __future__ import annotations

import _compat_pickle
import io
import os
import struct
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import FormatError, InputError, UsageError
from .formats import sniff as fmt
from .formats.pickle_vm import Event, PickleVM, Placeholder, StorageRef, Trace, storage_dtype
from .formats.safetensors import header_defects
from .model import itemsize
from .reader import parse_lfs_pointer

SAFE, UNSAFE, SUSPICIOUS, BROKEN, SKIPPED = "safe", "unsafe", "suspicious", "broken", "skipped"
# worst first: a file's verdict is the worst of its findings
SEVERITY_ORDER = (UNSAFE, BROKEN, SUSPICIOUS, SAFE, SKIPPED)

# files a directory walk always looks at; other files only when their content is a model format
MODEL_EXTENSIONS = (
    ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".joblib", ".dill", ".safetensors", ".model", ".mar",
    ".pth.tar",
)
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__"}
FALLBACK_WINDOW = 64 * 1024 * 1024  # bytes of a broken pickle region walked opcode by opcode
MAX_ENTRY = 1 << 30

# ---------------------------------------------------------------------------------------------
# The allow list: torch's weights_only set (torch/_weights_only_unpickler.py, _get_allowed_globals)
# plus inert data classes real checkpoints carry. Each entry says why building it cannot run code.
# ---------------------------------------------------------------------------------------------
_TORCH_REBUILD = "torch's weights_only loader allows it: rebuilds a tensor from a storage and sizes"
_TORCH_VALUE = "torch's weights_only loader allows it: a plain value type"
_STORAGE = "torch's weights_only loader allows it: a storage type named in a persistent id (no call)"
_DTYPE = "torch's weights_only loader allows it: a dtype or quantization scheme constant"

ALLOWED: dict[str, str] = {
    "collections.OrderedDict": _TORCH_VALUE + " (the state dict container)",
    "collections.Counter": _TORCH_VALUE,
    "builtins.set": _TORCH_VALUE,
    "builtins.frozenset": "an immutable set of values already in the stream",
    "builtins.bytearray": _TORCH_VALUE,
    "builtins.complex": _TORCH_VALUE,
    "builtins.bytes": "bytes from values already in the stream",
    "builtins.slice": "a slice of plain numbers",
    "builtins.range": "a range of plain numbers",
    "builtins.int": "a plain value constructor",
    "builtins.float": "a plain value constructor",
    "builtins.str": "a plain value constructor",
    "builtins.bool": "a plain value constructor",
    "builtins.tuple": "a plain value constructor",
    "builtins.list": "a plain value constructor",
    "builtins.dict": "a plain value constructor",
    "builtins.object": "base class named by copyreg._reconstructor; object.__new__ runs no user code",
    "_codecs.encode": _TORCH_VALUE + " (how protocol 2 pickles bytes)",
    "torch.Size": _TORCH_VALUE,
    "torch.device": _TORCH_VALUE,
    "torch.Tensor": _TORCH_VALUE,
    "torch.nn.parameter.Parameter": _TORCH_REBUILD,
    "torch.serialization._get_layout": _TORCH_VALUE + " (looks a layout up by name)",
    "torch._tensor._rebuild_from_type_v2": _TORCH_REBUILD + " (tensor subclasses; the subclass is judged too)",
    "torch.storage.TypedStorage": _STORAGE,
    "torch.storage.UntypedStorage": _STORAGE,
    "copyreg._reconstructor": "builds an instance of a class named separately in the stream (judged on its own)",
    "copyreg.__newobj__": "NEWOBJ for old protocols: cls.__new__ of a class named separately (judged on its own)",
    # inert data classes that are not in torch's set but ride along in real checkpoints
    "argparse.Namespace": "training hyper-parameters; an attribute bag whose __init__ only sets attributes",
    "pytorch_lightning.utilities.parsing.AttributeDict": "Lightning hyper-parameters: a dict subclass, no code",
    "lightning.pytorch.utilities.parsing.AttributeDict": "Lightning hyper-parameters: a dict subclass, no code",
    "lightning.fabric.utilities.data.AttributeDict": "Lightning hyper-parameters: a dict subclass, no code",
    "lightning_fabric.utilities.data.AttributeDict": "Lightning hyper-parameters: a dict subclass, no code",
    "numpy.core.multiarray._reconstruct": "rebuilds a numpy array from its shape, dtype and bytes",
    "numpy._core.multiarray._reconstruct": "rebuilds a numpy array from its shape, dtype and bytes",
    "numpy.core.multiarray.scalar": "rebuilds a numpy scalar from its dtype and bytes",
    "numpy._core.multiarray.scalar": "rebuilds a numpy scalar from its dtype and bytes",
    "numpy.core.numeric._frombuffer": "rebuilds a numpy array from bytes (pickle protocol 5)",
    "numpy._core.numeric._frombuffer": "rebuilds a numpy array from bytes (pickle protocol 5)",
    "numpy.ndarray": "the numpy array type named by _reconstruct",
    "numpy.dtype": "a numpy dtype built from its type string",
    "collections.defaultdict": "a dict; its factory is named separately in the stream and judged on its own",
    "datetime.datetime": "a timestamp value",
    "datetime.date": "a date value",
    "datetime.timedelta": "a duration value",
    "datetime.timezone": "a time zone value",
    "torch.torch_version.TorchVersion": "a version string (str subclass)",
    "pathlib.PosixPath": "a path value; building it touches no file",
    "pathlib.WindowsPath": "a path value; building it touches no file",
    "pathlib.PurePosixPath": "a path value; building it touches no file",
    "pathlib.PureWindowsPath": "a path value; building it touches no file",
    "pathlib.Path": "a path value; building it touches no file",
}
for _name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
              "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
              "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
              "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor"):
    ALLOWED[f"torch._utils.{_name}"] = _TORCH_REBUILD
for _prefix in ("torch", "torch.cuda"):
    for _kind in ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
                  "ComplexDouble", "ComplexFloat"):
        ALLOWED[f"{_prefix}.{_kind}Storage"] = _STORAGE
        if not _kind.startswith("Complex"):
            ALLOWED[f"{_prefix}.{_kind}Tensor"] = _TORCH_VALUE + " (legacy tensor type)"
for _kind in ("QInt8", "QUInt8", "QInt32", "QUInt4x2", "QUInt2x4"):
    ALLOWED[f"torch.{_kind}Storage"] = _STORAGE
for _dtype in ("float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32", "bcomplex32",
               "bool", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "qint8", "quint8",
               "qint32", "quint4x2", "quint2x4", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
               "float8_e8m0fnu", "float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
               "per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
               "per_channel_affine_float_qparams", *(f"int{i}" for i in range(1, 8)), *(f"uint{i}" for i in range(1, 8))):
    ALLOWED[f"torch.{_dtype}"] = _DTYPE

# TorchScript archives name their compiled classes as __torch__.*; torch.jit.load resolves them in the
# archive's own compilation unit (TorchScript code, no Python import), so they are trusted there only.
TORCHSCRIPT_ALLOWED_PREFIXES = {
    "__torch__.": "a TorchScript class compiled from the archive's code/ (resolved by torch.jit, not imported)",
    "torch.jit._pickle.": "TorchScript's list/tensor rebuild helpers (build_intlist, restore_type_tag, ...)",
}

# ---------------------------------------------------------------------------------------------
# The deny list: modules and names that give a pickle a way to run code, touch files or the
# network, or reach other code. Module entries cover their submodules.
# ---------------------------------------------------------------------------------------------
_RUNS = "runs shell commands or programs"
_CODE = "evaluates or compiles Python code"
_IMPORTS = "imports arbitrary modules"
_LOADS = "unpickles nested data, hiding a second payload from the scanner"
_FILES = "reads, writes or deletes files"
_NET = "opens network connections or fetches remote content"

DENIED_MODULES: dict[str, str] = {
    "os": _RUNS + " (os.system, os.exec*, os.popen) and " + _FILES,
    "posix": _RUNS + " (the C module behind os)",
    "nt": _RUNS + " (the C module behind os on Windows)",
    "posixpath": "part of os; never needed to rebuild data",
    "subprocess": _RUNS,
    "_posixsubprocess": _RUNS,
    "_winapi": _RUNS,
    "pty": _RUNS + " (pty.spawn)",
    "commands": _RUNS + " (Python 2)",
    "popen2": _RUNS + " (Python 2)",
    "platform": _RUNS + " (platform.popen)",
    "sys": "reaches the interpreter: modules, hooks, exit",
    "runpy": _CODE + " (runs a module or a file as __main__)",
    "code": _CODE + " (interactive interpreter)",
    "codeop": _CODE,
    "types": _CODE + " (builds functions from code objects)",
    "timeit": _CODE + " (timeit executes code strings)",
    "cProfile": _CODE + " (run executes code strings)",
    "profile": _CODE + " (run executes code strings)",
    "pdb": _CODE + " (pdb.run)",
    "bdb": _CODE,
    "trace": _CODE,
    "doctest": _CODE,
    "pydoc": _IMPORTS + " (pydoc.locate) and " + _RUNS + " (pydoc.pipepager)",
    "importlib": _IMPORTS,
    "imp": _IMPORTS,
    "pkgutil": _IMPORTS,
    "zipimport": _IMPORTS,
    "ctypes": "calls native code",
    "_ctypes": "calls native code",
    "cffi": "calls native code",
    "pickle": _LOADS,
    "_pickle": _LOADS,
    "cPickle": _LOADS,
    "dill": _LOADS + "; dill also rebuilds code objects",
    "cloudpickle": _LOADS + "; cloudpickle also rebuilds functions",
    "marshal": _LOADS + " (marshal.loads builds code objects)",
    "shelve": _LOADS,
    "joblib": _LOADS + " (joblib.load)",
    "yaml": _CODE + " (yaml.load with the unsafe loader)",
    "jsonpickle": _LOADS,
    "shutil": _FILES,
    "tempfile": _FILES,
    "io": _FILES + " (io.open)",
    "_io": _FILES,
    "fileinput": _FILES,
    "glob": "lists the file system",
    "tarfile": _FILES + " (extraction writes anywhere)",
    "zipfile": _FILES,
    "gzip": _FILES,
    "bz2": _FILES,
    "lzma": _FILES,
    "mmap": _FILES,
    "fcntl": _FILES,
    "socket": _NET,
    "_socket": _NET,
    "ssl": _NET,
    "http": _NET,
    "urllib": _NET,
    "urllib2": _NET,
    "requests": _NET,
    "httpx": _NET,
    "aiohttp": _NET,
    "ftplib": _NET,
    "smtplib": _NET,
    "telnetlib": _NET,
    "xmlrpc": _NET,
    "webbrowser": "opens URLs in a browser (and runs the browser command)",
    "pip": "installs packages (and runs their setup code)",
    "setuptools": "installs or builds packages (runs setup code)",
    "distutils": "builds packages (runs compilers)",
    "ensurepip": "installs packages",
    "venv": "creates environments and runs pip",
    "multiprocessing": _RUNS + " (starts processes running any callable)",
    "concurrent": "runs callables in threads or processes",
    "threading": "runs callables in threads",
    "_thread": "runs callables in threads",
    "asyncio": _RUNS + " (create_subprocess_shell)",
    "signal": "installs signal handlers",
    "operator": "attrgetter/methodcaller reach and call any attribute",
    "_operator": "attrgetter/methodcaller reach and call any attribute",
    "functools": "partial/reduce call any callable",
    "_functools": "partial/reduce call any callable",
    "itertools": "starmap and friends call any callable",
    "inspect": "reaches frames, globals and code",
    "gc": "reaches every live object (get_referrers)",
    "logging.config": _CODE + " (logging.config.listen / fileConfig evaluate text)",
    "uuid._get_command_stdout": _RUNS,
    "numpy.testing": _CODE + " (numpy.testing._private.utils.runstring executes code)",
    "numpy.f2py": "compiles and imports native code",
    "numpy.distutils": "builds native code",
    "numpy.ctypeslib": "loads native libraries",
    "numpy.load": _LOADS + " (numpy.load with allow_pickle)",
    "numpy.lib.npyio": _LOADS + " and " + _FILES,
    "numpy.fromfile": _FILES,
    "numpy.memmap": _FILES,
    "torch.load": _LOADS + " (torch.load of another file, possibly with weights_only=False)",
    "torch.serialization.load": _LOADS,
    "torch.hub": _NET + " and runs the downloaded code (torch.hub.load)",
    "torch.jit.load": "loads another model file",
    "torch.utils.cpp_extension": "compiles and loads native code",
    "torch.package": _IMPORTS + " (imports code packaged in an archive)",
    "torch.ops": "calls any registered native operator",
    "torch._C": "reaches torch's native internals",
    "torch.distributed": _NET + " (rpc runs remote calls)",
    "torch.save": _FILES,
    "torch.serialization.save": _FILES,
    "torch._dynamo": _CODE,
    "torch.fx": _CODE + " (GraphModule recompiles Python source)",
    "torch.library": "registers operators from Python callables",
    "IPython": _CODE,
    "idlelib": _CODE,
    "tkinter": "opens windows and runs Tcl code",
    "_tkinter": "runs Tcl code",
}

# builtins: the value constructors in ALLOWED are fine; every other builtin is a tool for running or
# reaching code (eval, exec, compile, getattr, __import__, open, ...), so builtins are denied by default.
DENIED_BUILTINS: dict[str, str] = {
    "eval": _CODE, "exec": _CODE, "compile": _CODE, "execfile": _CODE, "input": "reads stdin and, in Python 2, evals",
    "__import__": _IMPORTS, "getattr": "reaches any attribute (getattr(__import__('os'), 'system'))",
    "setattr": "changes any attribute", "delattr": "changes any attribute", "globals": "reaches module globals",
    "locals": "reaches frame locals", "vars": "reaches __dict__", "open": _FILES, "file": _FILES + " (Python 2)",
    "apply": "calls any callable (Python 2)", "breakpoint": "starts a debugger", "exit": "stops the interpreter",
    "quit": "stops the interpreter", "help": "starts a pager", "map": "calls a callable over values",
    "filter": "calls a callable over values", "iter": "iter(callable, sentinel) calls it", "next": "drives calls",
    "type": "creates classes", "super": "reaches parent methods", "memoryview": "raw memory access",
}
_BUILTINS_OTHER = "a builtin other than an inert value constructor: a tool for calling or reaching code"

# Python 2 names that pickle.load still maps to Python 3 ones (_compat_pickle: protocols 0-2), so
# "__builtin__.eval" is judged as "builtins.eval" and "commands.getoutput" as "subprocess.getoutput"
_NAME_ALIASES = {f"{m}.{n}": f"{m3}.{n3}" for (m, n), (m3, n3) in _compat_pickle.NAME_MAPPING.items()}
_MODULE_ALIASES = dict(_compat_pickle.IMPORT_MAPPING, exceptions="builtins")

_TAR_MEMBERS = ("sys_info", "pickle", "storages", "tensors")


@dataclass(frozen=True)
class Policy:
    """What counts as safe: the built-in tables plus a project's own allowed names.

    ``extra_allowed`` holds exact names (``mypkg.models.Net``) or module patterns (``mypkg.*``).
    Denied names stay denied whatever is allowed, as torch's loader does for os and sys.
    """

    extra_allowed: tuple[str, ...] = ()

    def judge(self, name: str, resolved: bool = True, torchscript: bool = False) -> tuple[str, str]:
        """Return ``(severity, reason)`` for a global the stream names.

        Example:
            >>> Policy().judge("os.system")[0]
            'unsafe'
        """
        if not resolved:
            return UNSAFE, "the name is computed at load time and cannot be resolved statically"
        qual = _canonical(name)
        module, _, attr = qual.rpartition(".")
        reason = _denied(qual, module, attr)
        if reason:
            return UNSAFE, reason
        if qual in ALLOWED:
            return SAFE, ALLOWED[qual]
        if torchscript:
            for prefix, why in TORCHSCRIPT_ALLOWED_PREFIXES.items():
                if qual.startswith(prefix):
                    return SAFE, why
        for pattern in self.extra_allowed:
            if qual == pattern or (pattern.endswith(".*") and qual.startswith(pattern[:-1])):
                return SAFE, f"allowed by the project ({pattern})"
        if module in ALLOWED:
            return UNSAFE, f"an attribute of the allowed class {module}: methods can write files or call code"
        return SUSPICIOUS, "not on the allow list (unknown classes are not trusted; --allow NAME trusts one)"


def _canonical(name: str) -> str:
    if name in _NAME_ALIASES:
        return _NAME_ALIASES[name]
    for module in _prefixes(name):
        if module in _MODULE_ALIASES and module != name:
            return _MODULE_ALIASES[module] + name[len(module):]
    return name


def _denied(qual: str, module: str, attr: str) -> str | None:
    if qual in ALLOWED:
        return None
    if module == "builtins":
        return DENIED_BUILTINS.get(attr, _BUILTINS_OTHER)
    if any(p.startswith("__") and p.endswith("__") for p in qual.split(".")[1:]):
        return "reaches a dunder attribute (__globals__, __subclasses__, __builtins__): a classic sandbox escape"
    for key in _prefixes(qual):
        if key in DENIED_MODULES:
            return DENIED_MODULES[key]
    return None


def _prefixes(qual: str) -> Iterator[str]:
    parts = qual.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


@dataclass(frozen=True)
class Finding:
    """One reason a file is not safe: a global or call, or a defect in the file's structure."""

    severity: str
    name: str
    reason: str
    stream: str = ""
    opcode: str = ""
    position: int | None = None


@dataclass(frozen=True)
class FileScan:
    """The verdict on one file, with everything the scan saw."""

    path: str
    format: str
    verdict: str
    findings: tuple[Finding, ...] = ()
    globals: tuple[str, ...] = ()
    calls: tuple[str, ...] = ()
    streams: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScanReport:
    """Every file scanned; ``ok`` when each one is safe (or skipped, as a git-lfs pointer is)."""

    files: tuple[FileScan, ...]
    allowed: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(f.verdict in (SAFE, SKIPPED) for f in self.files)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            out[f.verdict] = out.get(f.verdict, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts(), "allowed": list(self.allowed), "files": list(self.files)}


# ---------------------------------------------------------------------------------------------
# Walking the pickles of each format
# ---------------------------------------------------------------------------------------------


@dataclass
class _Streams:
    """What one file's scan collects: a trace per pickle stream, plus structural findings."""

    traces: list[tuple[str, Trace]] = field(default_factory=list)
    format: str = ""
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def new(self, name: str) -> Trace:
        trace = Trace()
        self.traces.append((name, trace))
        return trace

    def broken(self, message: str, stream: str = "") -> None:
        self.findings.append(Finding(BROKEN, "unparseable", message, stream))


def _lenient_persistent_load(storages: dict[str, StorageRef] | None = None) -> Any:
    """A persistent-id resolver that never fails on a storage: scanning needs the names, not the bytes."""

    def load(pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            key = str(pid[2])
            try:
                dtype = storage_dtype(pid[1])
            except FormatError:
                dtype = "uint8"
            numel = pid[4] if isinstance(pid[4], int) and pid[4] >= 0 else 0
            ref = StorageRef(key, dtype, str(pid[3]), numel)
            if storages is not None:
                storages.setdefault(key, ref)
            return ref
        return Placeholder("<persistent id>", (pid,))

    return load


def _load_one(data: IO[bytes], limit: int, trace: Trace, persistent: Any = None) -> Any:
    return PickleVM(persistent or _lenient_persistent_load(), trace).load(data, limit)


def _scan_bytes(out: _Streams, name: str, data: bytes) -> None:
    """Scan one in-memory pickle stream (an archive entry); on a parse error, walk its opcodes."""
    trace = out.new(name)
    try:
        _load_one(io.BytesIO(data), len(data), trace)
    except FormatError as exc:
        out.broken(f"{name}: {exc}", name)
        _walk_opcodes(data, trace)


def _walk_opcodes(data: bytes, trace: Trace, base: int = 0) -> None:
    """Record every global in a region the interpreter could not finish, opcode by opcode.

    A stream that breaks our interpreter must not hide what comes after the break, so this walk
    keeps no stack: GLOBAL and INST name their globals outright; STACK_GLOBAL takes the two most
    recent strings (through the memo too), and counts as unresolved when there are none.
    """
    import pickletools

    strings: list[str] = []
    memo: dict[int, Any] = {}
    stream = io.BytesIO(data)
    last: Any = None
    while stream.tell() < len(data):
        try:
            for op, arg, pos in pickletools.genops(stream):
                at = base + (pos or 0)
                if op.name in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    trace.globals.append(Event(op.name, f"{module}.{name}", at))
                elif op.name == "STACK_GLOBAL":
                    if len(strings) >= 2:
                        trace.globals.append(Event(op.name, f"{strings[-2]}.{strings[-1]}", at))
                    else:
                        trace.globals.append(Event(op.name, "?.?", at, resolved=False))
                elif op.name in ("EXT1", "EXT2", "EXT4"):
                    trace.globals.append(Event(op.name, f"<extension>.{arg}", at, resolved=False))
                elif isinstance(arg, str) and op.name not in ("PUT", "BINPUT", "LONG_BINPUT", "GET"):
                    strings.append(arg)
                    last = arg
                    continue
                if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int):
                    memo[arg] = last
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = last
                elif op.name in ("GET", "BINGET", "LONG_BINGET") and isinstance(arg, int) \
                        and isinstance(memo.get(arg), str):
                    strings.append(memo[arg])
                last = None
        except ValueError:
            return  # the rest is not pickle data


def _scan_zip(path: str, out: _Streams) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        out.broken(f"corrupt zip archive ({exc})")
        return
    with zf:
        infos = zf.infolist()
        # torch.load unpickles data.pkl; torch.jit.load also constants.pkl and the .debug_pkl files
        pickles = [i for i in infos if i.filename.endswith((".pkl", ".debug_pkl"))]
        if not any(i.filename == "data.pkl" or i.filename.endswith("/data.pkl") for i in infos):
            out.broken("zip archive without data.pkl: not a torch checkpoint")
        # TorchScript's code/ holds TorchScript, which torch.jit compiles itself; Python source anywhere
        # else is what a torch.package archive imports (and runs) when it is loaded
        sources = [i.filename for i in infos if i.filename.endswith(".py") and "/code/" not in f"/{i.filename}"]
        if sources:
            out.findings.append(Finding(SUSPICIOUS, "python source", f"{len(sources)} Python files in the archive "
                                        f"({', '.join(sources[:3])}): a torch.package archive runs them when loaded"))
        for info in pickles:
            if info.file_size > MAX_ENTRY:
                out.broken(f"{info.filename} claims {info.file_size} bytes", info.filename)
                continue
            try:
                data = zf.read(info)
            except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
                out.broken(f"zip entry {info.filename!r} is corrupt ({exc})", info.filename)
                continue
            _scan_bytes(out, info.filename, data)


def _scan_pickle_file(path: str, size: int, out: _Streams, kind: str) -> None:
    """A plain pickle or the legacy torch format: pickles one after another, then storage bytes.

    Legacy files hold five pickles in a row (magic number, protocol, system info, the object, the
    storage keys) and then each storage's bytes; a scanner that reads only the first is a known
    bypass. Bytes after what a loader reads are reported, and their globals recorded.
    """
    storages: dict[str, StorageRef] = {}
    legacy = False
    index = 0
    with open(path, "rb") as f:
        while f.tell() < size:
            start = f.tell()
            index += 1
            name = f"pickle {index}"
            trace = out.new(name)
            try:
                value = _load_one(f, size, trace, _lenient_persistent_load(storages))
            except FormatError as exc:
                if index == 1 and kind == fmt.UNKNOWN:
                    out.broken("not a recognised model file (no torch zip, safetensors, pickle or legacy torch header)")
                elif index == 1 or legacy:
                    out.broken(f"{name}: {exc}", name)  # a stream the loader reads is broken
                else:
                    out.findings.append(Finding(SUSPICIOUS, "trailing data", f"{size - start} bytes after the "
                                                "pickle are not one; pickle.load never reads them", "", "", start))
                f.seek(start)
                _walk_opcodes(f.read(FALLBACK_WINDOW), trace, start)
                if not trace.globals and not trace.calls:
                    out.traces.pop()
                return
            if index == 1:
                legacy = value == fmt.LEGACY_MAGIC
                out.format = fmt.LEGACY if legacy else fmt.PICKLE
                out.notes.append("legacy torch format: 5 pickles (magic, protocol, sys_info, data, storage keys), "
                                 "then storages" if legacy else "plain pickle")
            if legacy and index == 5:
                end = _skip_legacy_storages(f, size, value, storages, out)
                if end is not None and end < size:
                    out.findings.append(Finding(SUSPICIOUS, "trailing data", f"{size - end} bytes after the last "
                                                "storage; torch.load never reads them", "", "", end))
                    _scan_trailing(f, end, size, out)
                return
    if legacy:
        out.broken(f"legacy torch file ends after {index} of its 5 pickles (truncated)")


def _skip_legacy_storages(f: IO[bytes], size: int, keys: Any, storages: dict[str, StorageRef],
                          out: _Streams) -> int | None:
    """Walk the storage records after the fifth pickle; return where they end, None when broken."""
    if not isinstance(keys, list):
        out.broken("legacy storage key list is missing")
        return None
    for key in keys:
        head = f.read(8)
        if len(head) != 8:
            out.broken(f"storage {key} is missing (file truncated)")
            return None
        (count,) = struct.unpack("<q", head)
        ref = storages.get(str(key))
        nbytes = count * (itemsize(ref.dtype) if ref else 1)
        if count < 0 or f.tell() + nbytes > size:
            out.broken(f"storage {key} extends past the end of the file (truncated)")
            return None
        f.seek(nbytes, io.SEEK_CUR)
    return f.tell()


def _scan_trailing(f: IO[bytes], start: int, size: int, out: _Streams) -> None:
    """Bytes after the end of a legacy file: scanned as pickles in case another loader reads them."""
    f.seek(start)
    data = f.read(min(size - start, FALLBACK_WINDOW))
    trace = out.new("trailing data")
    _walk_opcodes(data, trace, start)
    if not trace.globals:
        out.traces.pop()


def _scan_tar(path: str, out: _Streams) -> None:
    """torch's pre-0.4 tar format: each member opens with pickles; the storages' bytes are not walked."""
    import tarfile

    try:
        with tarfile.open(path) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name in _TAR_MEMBERS]
            if not any(m.name == "pickle" for m in members):
                out.broken("a tar archive, but not torch's pre-0.4 tar format (no 'pickle' member)")
                return
            for member in members:
                handle = tf.extractfile(member)
                if handle is not None:
                    _walk_opcodes(handle.read(FALLBACK_WINDOW), out.new(member.name))
    except (tarfile.TarError, OSError, EOFError) as exc:
        out.broken(f"corrupt tar archive ({exc})")
        return
    out.findings.append(Finding(SUSPICIOUS, "torch tar format", "the pre-0.4 tar format is only partly analysed "
                                "(the pickles between storages are not walked); re-save it with a newer torch"))


def _scan_safetensors(path: str, out: _Streams) -> None:
    header, defects = header_defects(path)
    for defect in defects:
        out.findings.append(Finding(BROKEN, "safetensors", defect))
    if header is not None:
        out.notes.append(f"{len(header.tensors)} tensors, header checked against {header.file_size} bytes")


# ---------------------------------------------------------------------------------------------
# Judging and the public API
# ---------------------------------------------------------------------------------------------


def _judge(out: _Streams, policy: Policy, torchscript: bool) -> tuple[list[Finding], list[str], list[str]]:
    findings = list(out.findings)
    names: set[str] = set()
    calls: dict[str, int] = {}
    seen: set[tuple[str, str, str]] = set()
    for stream, trace in out.traces:
        for event in trace.globals:
            names.add(event.name)
            severity, reason = policy.judge(event.name, event.resolved, torchscript)
            if severity != SAFE and (stream, event.name, severity) not in seen:
                seen.add((stream, event.name, severity))
                findings.append(Finding(severity, event.name, reason, stream, event.opcode, event.position))
        for event in trace.calls:
            label = f"{event.opcode} {event.name}"
            calls[label] = calls.get(label, 0) + 1
            if not event.resolved and event.opcode != "BUILD" and (stream, label, UNSAFE) not in seen:
                seen.add((stream, label, UNSAFE))
                findings.append(Finding(UNSAFE, event.name, "calls a value the stream computed (a chain such as "
                                        "getattr(...)(...)), not a named global", stream, event.opcode, event.position))
    return findings, sorted(names), [f"{label} x{n}" if n > 1 else label for label, n in sorted(calls.items())]


def _verdict(findings: Iterable[Finding]) -> str:
    severities = {f.severity for f in findings}
    for severity in (UNSAFE, BROKEN, SUSPICIOUS):
        if severity in severities:
            return severity
    return SAFE


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
        note = (f"git-lfs pointer (oid {info.get('oid', '?')}, {info.get('size', '?')} bytes): the real file was "
                "not fetched, nothing to scan (run `git lfs pull`)")
        return FileScan(path, kind, SKIPPED, notes=(note,))
    if kind == fmt.SHARDED:
        return FileScan(path, kind, SAFE, notes=("a sharded set's JSON index holds no code; its shards are scanned "
                                                 "as files (scan the directory, or `ckpt validate` the index)",))
    if kind in (fmt.ZIP, fmt.TORCHSCRIPT):
        _scan_zip(path, out)
    elif kind == fmt.SAFETENSORS:
        _scan_safetensors(path, out)
    elif kind == fmt.LEGACY_TAR:
        _scan_tar(path, out)
    else:
        # legacy, pickle and anything unrecognised: torch.load would unpickle it, so we read it as one
        _scan_pickle_file(path, size, out, kind)
    findings, names, calls = _judge(out, policy, torchscript=kind == fmt.TORCHSCRIPT)
    order = {s: i for i, s in enumerate(SEVERITY_ORDER)}
    findings.sort(key=lambda f: (order[f.severity], f.stream, f.position if f.position is not None else -1, f.name))
    return FileScan(
        path=path, format=out.format or kind, verdict=_verdict(findings), findings=tuple(findings), globals=tuple(names),
        calls=tuple(calls), streams=tuple(name for name, _ in out.traces), notes=tuple(out.notes),
    )


def iter_model_files(paths: Iterable[str], indexes: bool = False) -> Iterator[str]:
    """Expand directories recursively into the model files they hold; files given are kept as they are.

    In a directory, a file is a model file when its extension says so or its content is a model format;
    ``indexes`` adds sharded sets' ``*.index.json`` files.
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
                if name.lower().endswith(MODEL_EXTENSIONS) or (indexes and name.endswith(".index.json")) \
                        or _looks_like_model(full):
                    yield full


def _looks_like_model(path: str) -> bool:
    try:
        kind = fmt.sniff(path)
    except InputError:
        return False
    if kind in (fmt.ZIP, fmt.TORCHSCRIPT):
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith(".pkl") for n in zf.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return False
    if kind == fmt.SAFETENSORS:
        return header_defects(path)[0] is not None
    if kind == fmt.LEGACY_TAR:
        import tarfile

        try:
            with tarfile.open(path) as tf:
                return "pickle" in tf.getnames()
        except (tarfile.TarError, OSError, EOFError):
            return False
    if kind in (fmt.LEGACY, fmt.PICKLE):
        # protocol 0 pickles open with common text characters: only a clean parse makes a text file a pickle
        try:
            with open(path, "rb") as f:
                PickleVM(_lenient_persistent_load(), Trace()).load(f, os.path.getsize(path))
            return True
        except (FormatError, OSError):
            return False
    return False


def scan(paths: Iterable[str], allow: Iterable[str] = (), config_dir: str | None = None) -> ScanReport:
    """Scan files and directories; ``allow`` adds names to the allow list on top of ``[tool.ckpt] allow``.

    Args:
        paths: files or directories (walked recursively).
        allow: extra allowed globals, exact (``mypkg.Net``) or by module (``mypkg.*``).
        config_dir: where to look for ``pyproject.toml`` (default: the current directory and its parents).
    """
    policy = policy_for(load_config(config_dir), allow)
    files = tuple(scan_file(p, policy) for p in iter_model_files(list(paths)))
    return ScanReport(files, policy.extra_allowed)


def policy_for(config: ProjectConfig, allow: Iterable[str] = ()) -> Policy:
    """The project's policy: ``[tool.ckpt] allow`` plus ``--allow`` names, each checked."""
    extra = tuple(dict.fromkeys([*config_allow(config), *allow]))
    for name in extra:
        if not name or " " in name or "." not in name:
            raise UsageError(f"--allow {name!r} is not a dotted name such as mypkg.models.Net or mypkg.*")
    return Policy(extra)


# ---------------------------------------------------------------------------------------------
# [tool.ckpt] in the repository's pyproject.toml
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectConfig:
    """The ``[tool.ckpt]`` table and where it was found (``path`` is empty when there is none)."""

    path: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return os.path.dirname(self.path) if self.path else os.getcwd()


def find_pyproject(start: str | None = None) -> str | None:
    """The nearest ``pyproject.toml`` at ``start`` (default: the current directory) or above it."""
    here = os.path.abspath(start or os.getcwd())
    while True:
        candidate = os.path.join(here, "pyproject.toml")
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def load_config(start: str | None = None) -> ProjectConfig:
    """Read ``[tool.ckpt]`` from the repository's ``pyproject.toml``; empty when there is none."""
    path = find_pyproject(start)
    if path is None:
        return ProjectConfig()
    try:
        with open(path, "rb") as f:
            if b"tool.ckpt" not in f.read():
                return ProjectConfig(path)  # most pyproject files have no [tool.ckpt]: skip the TOML parser
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read [tool.ckpt] ({exc})") from None
    table = data.get("tool", {}).get("ckpt", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.ckpt] must be a table")
    return ProjectConfig(path, table)


def config_allow(config: ProjectConfig) -> list[str]:
    """``[tool.ckpt] allow``, checked."""
    allow = config.values.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise UsageError(f"{config.path}: [tool.ckpt] allow must be a list of names")
    return allow


def matches(path: str, pattern: str, root: str) -> bool:
    """Whether ``path`` (relative to ``root``) matches a config glob such as ``models/cls_*.safetensors``."""
    import fnmatch

    rel = os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
    return fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(os.path.basename(path), pattern)


# ---------------------------------------------------------------------------------------------
# SARIF 2.1.0, for code-scanning dashboards
# ---------------------------------------------------------------------------------------------
_SARIF_RULES = {
    UNSAFE: ("CKPT001", "unsafe-global", "The file names a global that can run code when it is loaded.", "error"),
    SUSPICIOUS: ("CKPT002", "suspicious-global", "The file names a global that is not on the allow list.", "warning"),
    BROKEN: ("CKPT003", "broken-file", "The file cannot be parsed, or its structure contradicts itself.", "error"),
}


def sarif(report: ScanReport, version: str = "") -> dict[str, Any]:
    """The report as a SARIF 2.1.0 log: one result per finding, located at the file (and byte offset)."""
    rules = [
        {"id": rid, "name": name, "shortDescription": {"text": text}, "defaultConfiguration": {"level": level}}
        for rid, name, text, level in _SARIF_RULES.values()
    ]
    results = []
    for file in report.files:
        for f in file.findings:
            rid, _, _, level = _SARIF_RULES[f.severity]
            where = f" ({f.opcode} in {f.stream})" if f.opcode and f.stream else (f" ({f.stream})" if f.stream else "")
            location: dict[str, Any] = {"artifactLocation": {"uri": file.path.replace(os.sep, "/")}}
            if f.position is not None and (f.stream.startswith("pickle ") or f.stream in ("", "trailing data")):
                # offsets of a plain or legacy file's pickles are file offsets; an archive member's are not
                location["region"] = {"byteOffset": f.position}
            results.append({
                "ruleId": rid, "level": level,
                "message": {"text": f"{file.verdict}: {f.name}{where}: {f.reason}"},
                "locations": [{"physicalLocation": location}],
                "properties": {"verdict": file.verdict, "global": f.name, "stream": f.stream, "opcode": f.opcode},
            })
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "ckpt", "version": version,
                                "rules": rules}},
            "results": results,
            "artifacts": [{"location": {"uri": f.path.replace(os.sep, "/")}, "properties": {"verdict": f.verdict}}
                          for f in report.files],
        }],
    }
