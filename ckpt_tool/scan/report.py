"""What a scan returns: findings, the verdict on each file, the report over many."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..formats.pickle_vm import Trace
from .policy import BROKEN, SAFE, SKIPPED


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
