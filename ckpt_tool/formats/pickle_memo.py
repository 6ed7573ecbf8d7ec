"""The pickle memo, with one entry's memory per write whatever the indices say."""

from __future__ import annotations

import struct
from typing import Any

from ..errors import FormatError

_LONG = struct.Struct("<xI").unpack  # LONG_BINPUT/LONG_BINGET: the opcode, then a 4-byte index


class Memo:
    """Index -> object, as BINPUT writes and BINGET reads them.

    Picklers number their entries 0, 1, 2...: that run lives in a list (8 bytes an entry, where a
    dict takes about 80 with its integer keys: 60 MB of a 100,000-tensor file's load). An index off
    the run (a hostile LONG_BINPUT of 4,000,000,000, a negative PUT) lives in a dict, so no index
    makes the memo allocate more than the one entry written (the C unpickler sizes an array by it).
    """

    __slots__ = ("items", "more")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.more: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.items) + len(self.more)

    def put(self, idx: int, value: Any) -> None:
        items = self.items
        n = len(items)
        if 0 <= idx < n:
            items[idx] = value
        elif idx == n:
            items.append(value)
            more = self.more
            if more:  # the run has reached entries written ahead of it: they join it
                more.pop(idx, None)
                while len(items) in more:
                    items.append(more.pop(len(items)))
        else:
            self.more[idx] = value

    def put_op(self, op: bytes | None, value: Any) -> None:
        """The write of a BINPUT or LONG_BINPUT given as its bytes (opcode and index); None: none."""
        if op is None:
            return
        idx = op[1] if len(op) == 2 else _LONG(op)[0]
        items = self.items
        if idx == len(items) and not self.more:  # the next of the run: nearly every write
            items.append(value)
        else:
            self.put(idx, value)

    def get(self, idx: int) -> Any:
        if 0 <= idx < len(self.items):
            return self.items[idx]
        if idx not in self.more:
            raise FormatError(f"pickle memo entry {idx} is read before it is written")
        return self.more[idx]

    def get_op(self, op: bytes) -> Any:
        """The read of a BINGET or LONG_BINGET given as its bytes."""
        idx = op[1] if len(op) == 2 else _LONG(op)[0]
        return self.items[idx] if idx < len(self.items) else self.get(idx)

    def as_dict(self) -> dict[int, Any]:
        return {**dict(enumerate(self.items)), **self.more}
