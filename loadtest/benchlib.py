"""Small helpers shared by the benchmark scripts (run as `python loadtest/bench_*.py`,
so this directory is on sys.path)."""

from __future__ import annotations

import json
import pathlib
from statistics import quantiles


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method; the value itself for one sample)."""
    return quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def table(head: list[str], rows: list[list]) -> None:
    """Print rows under a header, floats with one decimal, columns aligned."""
    cells = [head] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for r in cells[:1] + [["-" * x for x in w]] + cells[1:]:
        print(r[0].ljust(w[0]) + "".join(c.rjust(x + 2) for c, x in zip(r[1:], w[1:])))


def save(result: dict, out: pathlib.Path) -> None:
    """Write the JSON results (raw samples + summary), creating the directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
