"""Plain-text tables for the reports the commands print."""

from __future__ import annotations


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns two spaces apart, a rule of dashes under the headers."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])
