"""What every benchmark case reports (a ``Ratio`` measured in one run) and the config it runs on."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class Ratio:
    case: str
    what: str
    numerator_s: float
    denominator_s: float
    ratio: float
    note: str = ""
    id: str = ""  # stable row id in the JSON (``python -m engine bench --table`` reads it)

    def line(self) -> str:
        return f"{self.case:9} {self.what:58} {self.ratio:8.2f}x   ({self.numerator_s * 1000:8.1f} ms / {self.denominator_s * 1000:8.1f} ms){'  ' + self.note if self.note else ''}"


def _seconds(value: float) -> str:
    return f"{value * 1e6:.0f} µs" if value < 0.01 else f"{value * 1000:.1f} ms"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README performance table for the rows of a ``bench --out`` JSON file."""
    lines = ["| row | what | ratio | measured | note |", "|---|---|---:|---|---|"]
    for row in rows:
        row_id = row.get("id") or row.get("case", "")
        measured = f"{_seconds(row['numerator_s'])} / {_seconds(row['denominator_s'])}"
        note = str(row.get("note", "")).replace("|", "/")
        lines.append(f"| `{row_id}` | {row['what']} | {row['ratio']:.2f}x | {measured} | {note} |")
    return "\n".join(lines)


def alternate(a: Callable[[], Any], b: Callable[[], Any], trials: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, timed alternately after two warm-ups each."""
    for _ in range(2):
        a(), b()
    ta, tb = [], []
    for _ in range(trials):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def write_bench_config(root: Path, model_dir: Path) -> Path:
    """A config for the tiny model under ``root`` (CPU, 64 px, data in ``root``)."""
    from engine.generation.tiny import write_tiny_config

    return write_tiny_config(root, model_dir)
