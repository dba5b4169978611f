"""Readable tables and JSON reports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from adapruner.staging import staged_file

REPORT_FORMAT = "adapruner.output.report/1"  # the `format` key of every report.json the commands write


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns (floats to 3 significant decimals)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write JSON through a temporary file in the same directory, then rename over `path`."""
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
