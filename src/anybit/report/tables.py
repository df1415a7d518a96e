"""Plain-text tables for terminal output and Markdown docs."""

from __future__ import annotations

from collections.abc import Sequence


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool = False) -> str:
    """Align ``rows`` under ``headers``; ``markdown=True`` gives a GitHub table."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    sep = " | " if markdown else "  "
    edge = ("| ", " |") if markdown else ("", "")

    def line(values):
        return edge[0] + sep.join(v.rjust(w) for v, w in zip(values, widths)) + edge[1]

    out = [line(headers)]
    out.append(line(["-" * w for w in widths]) if markdown else "  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)
