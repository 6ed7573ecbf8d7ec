"""TorchScript code: the ``code/`` folder of a ``torch.jit.save`` archive, read as text, never compiled.

``torch.jit.load`` compiles this source and runs it: a scripted ``__setstate__`` runs at load time,
``forward`` at the first call. TorchScript can only call torch's operators and the archive's own
classes, but some operators touch files (``torch.from_file``), the network (``rpc``) or native
libraries. We list every call and import in the source and flag those; an archive with code is
never ``safe`` (at most ``suspicious``), as this reading is a check for known dangers, not a proof.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

_FILES = "reads or writes files (TorchScript operator)"
_NET = "opens network connections (TorchScript distributed RPC)"
_NATIVE = "loads or calls native code outside torch's own operators"
_CODE = "runs or imports code"

# the last part of a called name -> why it is dangerous; matched on any receiver (torch.x, ops.aten.x)
DENIED_CALLS: dict[str, str] = {
    "from_file": _FILES,
    "load": _FILES + " (loads another file)",
    "save": _FILES,
    "open": _FILES,
    "fromfile": _FILES,
    "tofile": _FILES,
    "memmap": _FILES,
    "_save_for_lite_interpreter": _FILES,
    "_load_for_lite_interpreter": _FILES,
    "save_to_buffer": _FILES,
    "rpc_async": _NET,
    "rpc_sync": _NET,
    "remote": _NET,
    "init_rpc": _NET,
    "init_process_group": _NET,
    "load_library": _NATIVE,
    "_load_library": _NATIVE,
    "system": _CODE,
    "popen": _CODE,
    "exec": _CODE,
    "eval": _CODE,
    "compile": _CODE,
    "__import__": _CODE,
    "import_module": _CODE,
}
# any call under these names is flagged whatever its last part
DENIED_PREFIXES: dict[str, str] = {
    "torch.distributed.": _NET,
    "torch.classes.": _NATIVE,
    "os.": _CODE,
    "sys.": _CODE,
    "subprocess.": _CODE,
    "socket.": _NET,
    "builtins.": _CODE,
}
# the modules serialized TorchScript imports: its own classes, torch, typing helpers
ALLOWED_IMPORTS = ("__torch__", "torch", "typing", "builtins", "math", "collections", "enum")

_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\s*\.\s*[A-Za-z_]\w*)*)\s*\(")
_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", re.MULTILINE)


class CodeCall(NamedTuple):
    """A call or import in TorchScript source that reaches files, the network or native code."""

    name: str
    reason: str
    position: int


def dangerous_calls(source: str) -> tuple[int, list[CodeCall]]:
    """Return (calls and imports seen, the dangerous ones) in one TorchScript source file."""
    found: list[CodeCall] = []
    seen = 0
    for m in _IMPORT.finditer(source):
        seen += 1
        module = m.group(1) or m.group(2)
        if module.split(".", 1)[0] not in ALLOWED_IMPORTS:
            found.append(
                CodeCall(f"import {module}", _CODE + " (imports a module TorchScript does not use)", m.start())
            )
    for name, pos in _calls(source):
        seen += 1
        reason = DENIED_CALLS.get(name.rsplit(".", 1)[-1]) or next(
            (why for prefix, why in DENIED_PREFIXES.items() if name.startswith(prefix)), None
        )
        if reason:
            found.append(CodeCall(name, reason, pos))
    return seen, found


def _calls(source: str) -> Iterator[tuple[str, int]]:
    for m in _CALL.finditer(source):
        name = re.sub(r"\s+", "", m.group(1))
        if name not in ("def", "class", "if", "while", "return", "for", "assert", "print", "isinstance"):
            yield name, m.start()
