"""Plain aligned text tables for the CLI's output (eval, info): one formatter for all of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1,
                 footer: Sequence[Sequence[Any]] = ()) -> str:
    """Header, a rule, the rows, and (if given) another rule and the footer rows (totals).

    The first ``left`` columns are left-aligned (names), the rest right-aligned (numbers);
    floats print with three decimals, everything else as ``str``.
    """
    head = [str(c) for c in columns]
    body = [[_cell(v) for v in row] for row in rows]
    tail = [[_cell(v) for v in row] for row in footer]
    for row in (*body, *tail):
        if len(row) != len(head):
            raise ValueError(f"table row has {len(row)} cells, the header {len(head)}: {row}")
    widths = [max(len(r[i]) for r in (head, *body, *tail)) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(head))
    out = [line(head), rule, *map(line, body)]
    if tail:
        out += [rule, *map(line, tail)]
    return "\n".join(out)
