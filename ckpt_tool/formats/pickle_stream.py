"""How a pickle's bytes are read: as CPython's C unpickler reads them, frames included, with bounded work.

Protocol 4 wraps opcodes in ``FRAME(n)`` blocks. The C unpickler reads a frame into its buffer and
serves reads from it; a read that needs more than the buffer still holds *drops the rest of the
buffer* and reads afresh from the file (``_Unpickler_ReadFromFile``). So an opcode whose argument runs
past the end of its frame takes that argument from the bytes after the frame, while ``pickletools``
(and the C unpickler on a file with ``peek``, when the frame fits its look-ahead) read straight on.
No pickler writes such a stream; a hostile one uses it to show a scanner one program and torch
another. :class:`FrameReader` follows the C reading (exact for ``torch.load`` of a zip, whose
``data.pkl`` is an ``io.BytesIO``) and records every point where the two readings part
(``desync``); :class:`SequentialReader` is the other reading.
"""

from __future__ import annotations

from typing import IO

from ..errors import FormatError

MAX_PICKLE_TEXT = 1 << 20  # longest text argument (GLOBAL names, INT digits) we accept
CHUNK = 1 << 16
# The work bound: an opcode costs the interpreter about the same whatever its size, so a stream of
# one-byte opcodes compressed a thousandfold (a deflated zip entry) is the way to make a scanner
# spin. Stored bytes bound the opcodes: a stored pickle has at most one opcode per byte, far
# under this; MIN_OPCODES leaves room for small, highly compressible but honest entries.
OPCODES_PER_STORED_BYTE = 16
MIN_OPCODES = 2_000_000


def opcode_budget(stored_bytes: int) -> int:
    """How many opcodes a stream held in ``stored_bytes`` on disk may take."""
    return max(MIN_OPCODES, OPCODES_PER_STORED_BYTE * stored_bytes)


class WorkLimit(FormatError):
    """A stream asks for more work than its size on disk allows; the rest of it was not read."""


class _Source:
    """The raw bytes from the stream's position up to ``limit``, read ahead in chunks."""

    __slots__ = ("stream", "limit", "buf", "off", "base")

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream = stream
        self.base = stream.tell()
        self.limit = limit
        self.buf = b""
        self.off = 0

    def pos(self) -> int:
        return self.base + self.off

    def take(self, n: int) -> bytes:
        off = self.off
        end = off + n
        if n >= 0 and end <= len(self.buf):
            self.off = end
            return self.buf[off:end]
        if n < 0 or self.pos() + n > self.limit:
            raise FormatError(f"pickle claims {n} bytes at offset {self.pos()}, past the end of the data")
        self._fill(n)
        if len(self.buf) < n:
            raise FormatError("pickle data ends early (truncated)")
        self.off = n
        return self.buf[:n]

    def _fill(self, need: int) -> bool:
        """Keep the unread bytes and read on until ``need`` are buffered; False at the end of the data."""
        rest = self.buf[self.off :]
        self.base += self.off
        self.off = 0
        end = self.base + len(rest)
        want = min(max(need - len(rest), CHUNK), self.limit - end)
        if want <= 0:
            self.buf = rest
            return False
        self.stream.seek(end)
        more = self.stream.read(want)
        self.buf = rest + more
        return bool(more)

    def more(self) -> bool:
        """Whether bytes up to the limit remain unbuffered."""
        return self.base + len(self.buf) < self.limit

    def fill_ahead(self, n: int) -> None:
        """Buffer at least ``n`` bytes past the position where the data has them (reading is unchanged)."""
        if len(self.buf) - self.off < n:
            self._fill(n)

    def skip(self, n: int) -> None:
        """Step over ``n`` bytes without reading them (a joblib array's data)."""
        if n < 0 or self.pos() + n > self.limit:
            raise FormatError(f"pickle data claims {n} bytes at offset {self.pos()}, past the end of the data")
        self.base = self.pos() + n
        self.buf = b""
        self.off = 0

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\n", self.off, self.off + MAX_PICKLE_TEXT + 1)
            if i >= 0:
                line = self.buf[self.off : i]
                self.off = i + 1
                return line
            if len(self.buf) - self.off > MAX_PICKLE_TEXT or not self._fill(len(self.buf) - self.off + CHUNK):
                raise FormatError("pickle text argument is unterminated or too long")

    def release(self) -> None:
        """Leave the stream right after the last byte read (a legacy file's next pickle starts there)."""
        self.stream.seek(self.pos())


class SequentialReader:
    """Reads the stream straight on, frames ignored (``pickletools``, ``pickle.loads`` of bytes).

    While ``cbuf`` is empty, every read is served from ``src`` as it stands, so the interpreter may
    take bytes from ``src.buf`` itself.
    """

    cbuf = b""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.src = _Source(stream, limit)
        self.desync: list[int] = []

    def pos(self) -> int:
        return self.src.pos()

    def read(self, n: int) -> bytes:
        return self.src.take(n)

    def readline(self) -> bytes:
        return self.src.readline()

    def skip(self, n: int) -> None:
        self.src.skip(n)

    def frame(self, n: int) -> None:
        del n

    def release(self) -> None:
        self.src.release()


class FrameReader(SequentialReader):
    """Reads as the C unpickler does on a file without ``peek``: a frame is a buffer whose leftover
    bytes are dropped when a read needs more than it holds."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        super().__init__(stream, limit)
        self.cbuf = b""
        self.cidx = 0
        self.cbase = 0

    def pos(self) -> int:
        return self.cbase + self.cidx if self.cbuf else self.src.pos()

    def _drop(self) -> None:
        if self.cidx < len(self.cbuf):
            self.desync.append(self.cbase + self.cidx)
        self.cbuf = b""

    def read(self, n: int) -> bytes:
        cbuf = self.cbuf
        if cbuf:
            i = self.cidx
            j = i + n
            if 0 <= n and j <= len(cbuf):
                self.cidx = j
                return cbuf[i:j]
            self._drop()
        src = self.src  # the read-ahead's own fast case, here: one call less per opcode argument
        off = src.off
        end = off + n
        if n >= 0 and end <= len(src.buf):
            src.off = end
            return src.buf[off:end]
        return src.take(n)

    def readline(self) -> bytes:
        if self.cbuf:
            k = self.cbuf.find(b"\n", self.cidx)
            if k >= 0:
                line = self.cbuf[self.cidx : k]
                self.cidx = k + 1
                return line
            self._drop()
        return self.src.readline()

    def skip(self, n: int) -> None:
        if self.cbuf:
            self._drop()
        self.src.skip(n)

    def frame(self, n: int) -> None:
        if self.cbuf and 0 <= n <= len(self.cbuf) - self.cidx:
            return  # C checks the frame is in the buffer, and reads on in that same buffer
        data = self.read(n)
        self.cbuf = data
        self.cidx = 0
        self.cbase = self.src.pos() - len(data)

    def release(self) -> None:
        if self.cbuf and self.cidx < len(self.cbuf):
            # STOP inside a frame: the C unpickler has consumed the whole frame from the file
            self.desync.append(self.cbase + self.cidx)
        self.src.release()
