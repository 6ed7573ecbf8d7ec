"""The Textual application of ``ckpt browse``: a module tree, the selected module's tensors, details.

All figures come from :mod:`ckpt_tool.browse.view`; this module only lays them out. Work that reads
bytes (the safety scan, value statistics) runs in thread workers so that the interface never waits.
Nothing here writes to a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Static, Tree
from textual.widgets.tree import TreeNode

from ..diff import AUTO, DTYPE, MATCHED, MISSING, SHAPE, UNEXPECTED, DiffReport
from ..text import human_bytes, human_count, shape_str
from .view import SORTS, BrowseData, Entry, Module, ModuleTree

STATUS_STYLE = {
    MISSING: "bold red",
    SHAPE: "bold magenta",
    UNEXPECTED: "yellow",
    DTYPE: "cyan",
    MATCHED: "green",
    AUTO: "green",
}
STATUS_WORD = {
    MISSING: "missing",
    SHAPE: "shape",
    UNEXPECTED: "unexpected",
    DTYPE: "dtype",
    MATCHED: "equal",
    AUTO: "torch fills",
}
VERDICT_STYLE = {"safe": "green", "skipped": "yellow", "suspicious": "yellow", "unsafe": "bold", "broken": "bold"}
# a chain of single children opens by itself down to this depth (model -> layers)
AUTO_EXPAND_DEPTH = 4
# child modules added to the tree at a time; a "... N more" node adds the next batch
CHILD_BATCH = 200


@dataclass(frozen=True)
class More:
    """The tree's stand-in for a module's children past those shown: selecting it adds the next batch."""

    path: str
    shown: int


def _figures(tensors: int, parameters: int, nbytes: int) -> str:
    return f"{tensors} · {human_count(parameters)} · {human_bytes(nbytes)}"


class SummaryScreen(ModalScreen[None]):
    """The whole summary: files, state dicts, extras, metadata, inert objects and every scan finding."""

    BINDINGS: ClassVar[list[BindingType]] = [("escape,i,q", "dismiss", "Close")]

    def __init__(self, text: Text) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="summary-box"):
            yield Static(self.text, id="summary-text")


class PlanScreen(ModalScreen[None]):
    """The fix plan of a diff, and the ``ckpt migrate`` command that applies it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        ("escape,p,q", "dismiss", "Close"),
        ("c", "copy", "Copy command"),
        ("m", "print_and_quit", "Quit, print command"),
    ]

    def __init__(self, report: DiffReport) -> None:
        super().__init__()
        self.report = report

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="plan-box"):
            yield Static(_plan_text(self.report), id="plan-text")

    def action_copy(self) -> None:
        if self.report.plan.command:
            # OSC 52: the terminal (also over SSH) puts it on the clipboard
            self.app.copy_to_clipboard(self.report.plan.command)
            self.notify("ckpt migrate command copied to the clipboard")

    def action_print_and_quit(self) -> None:
        if self.report.plan.command:
            self.app.exit(self.report.plan.command)


class BrowseApp(App[str]):
    """``ckpt browse``: returns the ``ckpt migrate`` command when asked to print it on quitting."""

    TITLE = "ckpt browse"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    Screen { layout: vertical; }
    #header { height: auto; max-height: 3; background: $panel; padding: 0 1; }
    #header.-unsafe { background: $error; color: $text; }
    #body { height: 1fr; }
    #tree { width: 40%; min-width: 24; border: round $primary-darken-2; }
    #table { width: 1fr; height: 1fr; border: round $primary-darken-2; }
    #details { height: 8; border: round $primary-darken-2; padding: 0 1; }
    #tree:focus-within, #table:focus-within { border: round $accent; }
    #filter { dock: bottom; display: none; }
    #filter.-shown { display: block; }
    SummaryScreen, PlanScreen { align: center middle; }
    #summary-box, #plan-box { width: 90%; height: 90%; border: round $accent; background: $surface; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("v", "values", "Values"),
        Binding("i", "summary", "Info"),
        Binding("d", "differences", "Diffs only"),
        Binding("p", "plan", "Plan"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, data: BrowseData, *, scan: bool = True) -> None:
        super().__init__()
        self.data = data
        self.tree_data = ModuleTree(data)
        self.pattern = ""
        self.differences_only = False
        self.scan_result: Any = None
        self.stats: dict[str, Any] = {}
        self.rows: dict[str, Entry] = {}
        self.current = ""
        self._scan = scan

    # --- layout --------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(self._header_text(), id="header")
        with Horizontal(id="body"):
            yield Tree[Module | More](self._node_label(self.tree_data.root(), root=True), id="tree")
            yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="details")
        yield Input(placeholder="filter keys: text or regular expression (enter keeps it, escape clears)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self._fill_tree()
        self.query_one("#tree", Tree).focus()
        # the table (and the shared-storage groups it shows) and the scan after the tree's first paint:
        # a worker thread started sooner would compete with it for the interpreter
        self.call_after_refresh(self._show_module, "")
        if self._scan:
            self.call_after_refresh(self._run_scan)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("differences", "plan"):
            return self.data.report is not None
        return True

    # --- the tree ------------------------------------------------------------------------------------

    def _fill_tree(self) -> None:
        tree: Tree[Module | More] = self.query_one("#tree", Tree)
        root = self.tree_data.root()
        tree.reset(self._node_label(root, root=True), root)
        self._add_modules(tree.root)
        tree.root.expand()
        node = tree.root
        for _ in range(AUTO_EXPAND_DEPTH):
            if len(node.children) != 1 or not node.children[0].allow_expand:
                break
            node = node.children[0]
            self._add_modules(node)
            node.expand()
        tree.border_title = self._tree_title()
        tree.border_subtitle = f"filter: {self.pattern}" if self.pattern else ""

    def _add_modules(self, node: TreeNode[Module | More], start: int = 0) -> None:
        """Add a module's children to the tree, a batch at a time: 5,000 layers cost one batch to open."""
        if not isinstance(node.data, Module) or (start == 0 and node.children):
            return
        children = self.tree_data.children(node.data.path)
        for child in children[start : start + CHILD_BATCH]:
            node.add(self._node_label(child), child, allow_expand=child.has_children)
        rest = len(children) - start - CHILD_BATCH
        if rest > 0:
            node.add_leaf(Text(f"... {rest} more (enter)", "dim italic"), More(node.data.path, start + CHILD_BATCH))

    def _node_label(self, m: Module, root: bool = False) -> Text:
        name = (self.data.summary.path.rstrip("/").rsplit("/", 1)[-1] or self.data.summary.path) if root else m.name
        style = STATUS_STYLE.get(m.status or "", "bold") if self.data.report is not None else "bold"
        label = Text.assemble((name, style), "  ", (_figures(m.tensors, m.parameters, m.nbytes), "dim"))
        if m.differences:
            label.append(f" · {m.differences} diff", STATUS_STYLE.get(m.status or "", ""))
        return label

    def _tree_title(self) -> str:
        return f"sort: {self.tree_data.sort}" + (" · diffs only" if self.differences_only else "")

    @on(Tree.NodeExpanded, "#tree")
    def _expanded(self, event: Tree.NodeExpanded[Module | More]) -> None:
        self._add_modules(event.node)

    @on(Tree.NodeHighlighted, "#tree")
    def _highlighted(self, event: Tree.NodeHighlighted[Module | More]) -> None:
        if isinstance(event.node.data, Module) and event.node.data.path != self.current:
            self._show_module(event.node.data.path)

    @on(Tree.NodeSelected, "#tree")
    def _selected_node(self, event: Tree.NodeSelected[Module | More]) -> None:
        node = event.node
        if isinstance(node.data, More) and node.parent is not None:
            parent, start = node.parent, node.data.shown
            node.remove()
            self._add_modules(parent, start)

    # --- the table and the details -------------------------------------------------------------------

    def _show_module(self, path: str) -> None:
        self.current = path
        table = self.query_one("#table", DataTable)
        entries, total = self.tree_data.rows(path)
        self.rows = {e.key: e for e in entries}
        cut = len(path) + 1 if path else 0
        cells = [_table_row(e, e.key[cut:], self.data.report is not None) for e in entries]
        headers = TABLE_HEADERS if self.data.report is None else DIFF_HEADERS
        # columns anew, sized here: widths follow this module's keys, not the longest ever shown
        table.clear(columns=True)
        for i, header in enumerate(headers):
            table.add_column(header, width=min(MAX_COLUMN, max([len(header), *(len(row[i]) for row in cells)])))
        for e, row in zip(entries, cells):
            table.add_row(*row, key=e.key)
        shown = (
            f"{len(entries)} of {total} tensors (/ to filter)"
            if total > len(entries)
            else f"{total} tensor{'s' * (total != 1)}"
        )
        table.border_title = f"{path or '(all)'} · {shown}"
        if entries:
            self._show_details(entries[0])
        else:
            self.query_one("#details", Static).update("no tensors here" + (" match the filter" if self.pattern else ""))

    @on(DataTable.RowHighlighted, "#table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        entry = self.rows.get(str(event.row_key.value))
        if entry is not None:
            self._show_details(entry)

    def _selected(self) -> Entry | None:
        table = self.query_one("#table", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return self.rows.get(str(key))

    def _show_details(self, e: Entry) -> None:
        self.query_one("#details", Static).update(_details_text(e, self.stats.get(e.key)))

    # --- actions -------------------------------------------------------------------------------------

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("-shown")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.pattern = event.value
        self._reselect()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        # the filter stays in force (the tree's bottom border names it); / edits it again
        self.query_one("#filter", Input).remove_class("-shown")
        self.query_one("#tree", Tree).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("-shown")
        if box.value:
            box.value = ""  # Input.Changed re-selects
        self.query_one("#tree", Tree).focus()

    def action_sort(self) -> None:
        order = SORTS[(SORTS.index(self.tree_data.sort) + 1) % len(SORTS)]
        self.tree_data = self.tree_data.with_sort(order)
        self._fill_tree()
        self._show_module("")

    def action_differences(self) -> None:
        self.differences_only = not self.differences_only
        self._reselect()

    def _reselect(self) -> None:
        self.tree_data = self.tree_data.with_selection(self.tree_data.select(self.pattern, self.differences_only))
        self._fill_tree()
        self._show_module("")

    def action_summary(self) -> None:
        self.push_screen(SummaryScreen(_summary_text(self.data, self.scan_result)))

    def action_plan(self) -> None:
        if self.data.report is not None:
            self.push_screen(PlanScreen(self.data.report))

    def action_values(self) -> None:
        entry = self._selected()
        if entry is None:
            return
        from ..values import has_bytes

        if entry.ref is None or not has_bytes(entry.ref):
            self.notify(f"{entry.key}: no stored values to read", severity="warning")
            return
        if entry.key in self.stats:
            return
        self.stats[entry.key] = "reading values..."
        self._show_details(entry)
        self._read_stats(entry)

    @work(thread=True, exclusive=False, group="stats")
    def _read_stats(self, entry: Entry) -> None:
        from ..errors import CkptError
        from ..values import FileCache, tensor_stats

        assert entry.ref is not None
        try:
            with FileCache() as files:
                result: Any = tensor_stats(entry.ref, files)
        except CkptError as exc:
            result = f"cannot read values: {exc}"
        self.call_from_thread(self._stats_ready, entry, result)

    def _stats_ready(self, entry: Entry, result: Any) -> None:
        self.stats[entry.key] = result
        current = self._selected()
        if current is not None and current.key == entry.key:
            self._show_details(entry)

    @work(thread=True, group="scan")
    def _run_scan(self) -> None:
        from ..errors import CkptError
        from ..scan import scan

        try:
            result: Any = scan(self.data.files)
        except CkptError as exc:
            result = str(exc)
        self.call_from_thread(self._scan_ready, result)

    def _scan_ready(self, result: Any) -> None:
        self.scan_result = result
        header = self.query_one("#header", Static)
        header.update(self._header_text())
        header.set_class(isinstance(result, str) or not result.ok and _worst(result) in ("unsafe", "broken"), "-unsafe")

    def _header_text(self) -> Text:
        s = self.data.summary
        more = len(s.candidates) - 1
        text = Text.assemble((s.path, "bold"), f" · {s.format} · ", _scan_line(self.scan_result))
        text.append(
            f"\n{s.tensors} tensors · {human_count(s.parameters)} parameters · {human_bytes(s.tensor_bytes)}"
            f" · state dict {s.state_dict}" + (f" (+{more} more: i)" if more > 0 else "")
        )
        report = self.data.report
        if report is not None:
            c = report.counts
            text.append(f"\nvs {report.target.rstrip('/').rsplit('/', 1)[-1]}: ")
            for word, n, status in (
                ("missing", c.missing, MISSING),
                ("unexpected", c.unexpected, UNEXPECTED),
                ("shape", c.shape_mismatches, SHAPE),
                ("dtype", c.dtype_differences, DTYPE),
            ):
                text.append(f"{n} {word} ", STATUS_STYLE[status] if n else "dim")
            text.append(
                "· loads strictly" if report.loads_strictly else "· fails a strict load (p)",
                "green" if report.loads_strictly else "bold red",
            )
        return text


def _worst(report: Any) -> str:
    from ..scan import SEVERITY_ORDER

    verdicts = {f.verdict for f in report.files}
    return next((v for v in SEVERITY_ORDER if v in verdicts), "safe")


def _scan_line(result: Any, on_red: bool = True) -> Text:
    """``scan: safe`` / ``scan: UNSAFE (os.system)``, the verdict ``ckpt scan`` gives the same files.

    ``on_red``: drawn on the header's red background, so not red itself.
    """
    if result is None:
        return Text("scan: running...", "dim")
    if isinstance(result, str):
        return Text(f"scan: failed ({result})", "bold")
    worst = _worst(result)
    names = list(dict.fromkeys(x.name for f in result.files for x in f.findings))
    shown = f" ({', '.join(names[:2])}{' ...' if len(names) > 2 else ''})" if names else ""
    word = worst.upper() if worst in ("unsafe", "broken") else worst
    style = VERDICT_STYLE.get(worst, "") if on_red or worst not in ("unsafe", "broken") else "bold red"
    return Text(f"scan: {word}{shown}", style)


TABLE_HEADERS = ("key", "shape", "dtype", "size", "shared")
DIFF_HEADERS = ("status", "key", "checkpoint", "target")
MAX_COLUMN = 48


def _table_row(e: Entry, name: str, diff_mode: bool) -> list[Text]:
    """One row of the tensor table: ``name`` is the key relative to the module shown."""
    if not diff_mode:
        shared = ("= " + ", ".join(e.shared_with)) if e.shared_with else ""
        return [Text(c) for c in (name, shape_str(e.shape), e.dtype, human_bytes(e.nbytes), shared)]
    status = e.status or ""
    return [
        Text(STATUS_WORD.get(status, status), STATUS_STYLE.get(status, "")),
        Text(name),
        Text(_side(e.ref.shape if e.ref else None, e.ref.dtype if e.ref else None)),
        Text(_side(e.target_shape, e.target_dtype)),
    ]


def _side(shape: tuple[int, ...] | None, dtype: str | None) -> str:
    return "-" if shape is None else f"{shape_str(shape)} {dtype}"


def _details_text(e: Entry, stats: Any = None) -> Text:
    """The selected tensor: layout in storage and, once read, its values' statistics."""
    text = Text(e.key, "bold")
    if e.status is not None:
        text.append(f"  {STATUS_WORD.get(e.status, e.status)}", STATUS_STYLE.get(e.status, ""))
    ref = e.ref
    if ref is None:
        text.append(f"\nonly in the target: {_side(e.target_shape, e.target_dtype)}")
        return text
    text.append(f"\n{shape_str(ref.shape)} {ref.dtype} · {ref.numel:,} parameters · {human_bytes(ref.nbytes)}")
    text.append(
        f"\nstride {shape_str(ref.stride)}{'' if ref.is_contiguous else ' (not contiguous)'}"
        f" · storage offset {ref.storage_offset}"
    )
    offset = "no stored bytes" if ref.offset is None else f"file offset {ref.offset:,}"
    text.append(f"\nstorage {ref.storage.rpartition('#')[2]} ({human_bytes(ref.storage_nbytes)}) · {offset}")
    if e.shared_with:
        text.append(f"\nshares storage with {', '.join(e.shared_with)}", "yellow")
    if e.status is not None and e.target_shape is not None and e.status != MATCHED:
        text.append(f"\ntarget: {_side(e.target_shape, e.target_dtype)}")
    if stats is None:
        text.append("\nv: read its values (min, max, mean, std, NaN and Inf counts)", "dim")
    elif isinstance(stats, str):
        text.append(f"\n{stats}", "dim")
    else:
        bad = stats.nan + stats.inf
        text.append(
            f"\nmin {_num(stats.min)} · max {_num(stats.max)} · mean {_num(stats.mean)} · std {_num(stats.std)}"
        )
        text.append(f" · NaN {stats.nan} · Inf {stats.inf}", "bold red" if bad else "")
    return text


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _summary_text(data: BrowseData, scan_result: Any = None) -> Text:
    s = data.summary
    text = Text("summary\n\n", "bold")
    rows = [
        ("file", s.path),
        ("format", s.format),
        ("size", f"{human_bytes(s.file_size)} ({s.file_size:,} bytes)"),
        ("tensors", f"{s.tensors} · {s.parameters:,} parameters · {human_bytes(s.tensor_bytes)}"),
        ("state dict", s.state_dict),
    ]
    if len(s.files) > 1:
        rows.append(("files", f"{len(s.files)} shards: " + ", ".join(f.rsplit("/", 1)[-1] for f in s.files)))
    for c in s.candidates:
        chosen = " (shown)" if c.path == s.state_path else " (--key " + (c.path or "''") + ")"
        rows.append(("candidate", f"{c.path or '<top level>'}: {c.tensors} tensors{chosen}"))
    for name, value in s.extras.items():
        rows.append((f"extra {name}", _short(value)))
    for name, value in s.metadata.items():
        rows.append((f"metadata {name}", _short(value)))
    if s.placeholders:
        rows.append(("objects (inert)", ", ".join(s.placeholders)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        text.append(f"{k:<{width}}  ", "bold")
        text.append(f"{v}\n")
    text.append("\n")
    text.append_text(_scan_line(scan_result, on_red=False))
    if scan_result is not None and not isinstance(scan_result, str):
        for f in scan_result.files:
            for x in f.findings:
                text.append(f"\n  {x.severity:<10} {x.name}: {x.reason}", "red" if x.severity == "unsafe" else "")
    text.append("\n\nescape: close", "dim")
    return text


def _short(value: object) -> str:
    out = value if isinstance(value, str) else json.dumps(value, default=str)
    return out if len(out) <= 200 else out[:197] + "..."


def _plan_text(report: DiffReport) -> Text:
    c = report.counts
    text = Text(f"fix plan: {report.source} -> {report.target}\n\n", "bold")
    text.append(
        f"matched {c.matched}, missing {c.missing}, unexpected {c.unexpected}, "
        f"shape mismatches {c.shape_mismatches}, dtype differences {c.dtype_differences}\n\n"
    )
    if report.loads_strictly:
        text.append("loads strictly: load_state_dict(strict=True) would succeed; nothing to fix\n", "green")
    plan = report.plan
    for step in plan.steps:
        text.append(f"- {step.operation['op']}: ", "bold")
        text.append(f"{step.reason}\n")
    for note in plan.notes:
        text.append(f"! {note}\n", "yellow")
    if plan.command:
        text.append("\n")
        text.append(plan.command, "bold cyan")
        text.append("\n")
        if not plan.resolves:
            text.append("(this leaves differences that only an --arch target can fill)\n", "yellow")
        text.append("\nc: copy the command · m: quit and print it · escape: close", "dim")
    else:
        text.append("\nescape: close", "dim")
    return text
