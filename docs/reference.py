"""Generators for the pages cog writes: the CLI reference, the Python API, included files.

Used from cog blocks in ``docs/*.md``; ``cog -I docs -r docs/cli.md docs/api.md docs/benchmarks.md
docs/changelog.md`` rewrites them and ``cog -I docs --check ...`` (in CI) fails when one is stale.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import textwrap
from typing import Any, ForwardRef

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def help_text(args: list[str]) -> str:
    """``ckpt ARGS --help`` as a user sees it in a 100-column terminal."""
    from click.testing import CliRunner

    from ckpt_tool.cli import main

    result = CliRunner().invoke(main, [*args, "--help"], prog_name="ckpt", terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output.rstrip("\n")


def cli_reference() -> str:
    """One section per command, with its ``--help`` verbatim."""
    import click

    from ckpt_tool.cli import main

    ctx = click.Context(main)
    parts = ["## ckpt\n", "`ckpt --help`:\n", "```text\n" + help_text([]) + "\n```\n"]
    for name in main.list_commands(ctx):
        parts.append(f"## ckpt {name}\n")
        parts.append(f"`ckpt {name} --help`:\n")
        parts.append("```text\n" + help_text([name]) + "\n```\n")
    return "\n".join(parts)


def _public(module: Any) -> list[tuple[str, Any]]:
    """Functions and classes a module defines, documents and does not mark private."""
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__ or not inspect.getdoc(obj):
            continue
        found.append((name, obj))
    return sorted(found, key=lambda item: inspect.getsourcelines(item[1])[1])


class _Annotation:
    """An annotation written as in the source (``from __future__ import annotations`` keeps them as strings)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _signature(name: str, obj: Any) -> str:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = ""
    else:

        def plain(a: Any) -> Any:
            # (a named tuple's fields come as ForwardRef('int'): the string is in the ref)
            if isinstance(a, ForwardRef):
                a = a.__forward_arg__
            return _Annotation(a) if isinstance(a, str) else a

        params = [p.replace(annotation=plain(p.annotation)) for p in signature.parameters.values()]
        sig = str(signature.replace(parameters=params, return_annotation=plain(signature.return_annotation)))
    prefix = "class " if inspect.isclass(obj) else ""
    return f"{prefix}{name}{sig}"


def _library_modules() -> list[str]:
    """Every module of the package except the command-line layer (it parses and renders only)."""
    import ckpt_tool

    names = ["ckpt_tool"]
    for info in pkgutil.walk_packages(ckpt_tool.__path__, "ckpt_tool."):
        parts = info.name.split(".")
        if parts[1] in ("cli", "commands", "__main__") or parts[-1].startswith("_"):
            continue
        names.append(info.name)
    return sorted(names)


SECTIONS = ("Args:", "Arguments:", "Returns:", "Raises:", "Yields:", "Example:", "Examples:")


def _markdown(doc: str) -> str:
    """A Google-style docstring as Markdown: sections in bold, arguments as a list, examples as code."""
    out: list[str] = []
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() not in SECTIONS:
            out.append(line)
            i += 1
            continue
        section = line.strip()
        body = []
        i += 1
        while i < len(lines) and (lines[i].startswith(" ") or not lines[i].strip()):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        text = textwrap.dedent("\n".join(body))
        out.append(f"**{section[:-1]}**\n")
        if section.startswith("Example"):
            out.append("```python\n" + text + "\n```")
        elif section in ("Args:", "Arguments:"):
            items: list[str] = []
            for arg in text.splitlines():
                if arg.startswith(" ") and items:
                    items[-1] += " " + arg.strip()
                elif arg.strip():
                    name, _, rest = arg.partition(":")
                    items.append(f"- `{name.strip()}`:{rest}")
            out.append("\n".join(items))
        else:
            out.append(" ".join(text.split()))
        out.append("")
    return "\n".join(out).rstrip("\n")


def api_reference() -> str:
    """Each library module's docstring, then its public functions and classes with their docstrings."""
    parts = []
    for modname in _library_modules():
        module = importlib.import_module(modname)
        members = _public(module)
        doc = inspect.getdoc(module) or ""
        if not members and not doc:
            continue
        parts.append(f"## `{modname}`\n")
        if doc:
            parts.append(doc + "\n")
        for name, obj in members:
            parts.append(f"### `{name}`\n")
            parts.append("```python\n" + _signature(name, obj) + "\n```\n")
            parts.append(_markdown(inspect.getdoc(obj) or "") + "\n")
    # cog reads "]]]" in its output as a stray end marker (nested generics such as set[str]]] hold one)
    return "\n".join(parts).replace("]]]", "]] ]")


def section(path: str, name: str) -> str:
    """The part of a file between ``<!-- name -->`` and ``<!-- /name -->`` (the README's copy of the
    benchmark summary, which ``bench/README.md`` owns)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    start, end = f"<!-- {name} -->\n", f"<!-- /{name} -->"
    return text[text.index(start) + len(start) : text.index(end)].rstrip("\n")


def include(path: str, drop_title: bool = True) -> str:
    """A file of the repository, pasted (its first ``# `` title left out: the page has its own)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    if drop_title and text.startswith("# "):
        text = text.split("\n", 1)[1].lstrip("\n")
    return text.rstrip("\n")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _walk(value: Any, path: str, fields: dict[str, set[str]]) -> None:
    if path:
        fields.setdefault(path, set()).add(_json_type(value))
    if isinstance(value, dict):
        # objects keyed by data (dtype names, module names) rather than by field name
        if path and value and not all(k.isidentifier() for k in value):
            for v in value.values():
                _walk(v, path + ".*", fields)
            return
        for k, v in value.items():
            _walk(v, f"{path}.{k}" if path else k, fields)
    elif isinstance(value, list):
        for v in value:
            _walk(v, path + "[]", fields)


def json_fields(golden: str) -> str:
    """The fields of a ``--json`` report, read from its golden file in tests/golden/, as a table."""
    import json

    with open(os.path.join(ROOT, "tests", "golden", golden + ".json"), encoding="utf-8") as f:
        data = json.load(f)
    fields: dict[str, set[str]] = {}
    _walk(data, "", fields)
    rows = ["| field | type |", "| --- | --- |"]
    for path in sorted(fields):
        types = sorted(fields[path] - {"null"}) + (["null"] if "null" in fields[path] else [])
        rows.append(f"| `{path}` | {' or '.join(types)} |")
    return "\n".join(rows)
