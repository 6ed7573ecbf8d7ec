"""What counts as safe: the allow and deny tables, and the policy that judges each global a pickle names.

``ALLOWED`` is what torch's ``weights_only`` loader accepts plus a few inert data classes; ``DENIED``
names known ways to run code, touch files or the network, or load more code. Anything else is
``suspicious``.
"""

from __future__ import annotations

import _compat_pickle
from collections.abc import Iterator
from dataclasses import dataclass

from ..checkpoint import TORCH_DTYPES

SAFE, UNSAFE, SUSPICIOUS, BROKEN, SKIPPED = "safe", "unsafe", "suspicious", "broken", "skipped"
# worst first: a file's verdict is the worst of its findings
SEVERITY_ORDER = (UNSAFE, BROKEN, SUSPICIOUS, SAFE, SKIPPED)

# ---------------------------------------------------------------------------------------------
# The allow list: torch's weights_only set (torch/_weights_only_unpickler.py, _get_allowed_globals)
# plus inert data classes real checkpoints carry. Each entry says why building it cannot run code.
# ---------------------------------------------------------------------------------------------
_WEIGHTS_ONLY = "torch's weights_only loader allows it"
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
    "joblib.numpy_pickle.NumpyArrayWrapper": "joblib's array header: joblib.load reads the raw array bytes that "
    "follow it (an object array as one more pickle, scanned too)",
    "sklearn.externals.joblib.numpy_pickle.NumpyArrayWrapper": "joblib's array header (vendored in old scikit-learn)",
}
for _name in (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_nested_tensor",
    "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_numpy",
    "_rebuild_device_tensor_from_cpu_tensor",
):
    ALLOWED[f"torch._utils.{_name}"] = _TORCH_REBUILD
for _prefix in ("torch", "torch.cuda"):
    for _kind in (
        "Double",
        "Float",
        "Half",
        "BFloat16",
        "Long",
        "Int",
        "Short",
        "Char",
        "Byte",
        "Bool",
        "ComplexDouble",
        "ComplexFloat",
    ):
        ALLOWED[f"{_prefix}.{_kind}Storage"] = _STORAGE
        if not _kind.startswith("Complex"):
            ALLOWED[f"{_prefix}.{_kind}Tensor"] = _TORCH_VALUE + " (legacy tensor type)"
for _kind in ("QInt8", "QUInt8", "QInt32", "QUInt4x2", "QUInt2x4"):
    ALLOWED[f"torch.{_kind}Storage"] = _STORAGE
for _dtype in (
    *sorted(TORCH_DTYPES),  # the names torch writes: its weights_only loader refuses the aliases (torch.half)
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
):
    ALLOWED[f"torch.{_dtype}"] = _DTYPE

# torch.distributed.checkpoint's .metadata (what dcp.save writes, checked with torch 2.14.1): dataclasses
# that pickle builds with NEWOBJ (cls.__new__, no __init__) and fills with BUILD (their __dict__ or, for
# TensorProperties, a __setstate__ that only decodes its fields). torch.distributed is denied as a whole
# (rpc), so these exact names are allowed here and nothing else under it.
_DCP_RECORD = "torch.distributed.checkpoint's metadata record: a dataclass of plain fields, built without __init__"
ALLOWED.update(
    {
        "torch.distributed.checkpoint.metadata.Metadata": _DCP_RECORD + " (the .metadata root)",
        "torch.distributed.checkpoint.metadata.TensorStorageMetadata": _DCP_RECORD + " (dtype, size, chunks)",
        "torch.distributed.checkpoint.metadata.ChunkStorageMetadata": _DCP_RECORD + " (a chunk's offsets and sizes)",
        "torch.distributed.checkpoint.metadata.BytesStorageMetadata": _DCP_RECORD + " (marks a bytes entry; no fields)",
        "torch.distributed.checkpoint.metadata.TensorProperties": _DCP_RECORD + " (its __setstate__ only stores the "
        "dtype, layout and flags it is given)",
        "torch.distributed.checkpoint.metadata.MetadataIndex": _DCP_RECORD + " (a key and chunk offset)",
        "torch.distributed.checkpoint.metadata.StorageMeta": _DCP_RECORD + " (checkpoint and save ids)",
        "torch.distributed.checkpoint.filesystem._StorageInfo": _DCP_RECORD + " (file name, offset and length)",
        "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING": "an Enum of memory formats, called with an int: "
        "a lookup by value",
    }
)

# what torch.load(weights_only=True) accepts without torch.serialization.add_safe_globals: the names
# whose reason says so (checked against torch's own unpickler in tests/test_scan.py). ckpt allows
# more inert classes (argparse.Namespace, numpy scalars, defaultdict...); a file naming one is safe,
# but torch's default load refuses it, and scan says so.
TORCH_WEIGHTS_ONLY = frozenset(name for name, why in ALLOWED.items() if why.startswith(_WEIGHTS_ONLY))

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
    "torch.storage._load_from_bytes": _LOADS + " (torch.load of bytes in the stream)",
    "torch.from_file": _FILES + " (maps a file; shared=True creates and writes it)",
    "torch.serialization": _LOADS + " and " + _FILES,
    "torch.utils.collect_env": _RUNS + " (collect_env.run runs a shell command)",
    "torch.utils.data.datapipes": _LOADS + " and " + _FILES + " (decoders unpickle, FileOpener opens files)",
    "torch.utils.benchmark": _CODE + " (Timer compiles statements)",
    "torch.utils.tensorboard": _FILES,
    "torch.utils.checkpoint": "calls any callable it is given",
    "torch.utils.bottleneck": _CODE,
    "torch.utils.model_zoo": _NET,
    "torch.jit": _CODE + " (execWrapper runs exec; scripting compiles source)",
    "torch.multiprocessing": _RUNS,
    "torch._inductor": _CODE + " (compiles and loads generated code)",
    "torch.export": _LOADS,
    "torch.onnx": _FILES,
    "torch.profiler": _FILES,
    "torch.testing": _CODE,
    "torch.classes": "loads custom native classes",
    "torch._classes": "loads custom native classes",
    "torch._ops": "calls any registered native operator",
    "torch.compiler": _CODE,
    "_osx_support": _RUNS + " (_read_output runs a shell command)",
    "_aix_support": _RUNS,
    "imaplib": _RUNS + " (IMAP4_stream runs a command) and " + _NET,
    "poplib": _NET,
    "nntplib": _NET,
    "socketserver": _NET,
    "asyncore": _NET,
    "asynchat": _NET,
    "smtpd": _NET,
    "wsgiref": _NET,
    "test": _CODE + " and " + _RUNS + " (test.support runs scripts and subprocesses)",
    "logging.FileHandler": _FILES + " (creates the log file)",
    "logging.handlers": _FILES + " and " + _NET + " (file, socket, SMTP and HTTP handlers)",
    "logging.basicConfig": _FILES + " (filename= creates a file)",
    "numpy.savetxt": _FILES,
    "numpy.save": _FILES,
    "numpy.savez": _FILES,
    "numpy.savez_compressed": _FILES,
    "numpy.loadtxt": _FILES,
    "numpy.genfromtxt": _FILES,
    "numpy.fromregex": _FILES,
    "numpy.lib.format": _FILES + " (open_memmap creates files) and " + _LOADS,
    "numpy.lib._npyio_impl": _LOADS + " and " + _FILES,
    "numpy.lib._datasource": _NET + " and " + _FILES,
    "numpy.DataSource": _NET + " and " + _FILES,
    "numpy.lib.utils": _CODE,
    "site": _CODE + " (addsitedir runs .pth files)",
    "sched": "calls any callable",
    "atexit": "registers callables to run at exit",
    "weakref.finalize": "calls any callable",
    "codecs.open": _FILES,
    "linecache": _FILES,
    "sqlite3": _FILES + " (connect creates a database file)",
    "dbm": _FILES,
    "mailbox": _FILES,
    "mailcap": _RUNS,
    "py_compile": _FILES,
    "compileall": _FILES,
    "zipapp": _FILES,
    "filecmp": _FILES,
    "netrc": _FILES,
    "antigravity": "opens a web browser",
    "turtle": "opens windows and runs Tcl code",
    "winreg": "changes the Windows registry",
    "_winreg": "changes the Windows registry",
    "msvcrt": "calls native console functions",
    "resource": "changes process limits",
    "IPython": _CODE,
    "idlelib": _CODE,
    "tkinter": "opens windows and runs Tcl code",
    "_tkinter": "runs Tcl code",
}

# builtins: the value constructors in ALLOWED are fine; every other builtin is a tool for running or
# reaching code (eval, exec, compile, getattr, __import__, open, ...), so builtins are denied by default.
DENIED_BUILTINS: dict[str, str] = {
    "eval": _CODE,
    "exec": _CODE,
    "compile": _CODE,
    "execfile": _CODE,
    "input": "reads stdin and, in Python 2, evals",
    "__import__": _IMPORTS,
    "getattr": "reaches any attribute (getattr(__import__('os'), 'system'))",
    "setattr": "changes any attribute",
    "delattr": "changes any attribute",
    "globals": "reaches module globals",
    "locals": "reaches frame locals",
    "vars": "reaches __dict__",
    "open": _FILES,
    "file": _FILES + " (Python 2)",
    "apply": "calls any callable (Python 2)",
    "breakpoint": "starts a debugger",
    "exit": "stops the interpreter",
    "quit": "stops the interpreter",
    "help": "starts a pager",
    "map": "calls a callable over values",
    "filter": "calls a callable over values",
    "iter": "iter(callable, sentinel) calls it",
    "next": "drives calls",
    "type": "creates classes",
    "super": "reaches parent methods",
    "memoryview": "raw memory access",
}
_BUILTINS_OTHER = "a builtin other than an inert value constructor: a tool for calling or reaching code"

# Python 2 names that pickle.load still maps to Python 3 ones (_compat_pickle: protocols 0-2), so
# "__builtin__.eval" is judged as "builtins.eval" and "commands.getoutput" as "subprocess.getoutput"
_NAME_ALIASES = {f"{m}.{n}": f"{m3}.{n3}" for (m, n), (m3, n3) in _compat_pickle.NAME_MAPPING.items()}
_MODULE_ALIASES = dict(_compat_pickle.IMPORT_MAPPING, exceptions="builtins")


@dataclass(frozen=True)
class Policy:
    """What counts as safe: the built-in tables plus a project's own allowed names.

    ``extra_allowed`` holds exact names (``mypkg.models.Net``) or module patterns (``mypkg.*``).
    Denied names stay denied whatever is allowed, as torch's loader does for os and sys.
    """

    extra_allowed: tuple[str, ...] = ()

    def judge(
        self, name: str, resolved: bool = True, torchscript: bool = False, module: str | None = None
    ) -> tuple[str, str]:
        """Return ``(severity, reason)`` for a global the stream names.

        ``module`` is the part of ``name`` that is imported (GLOBAL's first line, STACK_GLOBAL's
        first string); the rest is an attribute path that pickle walks with getattr. By default
        everything but the last part is the module.

        Example:
            >>> Policy().judge("os.system")[0]
            'unsafe'
        """
        if not resolved:
            return UNSAFE, "the name is computed at load time and cannot be resolved statically"
        qual = _canonical(name)
        if module is None or not qual.startswith(f"{_canonical(module)}.") or not module:
            module = qual.rpartition(".")[0]
        else:
            module = _canonical(module)
        path = qual[len(module) + 1 :]
        reason = _denied(qual, qual.rpartition(".")[0], qual.rpartition(".")[2]) or _denied_on_path(path)
        if reason:
            return UNSAFE, reason
        if qual in ALLOWED:
            return SAFE, ALLOWED[qual]
        if torchscript:
            for prefix, why in TORCHSCRIPT_ALLOWED_PREFIXES.items():
                if qual.startswith(prefix):
                    return SAFE, why
        parent = qual.rpartition(".")[0]
        if parent in ALLOWED:
            return UNSAFE, f"an attribute of the allowed class {parent}: methods can write files or call code"
        for pattern in self.extra_allowed:
            if qual == pattern:
                return SAFE, f"allowed by the project ({pattern})"
            if pattern.endswith(".*") and f"{module}.".startswith(pattern[:-1]) and "." not in path:
                # a module pattern covers the module's own names, not attribute paths through them
                # (torch.nn.modules.conv.torch.serialization.os.system reaches os through attributes)
                return SAFE, f"allowed by the project ({pattern})"
        if "." in path:
            return SUSPICIOUS, (
                f"reached through the attribute path {path} of {module}: module patterns in --allow "
                "do not cover attribute paths (allow the exact name to trust it)"
            )
        return SUSPICIOUS, "not on the allow list (unknown classes are not trusted; --allow NAME trusts one)"


def _denied_on_path(path: str) -> str | None:
    """A denied name reached through attributes: every tail of the path is judged as a name of its own
    (``conv.torch.serialization.os.system`` reaches ``os.system``), and a path ending in a known way to
    run code is denied whatever it passes through (``tempfile._os.system``)."""
    parts = path.split(".")
    if len(parts) < 2:
        return None
    for i in range(len(parts) - 2, -1, -1):  # the shortest tail first: it names what finally runs
        tail = _canonical(".".join(parts[i:]))
        module, _, attr = tail.rpartition(".")
        reason = _denied(tail, module, attr) if tail not in ALLOWED else None
        if reason:
            return f"{reason} (reached through the attribute path {path})"
    if parts[-1] in _DANGEROUS_ATTRIBUTES:
        return f"{_DANGEROUS_ATTRIBUTES[parts[-1]]} (the attribute {parts[-1]} reached through {path})"
    return None


# the last part of an attribute path that names a way to run code, whatever the path went through
_DANGEROUS_ATTRIBUTES = {
    **{
        n: _RUNS
        for n in (
            "system",
            "popen",
            "Popen",
            "spawnl",
            "spawnv",
            "spawnve",
            "spawnlp",
            "execv",
            "execve",
            "execl",
            "execlp",
            "execvp",
            "check_output",
            "check_call",
            "getoutput",
            "getstatusoutput",
            "run_command",
            "startfile",
            "fork",
            "forkpty",
        )
    },
    **{
        n: _CODE
        for n in (
            "eval",
            "exec",
            "compile",
            "execfile",
            "__import__",
            "import_module",
            "run_path",
            "run_module",
            "runcode",
            "runsource",
            "execWrapper",
        )
    },
    **{n: _LOADS for n in ("loads", "load", "_load_from_bytes", "Unpickler")},
    **{
        n: _FILES
        for n in (
            "open",
            "from_file",
            "rmtree",
            "remove",
            "unlink",
            "rmdir",
            "write_text",
            "write_bytes",
            "savetxt",
            "open_memmap",
            "FileHandler",
            "mkdir",
            "makedirs",
            "rename",
            "replace",
            "chmod",
            "symlink",
            "copyfile",
            "move",
        )
    },
    **{n: _NET for n in ("urlopen", "create_connection", "socket", "urlretrieve")},
}


def _canonical(name: str) -> str:
    if name in _NAME_ALIASES:
        return _NAME_ALIASES[name]
    for module in _prefixes(name):
        if module in _MODULE_ALIASES and module != name:
            return _MODULE_ALIASES[module] + name[len(module) :]
    return name


def _denied(qual: str, module: str, attr: str) -> str | None:
    if qual in ALLOWED or qual.startswith(_NOT_DENIED):
        return None
    if module == "builtins":
        return DENIED_BUILTINS.get(attr, _BUILTINS_OTHER)
    if any(p.startswith("__") and p.endswith("__") for p in qual.split(".")[1:]):
        return "reaches a dunder attribute (__globals__, __subclasses__, __builtins__): a classic sandbox escape"
    for key in _prefixes(qual):
        if key in DENIED_MODULES:
            return DENIED_MODULES[key]
    return None


# TorchScript's own rebuild helpers live under the denied torch.jit
_NOT_DENIED = ("torch.jit._pickle.",)


def _prefixes(qual: str) -> Iterator[str]:
    parts = qual.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])
