"""Run every ``$ ckpt`` example of the documentation and compare its output with the page.

    python docs/examples.py              # check every page: a diff and exit 1 when one is out of date
    python docs/examples.py --update     # rerun every example, paste the real output into the pages,
                                         # and regenerate the cog pages (CLI reference, Python API)
    python docs/examples.py docs/tutorial.md --update    # one page

An example is a ```` ```console ```` block of the README or of a page under ``docs/``: lines that
start with ``$ `` are commands (a trailing ``\\`` continues one), the lines after a command are its
output (stdout and stderr as a terminal shows them), and ``[exit N]`` closes the output of a command
that exits with N != 0. Commands are ``ckpt ...`` (run in-process through Click's test runner) and
``cat FILE``. Each page runs in a fresh copy of the inputs ``docs/make_examples.py`` builds, shown as
``/tmp/ckpt-examples``, with its own empty signature cache, so a page reads the same on every run.

Fields that change from run to run (throughput, memory, run time) are masked when comparing, and
table padding is ignored; everything else must match. Transcripts that are not runnable (a
``git commit`` through a hook) go in ```` ```text ```` blocks and must not contain ``$ ckpt``.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
SHOWN_DIR = "/tmp/ckpt-examples"  # where the pages say the examples ran (make_examples.py's default)

BLOCK = re.compile(r"^```console\n(.*?)^```[ \t]*$", re.M | re.S)
EXIT = re.compile(r"^\[exit (\d+)\]$")

# run-to-run noise, masked on both sides before comparing
VOLATILE = [
    (re.compile(r"\d[\d.,]*( ?)(images/s)"), r"N\1\2"),
    (re.compile(r"(RSS|CUDA max allocated|allocated) \d[\d.,]* ?[KMGT]?B"), r"\1 N"),
    (re.compile(r"\d[\d.]* ?(s|ms)\b(?= |$|,|\))"), r"N \1"),
]
# a table whose last column is a throughput (finetune-check's phases): that cell of each row
RATE_HEADER = re.compile(r"\s(images/s|samples/s|it/s)$")
LAST_NUMBER = re.compile(r"^(.*\s)\d[\d.,]*$")


@dataclass(frozen=True)
class Command:
    argv: list[str]
    text: str  # the command as written, continuation lines included
    output: str
    code: int


def pages() -> list[str]:
    """Every page that may hold examples: the README and the Markdown files under docs/."""
    found = [os.path.join(ROOT, "README.md")]
    found += sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))
    return found


def parse_block(body: str) -> list[Command]:
    commands: list[Command] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise ValueError(f"console block does not start with a command: {lines[i]!r}")
        text = [lines[i]]
        while text[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            text.append(lines[i])
        i += 1
        out: list[str] = []
        code = 0
        while i < len(lines) and not lines[i].startswith("$ "):
            m = EXIT.match(lines[i])
            if m:
                code = int(m.group(1))
            else:
                out.append(lines[i])
            i += 1
        joined = " ".join(t.rstrip("\\").strip() for t in text)[2:]
        commands.append(Command(shlex.split(joined), "\n".join(text), "\n".join(out), code))
    return commands


@contextlib.contextmanager
def _in_dir(path: str, env: dict[str, str]) -> Iterator[None]:
    old_cwd, old_env = os.getcwd(), {k: os.environ.get(k) for k in env}
    os.chdir(path)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Training runs the same on every machine (and fast on a busy one) with one torch thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run(argv: list[str], work: str) -> tuple[str, int]:
    """Run one command in ``work``; returns (output as shown, exit code)."""
    if argv[0] == "cat":
        with open(os.path.join(work, argv[1]), encoding="utf-8") as f:
            return f.read().rstrip("\n"), 0
    if argv[0] != "ckpt":
        raise ValueError(f"examples run `ckpt` and `cat` only, not {argv[0]!r}")
    from click.testing import CliRunner

    from ckpt_tool.cli import main

    with _in_dir(work, {"CKPT_CACHE_DIR": os.path.join(work, ".cache")}), one_torch_thread():
        result = CliRunner().invoke(main, argv[1:], prog_name="ckpt", terminal_width=100)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise RuntimeError(f"`{' '.join(argv)}` raised {result.exception!r}") from result.exception
    output = result.output.rstrip("\n").replace(os.path.realpath(work), SHOWN_DIR).replace(work, SHOWN_DIR)
    return output, result.exit_code


def masked(text: str) -> list[str]:
    """What must stay equal between the page and a run: volatile fields masked, padding ignored."""
    lines = []
    in_rate_table = False
    for line in text.splitlines():
        if RATE_HEADER.search(line):
            in_rate_table = True
        elif not line.strip():
            in_rate_table = False
        elif in_rate_table:
            line = LAST_NUMBER.sub(r"\1N", line)
        for pattern, repl in VOLATILE:
            line = pattern.sub(repl, line)
        lines.append(" ".join(line.split()))
    return lines


def _render(commands: list[tuple[Command, str, int]]) -> str:
    parts = []
    for cmd, output, code in commands:
        parts.append(cmd.text)
        if output:
            parts.append(output)
        if code:
            parts.append(f"[exit {code}]")
    return "\n".join(parts) + "\n"


def check_page(page: str, inputs: str, update: bool = False) -> list[str]:
    """Run a page's examples in a copy of ``inputs``; returns the differences (and rewrites the page with ``update``)."""
    with open(page, encoding="utf-8") as f:
        text = f.read()
    problems: list[str] = []
    name = os.path.relpath(page, ROOT)
    with tempfile.TemporaryDirectory(prefix="ckpt-docs-") as tmp:
        work = os.path.join(tmp, "ckpt-examples")
        shutil.copytree(inputs, work, symlinks=True)

        def replace(block: re.Match[str]) -> str:
            results = []
            for cmd in parse_block(block.group(1)):
                output, code = run(cmd.argv, work)
                results.append((cmd, output, code))
                if code != cmd.code:
                    problems.append(f"{name}: `{cmd.text}` exits {code}, the page says {cmd.code}")
                if masked(output) != masked(cmd.output):
                    diff = difflib.unified_diff(
                        cmd.output.splitlines(), output.splitlines(), "page", "run", lineterm=""
                    )
                    problems.append(f"{name}: `{cmd.text}` prints something else:\n" + "\n".join(diff))
            return "```console\n" + _render(results) + "```"

        new_text = BLOCK.sub(replace, text)
    if update and new_text != text:
        with open(page, "w", encoding="utf-8") as f:
            f.write(new_text)
    return problems


def stray_examples(page: str) -> list[str]:
    """``$ ckpt`` lines outside console blocks would never be run: each one is a problem."""
    with open(page, encoding="utf-8") as f:
        text = BLOCK.sub("", f.read())
    return [
        f"{os.path.relpath(page, ROOT)}: `{line.strip()}` is not in a ```console block"
        for line in text.splitlines()
        if line.lstrip().startswith("$ ckpt")
    ]


def build_inputs(dest: str) -> str:
    sys.path.insert(0, DOCS)
    import make_examples

    make_examples.make(dest)
    return dest


def regenerate_cog() -> None:
    """Rewrite the pages generated with cog (the CLI reference, the Python API)."""
    from cogapp import Cog

    status = Cog().main(["cog", "-I", DOCS, "-r", *cog_pages()])
    if status:
        raise SystemExit(status)


def cog_pages() -> list[str]:
    """The pages with cog blocks (generated parts): ``cog -I docs --check`` runs on these in CI."""
    found = []
    for page in pages():
        with open(page, encoding="utf-8") as f:
            if "[[[cog" in f.read():
                found.append(page)
    return found


def main(argv: list[str]) -> int:
    update = "--update" in argv
    chosen = [os.path.abspath(a) for a in argv if not a.startswith("--")] or pages()
    if "--cog-pages" in argv:  # for CI: `cog --check $(python docs/examples.py --cog-pages)`
        print(" ".join(os.path.relpath(p) for p in cog_pages()))
        return 0
    if update and len(chosen) == len(pages()):
        regenerate_cog()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ckpt-docs-inputs-") as tmp:
        inputs = build_inputs(os.path.join(tmp, "inputs"))
        for page in chosen:
            problems += stray_examples(page)
            problems += check_page(page, inputs, update=update)
    if update:
        print(f"reran the examples of {len(chosen)} page(s); {len(problems)} output(s) changed")
        return 0
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    raise SystemExit(main(sys.argv[1:]))
