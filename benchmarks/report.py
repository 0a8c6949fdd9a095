"""What the benchmark scripts share: timing (warm-up rounds, then timed rounds that
alternate the things compared), the median and 90th percentile, the JSON file and the
terminal table. Each script keeps its own measurements, flags and output format.

The timing and statistics are the package's own (``riffusion_engine.engine.tools.measure``,
as ``riffusion-engine bench`` uses them); this module adds the file and the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riffusion_engine.engine.tools.measure import (
    Round,
    Rounds,
    alternate,
    cpu_model,
    environment,
    summary,
    timed,
)

__all__ = [
    "Column",
    "Round",
    "Rounds",
    "Table",
    "alternate",
    "cpu_model",
    "environment",
    "summary",
    "timed",
    "write_json",
]


def write_json(path: str | Path, report: dict[str, Any]) -> Path:
    """``report`` as indented JSON at ``path`` (its folder made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class Column:
    """One column of a terminal table."""

    title: str  # the header
    width: int  # characters, the value padded to it
    spec: str = ""  # the value's format spec: ".3f", "d"; "" for str()
    suffix: str = ""  # written right after the value, inside the width ("x")
    left: bool = False  # left-aligned (names); else right-aligned (numbers)

    def cell(self, value: Any, *, header: bool = False) -> str:
        text = value if header else f"{value:{self.spec}}{self.suffix}"
        return f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}"


@dataclass(frozen=True)
class Table:
    """A table printed a line at a time: the header, then each row as it is measured."""

    columns: Sequence[Column]
    sep: str = ""  # between cells

    def header(self) -> str:
        return self.sep.join(c.cell(c.title, header=True) for c in self.columns)

    def row(self, *values: Any) -> str:
        if len(values) != len(self.columns):
            raise ValueError(f"{len(self.columns)} columns, {len(values)} values")
        return self.sep.join(c.cell(v) for c, v in zip(self.columns, values, strict=True))

    def format(self, rows: Sequence[Sequence[Any]]) -> str:
        return "\n".join([self.header(), *(self.row(*r) for r in rows)])
