"""torch's tensor record, recognised whole: one regular-expression match instead of 30-odd opcodes.

``torch.save`` (protocol 2) writes every tensor as the same run of opcodes::

    FUNC MARK MARK 'storage' CLASS KEY LOCATION NUMEL TUPLE BINPERSID   (the storage's persistent id)
         OFFSET SIZE STRIDE NEWFALSE|NEWTRUE HOOKS EMPTY_TUPLE REDUCE   (backward hooks: OrderedDict())
         TUPLE REDUCE

where FUNC, 'storage', CLASS, KEY, LOCATION and HOOKS are each a memo read (BINGET, LONG_BINGET) or,
the first time, the object itself (GLOBAL, BINUNICODE), and most items are followed by a memo
write (BINPUT, LONG_BINPUT). :func:`run_record` matches that run at the reader's position and applies
exactly the effect its opcodes would have had, in their order: the same memo reads and writes, the
same ``persistent_load`` call, the same globals and calls recorded at the same byte positions (through
the machine's own ``make_global`` and ``call``), the same opcode count. Whatever the pattern does not
cover (a literal location string, a LONG1 size, a FRAME, a hostile twist) is not matched, and the
ordinary opcode loop reads it; ``tests/test_pickle_records.py`` checks that the two agree.

Past the first few records of a file (its globals, 'storage' and location in the memo, the memo past
256 entries) every record is the same run with memo reads in place of the globals: :func:`steady`
recognises it in one match and applies it at once, which halves the cost of a tensor record again.
"""

from __future__ import annotations

import operator
import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

# (pickle_vm imports this module at its end, so either can be imported first)
from .pickle_vm import Event, GlobalRef, PickledOrderedDict, PickledTensor, StorageRef, _rebuild_tensor

if TYPE_CHECKING:
    from .pickle_vm import _Machine

# the opcodes a record can start with: BINGET, LONG_BINGET, GLOBAL, and BINUNICODE (the key before it)
STARTS = frozenset(b"hjcX")
# bytes a record of even a 64-dimensional tensor fits in, key string aside (read ahead for a match)
WINDOW = 4096

_GET = rb"h.|j...."
_PUT = rb"(q.|r....)?"
_INT = rb"K.|M..|J...."
# a size or stride: EMPTY_TUPLE, or 1 to 3 ints and TUPLE1-3, or MARK, ints, TUPLE
_TUPLE = (
    rb"(\)|(?:(?:" + _INT + rb")\x85|(?:" + _INT + rb"){2}\x86|(?:" + _INT + rb"){3}\x87|\((?:" + _INT + rb"){0,64}t))"
)


def _item(literal: bytes) -> bytes:
    """A memo read or ``literal`` (one group: its span), then an optional memo write (a second group)."""
    return rb"(" + _GET + rb"|" + literal + rb")" + _PUT


_FUNC = b"ctorch._utils\n_rebuild_tensor_v2\n"
_WORD = b"X\x07\x00\x00\x00storage"
_HOOKS = b"ccollections\nOrderedDict\n"
# groups: 0 FUNC, 1 put, 2 'storage', 3 put, 4 storage class, 5 put, 6 key (its bytes follow a BINUNICODE)
_HEAD = re.compile(
    _item(re.escape(_FUNC))
    + rb"\(\("
    + _item(re.escape(_WORD))
    + _item(rb"ctorch\n[A-Za-z0-9_]{1,64}\n")
    + rb"("
    + _GET
    + rb"|X....)",
    re.DOTALL,
)
# groups: 0 key put, 1 location, 2 put, 3 numel, 4 pid put, 5 offset, 6 size, 7 put, 8 stride, 9 put,
# 10 requires_grad, 11 hooks' OrderedDict, 12 put, 13 its REDUCE, 14 put, 15 args put, 16 REDUCE, 17 put
_TAIL = re.compile(
    _PUT
    + rb"("
    + _GET
    + rb")"
    + _PUT
    + rb"("
    + _INT
    + rb")t"
    + _PUT
    + rb"Q("
    + _INT
    + rb")"
    + _TUPLE
    + _PUT
    + _TUPLE
    + _PUT
    + rb"([\x88\x89])"
    + _item(re.escape(_HOOKS))
    + rb"\)(R)"
    + _PUT
    + rb"t"
    + _PUT
    + rb"(R)"
    + _PUT,
    re.DOTALL,
)
_NAME_PUT = re.compile(rb"q.|r....", re.DOTALL)
_FUNC_NAME, _HOOKS_NAME = "torch._utils._rebuild_tensor_v2", "collections.OrderedDict"
_MISSING = object()


def _int(b: bytes) -> int:
    """BININT1 (unsigned byte), BININT2 (unsigned 16 bits) or BININT (signed 32 bits)."""
    op = b[0]
    if op == 0x4B:
        return b[1]
    return int.from_bytes(b[1:], "little", signed=op == 0x4A)


_TUPLES: dict[bytes, tuple[tuple[int, ...], int]] = {}  # a file has few distinct sizes and strides


def _tuple(span: bytes) -> tuple[tuple[int, ...], int]:
    """A size or stride and how many opcodes it took (one tuple object for equal ones: ints only)."""
    known = _TUPLES.get(span)
    if known is not None:
        return known
    if len(_TUPLES) > 4096:
        _TUPLES.clear()
    _TUPLES[span] = known = _decode_tuple(span)
    return known


def _decode_tuple(span: bytes) -> tuple[tuple[int, ...], int]:
    if span == b")":
        return (), 1
    body = span[1:-1] if span[0] == 0x28 else span[:-1]  # MARK ... TUPLE, or TUPLE1-3
    out = []
    i, end = 0, len(body)
    while i < end:
        op = body[i]
        if op == 0x4B:
            out.append(body[i + 1])
            i += 2
        else:
            width = 3 if op == 0x4D else 5
            out.append(int.from_bytes(body[i + 1 : i + width], "little", signed=op == 0x4A))
            i += width
    return tuple(out), len(out) + (2 if span[0] == 0x28 else 1)


# the record's opcodes in order, for the count at a failing one: a fixed opcode (None), an optional
# memo write ("h", group) / ("t", group), or a size or stride ("size", "stride")
_SLOTS: tuple[tuple[str, Any], ...] = (
    ("op", "func"), ("h", 1), ("op", None), ("op", None), ("op", "word"), ("h", 3), ("op", "class"),
    ("h", 5), ("op", "key"), ("t", 0), ("op", "location"), ("t", 2), ("op", None), ("op", None), ("t", 4),
    ("op", "persid"), ("op", None), ("size", None), ("t", 7), ("stride", None), ("t", 9), ("op", None),
    ("op", "hooks"), ("t", 12), ("op", None), ("op", "hooks call"), ("t", 14), ("op", None), ("t", 15),
    ("op", "call"), ("t", 17),
)  # fmt: skip


# where the reader stands after the opcode that can fail at each stage (a memo read, BINPERSID, REDUCE)
_STAGE_END: dict[str, Callable[[re.Match[bytes], re.Match[bytes]], int]] = {
    "func": lambda h, t: h.end(1),
    "word": lambda h, t: h.end(3),
    "class": lambda h, t: h.end(5),
    "key": lambda h, t: h.end(7),
    "location": lambda h, t: t.end(2),
    "persid": lambda h, t: t.start(6),
    "hooks": lambda h, t: t.end(12),
    "hooks call": lambda h, t: t.end(14),
    "call": lambda h, t: t.end(17),
}


def _count(h: tuple[Any, ...], t: tuple[Any, ...], upto: str | None) -> int:
    """Opcodes of the record up to and including the one named ``upto`` (None: all of them)."""
    n = 0
    for kind, what in _SLOTS:
        if kind == "op":
            n += 1
            if what is not None and what == upto:
                return n
        elif kind in ("h", "t"):
            n += (h if kind == "h" else t)[what] is not None
        else:
            n += _tuple(t[6 if kind == "size" else 8])[1]
    return n


def _global_or_read(m: _Machine, op: bytes, pos: int, module: str, name: str) -> Any:
    """The value of a GLOBAL (``module.name``, recorded at ``pos``) or of a memo read, as ``op`` is."""
    if op[0] == 0x63:
        m.pos = pos
        return m.make_global(module, name, "GLOBAL")
    return m.memo.get_op(op)


# The steady record: every record after the first few of a file, once its globals, 'storage' and its
# location are in the memo and the memo has passed 256 entries. From the key's memo write on, the
# groups (numbered from 0 as in ``groups()``): 0 the key's memo write; FUNC, 'storage', CLASS as
# memo reads (1-2, 3-4, 5-6: BINGET or LONG_BINGET); 7 the storage key's length, 8 its digits,
# 9 write; 10-11 location; 12 numel, 13 write; 14 offset, 15 size, 16 write, 17 stride, 18 write,
# 19 requires_grad; 20-21 OrderedDict; 22 its REDUCE, 23 write; 24 write; 25 REDUCE, 26 write
_R = rb"r(....)"
_G = rb"(?:h(.)|j(....))"
_STEADY = re.compile(
    _R
    + _G
    + rb"\(\("
    + _G
    + _G
    + rb"X(.)\x00\x00\x00([0-9]{1,20})"
    + _R
    + _G
    + rb"("
    + _INT
    + rb")t"
    + _R
    + rb"Q("
    + _INT
    + rb")"
    + _TUPLE
    + _R
    + _TUPLE
    + _R
    + rb"([\x88\x89])"
    + _G
    + rb"\)(R)"
    + _R
    + rb"t"
    + _R
    + rb"(R)"
    + _R,
    re.DOTALL,
)
_LE = int.from_bytes
_FIXED_OPS = 26  # the steady record's opcodes, its size and stride aside
# its eight memo writes' indices (4 bytes each) and its five memo reads' groups (a BINGET's byte or
# a LONG_BINGET's four: one of each pair is None)
_WRITES = operator.itemgetter(0, 9, 13, 16, 18, 23, 24, 26)
_READS = operator.itemgetter(1, 2, 3, 4, 5, 6, 10, 11, 20, 21)
_EIGHT = struct.Struct("<8I")
_LAST_RUN = 0xFFFFFFFF - 7  # past it, the record's eight writes' indices are not all 4-byte numbers


def _read_values(reads: tuple[bytes | None, ...], items: list[Any], n0: int) -> list[Any] | None:
    """The five entries a steady record reads (``reads``: their groups), when each was written before
    the record (``n0`` entries) and they are torch's rebuild function, 'storage', a storage class, a
    location and ``OrderedDict``; None otherwise."""
    idx = []
    for k in (0, 2, 4, 6, 8):
        short, long = reads[k], reads[k + 1]
        idx.append(short[0] if short is not None else _LE(long or b"", "little"))
    if max(idx) >= n0:
        return None
    values = [items[i] for i in idx]
    func, word, cls, location, hooks_func = values
    if (
        type(func) is GlobalRef
        and func.qualname == _FUNC_NAME
        and word == "storage"
        and type(cls) is GlobalRef
        and type(location) is str
        and type(hooks_func) is GlobalRef
        and hooks_func.qualname == _HOOKS_NAME
    ):
        return values
    return None


def steady(m: _Machine, buf: bytes, off: int, base: int, budget: int) -> int:
    """:func:`run_record` for steady records (the machine asks this first): the record at ``off`` and
    each steady record right after it that the read-ahead holds, their effects applied at once; how
    many were applied: 0, with nothing changed, unless the first is the common case (and the general
    reading then reads it).

    The common case: the memo is the plain run of entries and the record's eight writes are its
    next eight, every memo read is of an entry written before the record, and the entries read are
    torch's rebuild function, 'storage', a storage class, a location and ``OrderedDict``. Then no
    opcode of the record can fail but the storage's persistent id, which is asked first (an answer
    not used here is the general reading's, which does not ask again), and the rest follows from the
    match. Records in a row mostly read the same five entries: those are checked once for the row
    (the memo only grows meanwhile, so what was read before the row is unchanged).
    """
    memo = m.memo
    if memo.more:
        return 0
    items = memo.items
    vm = m.vm
    calls = m.calls
    stack = m.stack
    ops = vm.ops
    persistent = vm._persistent
    src = m.r.src
    # past this, the next record may not be whole in the read-ahead: the machine reads ahead first
    last = len(buf) - WINDOW if src.more() else len(buf)
    applied = 0
    reads: tuple[bytes | None, ...] | None = None
    values: list[Any] = []
    match = None
    while True:
        start = off + 5 + _LE(buf[off + 1 : off + 5], "little")
        found = _STEADY.match(buf, start)
        if found is None:
            break
        g = found.groups()
        n0 = len(items)
        if n0 > _LAST_RUN or b"".join(_WRITES(g)) != _EIGHT.pack(
            n0, n0 + 1, n0 + 2, n0 + 3, n0 + 4, n0 + 5, n0 + 6, n0 + 7
        ):
            break
        r = _READS(g)
        if r != reads:
            checked = _read_values(r, items, n0)
            if checked is None:
                break
            reads, values = r, checked
        if g[7][0] != len(g[8]):
            break
        size, size_ops = _tuple(g[15])
        stride, stride_ops = _tuple(g[17])
        total = _FIXED_OPS + size_ops + stride_ops
        if ops + total > budget:
            break
        try:
            name = buf[off + 5 : start].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            break
        key = g[8].decode("ascii")
        word, cls, location = values[1], values[2], values[3]
        pid = (word, cls, key, location, _int(g[12]))
        try:
            storage = persistent(pid)
        except Exception as exc:  # noqa: BLE001 - the general reading fails as it fails, with this answer
            vm.answered = (pid, True, exc)
            break
        if type(storage) is not StorageRef:
            vm.answered = (pid, False, storage)  # (the loader is asked once for each id it reads, as pickle asks)
            break
        hooks = PickledOrderedDict()
        offset, requires_grad = _int(g[14]), g[19] == b"\x88"
        value = PickledTensor(storage, offset, size, stride, storage.dtype, requires_grad)
        items += (name, key, pid, size, stride, hooks, (storage, offset, size, stride, requires_grad, hooks), value)
        if calls is not None:
            calls.append(Event("REDUCE", _HOOKS_NAME, base + found.start(23), True))
            calls.append(Event("REDUCE", _FUNC_NAME, base + found.start(26), True))
        stack += (name, value)
        ops += total
        applied += 1
        match = found
        off = found.end()
        if off > last or off >= len(buf) or buf[off] != 0x58:
            break
    if match is None:
        return 0
    m.pos = base + match.start(26)
    vm.ops = ops
    vm.records += applied
    src.off = match.end()
    return applied


def run_record(m: _Machine, buf: bytes, off: int, base: int, budget: int) -> bool:
    """Apply the tensor record at ``buf[off:]`` (``base``: the stream position of ``buf[0]``) and
    move the reader past it; False, with nothing changed, when no whole record is there.

    First everything that can fail without effect is settled (the match, the key string's bytes and
    their UTF-8, the work budget); then the opcodes' effects are applied in stream order through
    the machine's own operations, so an error in one of them (a missing memo entry, a refused
    storage) leaves the trace and the opcode count as the opcode loop leaves them.
    """
    name: Any = _MISSING  # the state dict key the record is the value of, when one comes first
    name_put = None
    start = off
    if buf[off] == 0x58:  # BINUNICODE (and its memo write) of a key, then the record
        start = off + 5 + int.from_bytes(buf[off + 1 : off + 5], "little")
        if start > len(buf) - 4:
            return False
        try:
            name = buf[off + 5 : start].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return False
        written = _NAME_PUT.match(buf, start)
        if written is not None:
            name_put = written.group()
            start = written.end()
    head = _HEAD.match(buf, start)
    if head is None:
        return False
    h = head.groups()
    at = head.end()
    key: Any = _MISSING
    g = h[6]
    if g[0] == 0x58:  # BINUNICODE: the key's bytes follow its length
        end = at + int.from_bytes(g[1:], "little")
        if end > len(buf):
            return False
        try:
            key = buf[at:end].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return False  # the opcode loop raises its own error for it
        at = end
    tail = _TAIL.match(buf, at)
    if tail is None:
        return False
    t = tail.groups()
    size, size_ops = _tuple(t[6])
    stride, stride_ops = _tuple(t[8])
    puts = (h[1], h[3], h[5], t[0], t[2], t[4], t[7], t[9], t[12], t[14], t[15], t[17])
    total = 29 + size_ops + stride_ops - puts.count(None)  # 17 fixed opcodes and 12 memo writes
    if name is not _MISSING:
        total += 1 if name_put is None else 2
    vm, memo = m.vm, m.memo
    put = memo.put_op
    calls = m.calls
    ops0 = vm.ops
    if ops0 + total > budget:
        return False  # the opcode loop stops at the very opcode that exceeds it
    if name is not _MISSING:  # nothing in the key's two opcodes can fail
        m.stack.append(name)
        put(name_put, name)
        ops0 += 1 if name_put is None else 2
        total -= 1 if name_put is None else 2
    stage = "func"
    try:
        # (each of the three is a memo read in every record after the first: read in place)
        g = h[0]
        if g[0] == 0x63:
            func = _global_or_read(m, g, base + head.start(1), "torch._utils", "_rebuild_tensor_v2")
        else:
            func = memo.get_op(g)
        put(h[1], func)
        stage = "word"
        g = h[2]
        if g[0] == 0x58:
            word: Any = "storage"
        else:
            word = memo.get_op(g)
        put(h[3], word)
        stage = "class"
        g = h[4]
        cls = (
            memo.get_op(g)
            if g[0] != 0x63
            else _global_or_read(m, g, base + head.start(5), "torch", g[7:-1].decode("ascii"))
        )
        put(h[5], cls)
        stage = "key"
        if key is _MISSING:
            key = memo.get_op(h[6])
        put(t[0], key)
        stage = "location"
        location = memo.get_op(t[1])
        put(t[2], location)
        pid = (word, cls, key, location, _int(t[3]))
        put(t[4], pid)
        stage = "persid"
        storage = vm._persistent(pid)
        put(t[7], size)
        put(t[9], stride)
        stage = "hooks"
        g = t[11]
        if g[0] == 0x63:
            hooks_func = _global_or_read(m, g, base + tail.start(12), "collections", "OrderedDict")
        else:
            hooks_func = memo.get_op(g)
        put(t[12], hooks_func)
        stage = "hooks call"
        m.pos = base + tail.start(14)
        # the two calls as _Machine.call makes them, for the globals every record names
        if type(hooks_func) is GlobalRef and hooks_func.qualname == _HOOKS_NAME:
            if calls is not None:
                calls.append(Event("REDUCE", _HOOKS_NAME, m.pos, True))
            hooks: Any = PickledOrderedDict()
        else:
            hooks = m.call(hooks_func, (), "REDUCE")
        put(t[14], hooks)
        args = (storage, _int(t[5]), size, stride, t[10] == b"\x88", hooks)
        put(t[15], args)
        stage = "call"
        m.pos = base + tail.start(17)
        if type(func) is GlobalRef and func.qualname == _FUNC_NAME:
            if calls is not None:
                calls.append(Event("REDUCE", _FUNC_NAME, m.pos, True))
            value = _rebuild_tensor(args)
        else:
            value = m.call(func, args, "REDUCE")
        put(t[17], value)
    except BaseException:
        # as the loop leaves them: the failing opcode counted, the reader just past it
        vm.ops = ops0 + _count(h, t, stage)
        m.r.src.off = _STAGE_END[stage](head, tail)
        raise
    vm.ops = ops0 + total
    vm.records += 1
    m.stack.append(value)
    m.r.src.off = tail.end()
    return True
