"""Every report is rendered here: a human table by default, stable sorted JSON with ``--json``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import operator
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from .checkpoint import Progress
from .text import human_bytes, human_count, shape_str, some  # noqa: F401 - the commands take them from here

__all__ = [
    "dumps",
    "echo",
    "echo_json",
    "human_bytes",
    "human_count",
    "json_option",
    "note",
    "page",
    "plain_table",
    "progress_bar",
    "shape_str",
    "some",
    "table",
    "to_jsonable",
]

F = TypeVar("F", bound=Callable[..., Any])


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples and sets as plain JSON data (objects with ``to_json`` use it)."""
    if hasattr(obj, "to_json") and callable(obj.to_json):
        return to_jsonable(obj.to_json())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.repr}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(v) for v in obj)
    if isinstance(obj, float) and obj != obj:
        return "nan"
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return "inf" if obj > 0 else "-inf"
    return obj


# The version of every --json report's layout (docs/formats.md): raise it when a field is renamed,
# removed or changes meaning; adding a field keeps it.
SCHEMA_VERSION = 1


def echo_json(obj: Any) -> None:
    """Print :func:`dumps` of ``obj``: orjson's bytes written as they come, a long listing a few
    thousand rows at a time (a 100,000-row report is 45 MB of text, never held whole)."""
    from .bulk import gc_paused

    chunks: Iterable[bytes | memoryview]
    with gc_paused():
        try:
            chunks = _fast_chunks(obj)
        except _Differs:
            chunks = [dumps(obj).encode("ascii")]
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # a text-only stream (a test's capture): write text
        sys.stdout.write("".join(bytes(c).decode("ascii") for c in chunks) + "\n")
        return
    for chunk in chunks:
        out.write(chunk)
    out.write(b"\n")
    out.flush()


def dumps(obj: Any) -> str:
    """A report as JSON with sorted keys; a top-level object carries ``schema_version``.

    orjson writes it (a report of 100,000 tensor rows in a few tens of milliseconds). The text is
    byte for byte what ``json.dumps(to_jsonable(obj), indent=2, sort_keys=True)`` writes: where
    the two encoders would differ (non-ASCII text, which the standard encoder escapes; floats such
    as ``1e-05``, which orjson writes ``0.00001``; integers beyond 64 bits) the standard one writes it.
    """
    from .bulk import gc_paused

    with gc_paused():
        try:
            return _fast_dumps(obj)
        except _Differs:
            pass
    data = to_jsonable(obj)
    if isinstance(data, dict):
        data = {"schema_version": SCHEMA_VERSION, **data}
    return json.dumps(data, indent=2, sort_keys=True)


class _Differs(Exception):
    """orjson's text would not be the standard encoder's."""


_RAW = (str, int, bool, type(None))
# words in a field's annotation that orjson writes as the standard encoder does (a capitalised
# name is another class: it reaches _default and is converted there); anything else, such as
# float, Any or dict, is walked by to_jsonable
_RAW_WORDS = frozenset({"str", "int", "bool", "None", "tuple", "list", "..."})
_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9.]*|\.\.\.")
_WALKED = frozenset({"Any", "Mapping", "Sequence", "Iterable", "MutableMapping"})
_converters: dict[type, Callable[[Any], Any]] = {}


def _raw_annotation(annotation: Any) -> bool:
    if not isinstance(annotation, str):
        return False
    for word in _WORD.findall(annotation):
        if word not in _RAW_WORDS and (not word[0].isupper() or word in _WALKED):
            return False
    return True


def _converter(cls: type) -> Callable[[Any], Any]:
    """How ``_default`` turns an instance of ``cls`` into data orjson writes as the standard encoder would."""
    if hasattr(cls, "to_json") and callable(cls.to_json):
        return lambda obj: _checked(to_jsonable(obj.to_json()))
    if not dataclasses.is_dataclass(cls):
        return lambda obj: _checked(to_jsonable(obj))
    fields = [f for f in dataclasses.fields(cls) if f.repr]
    raw = tuple(f.name for f in fields if _raw_annotation(f.type))
    walked = tuple(f.name for f in fields if not _raw_annotation(f.type))

    # the raw fields' values in one call (a report of 100,000 rows converts 100,000 of them)
    values = operator.attrgetter(*raw) if len(raw) > 1 else None

    def convert(obj: Any) -> dict[str, Any]:
        out = dict(zip(raw, values(obj))) if values is not None else {name: getattr(obj, name) for name in raw}
        for name in walked:
            out[name] = _checked(to_jsonable(getattr(obj, name)))
        return out

    return convert


# a listing at least this long, of one dataclass that orjson can write by itself, is written so
_NATIVE_ROWS = 256
_native: dict[type, tuple[str, ...] | None] = {}


def _native_fields(cls: type) -> tuple[str, ...] | None:
    """For a dataclass orjson writes as the standard encoder writes its dict (every field shown,
    declared in name order, each of plain ints, strings, bools and tuples of them), the fields of
    another type, which must be None to be written so; None when ``cls`` is not such a class."""
    if cls in _native:
        return _native[cls]
    found: tuple[str, ...] | None = None
    if dataclasses.is_dataclass(cls) and not hasattr(cls, "to_json"):
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        # (orjson leaves out a field whose name begins with an underscore)
        if all(f.repr for f in fields) and names == sorted(names) and not any(n.startswith("_") for n in names):
            found = tuple(
                f.name for f in fields if not (isinstance(f.type, str) and set(_WORD.findall(f.type)) <= _RAW_WORDS)
            )
    _native[cls] = found
    return found


def _native_listing(value: Any) -> bool:
    """Whether ``value`` is a long listing of rows (inspect's 100,000 tensors) that orjson writes by
    itself, a few thousand rows at a time (:func:`_listing_pieces`).

    Otherwise orjson calls back into Python to convert every row to a dict, and the whole text is
    held at once (45 MB for 100,000 rows). The rows are written as their class declares its fields,
    so the class keeps them in name order (what sorted keys give).
    """
    if type(value) not in (tuple, list) or len(value) < _NATIVE_ROWS:
        return False
    cls = type(value[0])
    nullable = _native_fields(cls)
    if nullable is None or any(type(item) is not cls for item in value):
        return False
    for name in nullable:
        get = operator.attrgetter(name)
        if any(get(item) is not None for item in value):
            return False
    return True


_ROWS_AT_ONCE = 4096
_OPEN, _CLOSE = b'{\n  "": [', b"\n  ]\n}"  # around orjson's text of {"": rows}


def _listing_pieces(rows: Sequence[Any]) -> Iterator[bytes | memoryview]:
    """The text of a listing that stands as a top-level field's value, in pieces of a few thousand
    rows: orjson's where it writes them as the standard encoder does, the standard encoder's for a
    piece where it would not (non-ASCII text, integers beyond 64 bits), so that nothing already
    written has to be taken back."""
    import orjson

    yield b"["
    for start in range(0, len(rows), _ROWS_AT_ONCE):
        part = rows[start : start + _ROWS_AT_ONCE]
        try:
            text = orjson.dumps({"": part}, option=orjson.OPT_INDENT_2)
        except orjson.JSONEncodeError:
            text = b""
        if _as_standard(text):
            piece: bytes | memoryview = memoryview(text)[len(_OPEN) : -len(_CLOSE)]
        else:
            piece = ",".join(
                "\n    " + json.dumps(to_jsonable(row), indent=2, sort_keys=True).replace("\n", "\n    ")
                for row in part
            ).encode("ascii")
        if start:
            yield b","
        yield piece
    yield b"\n  ]"


def _as_standard(text: bytes) -> bool:
    """Whether orjson's ``text`` is the standard encoder's: ASCII (the standard encoder escapes the
    rest) and no DEL (which it escapes too, where orjson writes the byte)."""
    return bool(text) and text.isascii() and b"\x7f" not in text


def _checked(data: Any) -> Any:
    """``data`` (plain, from to_jsonable), refused where orjson would write a float differently."""
    if isinstance(data, float):
        if "e-" in repr(data):
            raise _Differs
    elif isinstance(data, dict):
        for v in data.values():
            if not isinstance(v, _RAW):
                _checked(v)
    elif isinstance(data, list):
        for v in data:
            if not isinstance(v, _RAW):
                _checked(v)
    return data


def _default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return _checked(to_jsonable(obj))
    cls = type(obj)
    convert = _converters.get(cls)
    if convert is None:
        convert = _converters[cls] = _converter(cls)
    return convert(obj)


def _fast_dumps(obj: Any) -> str:
    return "".join(bytes(chunk).decode("ascii") for chunk in _fast_chunks(obj))


_MARK = b"\x00"  # where a listing goes: orjson writes a NUL in a string as \u0000, never as the byte


def _fast_chunks(obj: Any) -> Iterator[bytes | memoryview]:
    """orjson's text of ``obj`` in pieces, to be written one after the other: a long listing is
    written apart, a few thousand rows at a time (:func:`_listing_pieces`), never whole.

    Raises :class:`_Differs` before anything is returned when the standard encoder must write it.
    """
    import orjson

    if isinstance(obj, (dict, list, tuple)):
        data = _checked(to_jsonable(obj))
    elif dataclasses.is_dataclass(obj) or (hasattr(obj, "to_json") and callable(obj.to_json)):
        data = _default(obj)
    else:
        raise _Differs
    listings: list[tuple[str, Sequence[Any]]] = []
    if isinstance(data, dict):
        fields = {}
        for name, value in data.items():
            if _native_listing(value):
                fields[name] = orjson.Fragment(_MARK)
                listings.append((name, value))
            else:
                fields[name] = value
        data = {"schema_version": SCHEMA_VERSION, **fields}
    try:
        out = orjson.dumps(
            data, default=_default, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS
        )
    except orjson.JSONEncodeError:
        # a float or text orjson writes differently, or what neither encoder can write: the
        # standard encoder writes it, or raises as it always has
        raise _Differs from None
    if not _as_standard(out):
        raise _Differs
    # the marks stand in the text in sorted key order, not in the fields' (ASCII keys: the same sort)
    return _joined(out.split(_MARK), [value for _, value in sorted(listings, key=lambda item: item[0])])


def _joined(pieces: list[bytes], listings: list[Sequence[Any]]) -> Iterator[bytes | memoryview]:
    yield pieces[0]
    for listing, piece in zip(listings, pieces[1:], strict=True):
        yield from _listing_pieces(listing)
        yield piece


def echo(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def note(text: str) -> None:
    """Diagnostics go to stderr so that stdout stays data."""
    sys.stderr.write(text + "\n")


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], align: Sequence[str] | None = None) -> str:
    from tabulate import tabulate

    rows = list(rows)
    if not rows:
        return "(none)"
    return str(
        tabulate(
            rows,
            headers=list(headers),
            tablefmt="simple",
            disable_numparse=True,
            colalign=list(align) if align else None,
        )
    )


def json_option(func: F) -> F:
    """Adds ``--json`` to a listing command."""
    import click

    return click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (stable, sorted keys).")(func)


def plain_table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    """The same layout as :func:`table` (left-aligned, tabulate's "simple" style) without importing tabulate.

    For commands on a hot path such as a pre-commit hook, where tabulate's import (it loads
    importlib.metadata) costs more than the work itself.
    """
    rows = [[str(c) for c in row] for row in rows]
    if not rows:
        return "(none)"
    # tabulate pads each header by two characters at least; colour codes take no width
    widths = [max(len(h) + 2, *(visible_len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c + " " * (w - visible_len(c)) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# --- paging ------------------------------------------------------------------------------------------


def page(text: str, enabled: bool = True) -> None:
    """Print ``text``, through ``$PAGER`` (``less`` by default) when stdout is a terminal the text overflows.

    Never pages when stdout is not a terminal (pipes, files, tests), with ``enabled`` false
    (``--no-pager``), or with ``PAGER`` set empty or to ``cat``. ``less`` gets ``LESS=FRX`` unless
    ``LESS`` is set: it quits when the text fits, keeps colour codes and leaves the text on screen.
    """
    pager = os.environ.get("PAGER", "less")
    if not enabled or not _stdout_is_terminal() or pager.strip() in ("", "cat"):
        echo(text)
        return
    import shutil

    if text.count("\n") + 1 < shutil.get_terminal_size().lines:
        echo(text)
        return
    import shlex
    import subprocess

    env = dict(os.environ)
    env.setdefault("LESS", "FRX")
    sys.stdout.flush()
    try:
        subprocess.run(shlex.split(pager), input=(text + "\n").encode("utf-8", "replace"), env=env, check=False)
    except (OSError, ValueError):  # no such pager, or PAGER unparsable: print as if there were none
        echo(text)


# --- colour ------------------------------------------------------------------------------------------

# ANSI codes of the words worth a colour: verdicts, check results and diff statuses
STATUS_COLORS = {
    "pass": "32",
    "safe": "32",
    "matched": "32",
    "loads": "32",
    "fail": "1;31",
    "unsafe": "1;31",
    "broken": "1;31",
    "missing": "31",
    "shape": "35",
    "mismatched": "35",
    "unexpected": "33",
    "suspicious": "33",
    "mixed": "33",
    "skipped": "33",
    "note": "33",
    "dtype": "36",
    "auto": "36",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_no_color_flag = False


def set_no_color(flag: bool) -> None:
    """``ckpt --no-color``: plain text whatever the terminal (set for each invocation)."""
    global _no_color_flag
    _no_color_flag = flag


def color_on() -> bool:
    """Colour only on a terminal: never with ``ckpt --no-color``, ``NO_COLOR`` set (not empty) or stdout piped."""
    if _no_color_flag or os.environ.get("NO_COLOR"):
        return False
    return _stdout_is_terminal()


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def paint(text: str, status: str | None = None) -> str:
    """``text`` in the colour of ``status`` (by default the text itself: ``"unsafe"``, ``"PASS"``), if colour is on.

    Example:
        >>> paint("missing")  # on a terminal: '\x1b[31mmissing\x1b[0m'
        'missing'
    """
    code = STATUS_COLORS.get((status or text).strip().lower())
    if code is None or not color_on():
        return text
    return f"\x1b[{code}m{text}\x1b[0m"


def visible_len(text: str) -> int:
    """Width of ``text`` on screen: colour codes take none."""
    return len(_ANSI.sub("", text)) if "\x1b" in text else len(text)


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[Progress | None]:
    """A progress callback ``(bytes_done_now, bytes_total)`` drawing a bar on stderr.

    Yields ``None`` (no callback, no cost) when stderr is not a terminal or ``enabled`` is false,
    so that piped and machine-read output stays clean.
    """
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    import click

    bars: list[Any] = []

    def update(advance: int, total: int) -> None:
        if not bars:
            bars.append(click.progressbar(length=max(total, 1), label=label, file=sys.stderr))
            bars[0].__enter__()
        bars[0].update(advance)

    try:
        yield update
    finally:
        if bars:
            bars[0].__exit__(None, None, None)
