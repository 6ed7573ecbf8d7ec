"""SARIF 2.1.0, for code-scanning dashboards."""

from __future__ import annotations

import os
from typing import Any

from .policy import BROKEN, SUSPICIOUS, UNSAFE
from .report import ScanReport

_SARIF_RULES = {
    UNSAFE: ("CKPT001", "unsafe-global", "The file names a global that can run code when it is loaded.", "error"),
    SUSPICIOUS: ("CKPT002", "suspicious-global", "The file names a global that is not on the allow list.", "warning"),
    BROKEN: ("CKPT003", "broken-file", "The file cannot be parsed, or its structure contradicts itself.", "error"),
}


def sarif(report: ScanReport, version: str = "") -> dict[str, Any]:
    """The report as a SARIF 2.1.0 log: one result per finding, located at the file (and byte offset)."""
    rules = [
        {"id": rid, "name": name, "shortDescription": {"text": text}, "defaultConfiguration": {"level": level}}
        for rid, name, text, level in _SARIF_RULES.values()
    ]
    results = []
    for file in report.files:
        for f in file.findings:
            rid, _, _, level = _SARIF_RULES[f.severity]
            where = f" ({f.opcode} in {f.stream})" if f.opcode and f.stream else (f" ({f.stream})" if f.stream else "")
            location: dict[str, Any] = {"artifactLocation": {"uri": file.path.replace(os.sep, "/")}}
            if f.position is not None and (f.stream.startswith("pickle ") or f.stream in ("", "trailing data")):
                # offsets of a plain or legacy file's pickles are file offsets; an archive member's are not
                location["region"] = {"byteOffset": f.position}
            results.append(
                {
                    "ruleId": rid,
                    "level": level,
                    "message": {"text": f"{file.verdict}: {f.name}{where}: {f.reason}"},
                    "locations": [{"physicalLocation": location}],
                    "properties": {"verdict": file.verdict, "global": f.name, "stream": f.stream, "opcode": f.opcode},
                }
            )
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {"driver": {"name": "ckpt", "version": version, "rules": rules}},
                "results": results,
                "artifacts": [
                    {"location": {"uri": f.path.replace(os.sep, "/")}, "properties": {"verdict": f.verdict}}
                    for f in report.files
                ],
            }
        ],
    }
