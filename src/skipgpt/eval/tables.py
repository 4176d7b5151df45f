"""Markdown tables of results (the README's tables are made by these, never typed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["markdown_table"]

Column = tuple[str, str | Callable[[dict], object]]


def _fmt(v) -> str:
    """Floats: 3 decimals below 10, 2 up to a million, then 3 significant digits (a collapsed
    model's PPL of 1e47 stays one short cell)."""
    if isinstance(v, float):
        if abs(v) < 10:
            return f"{v:.3f}"
        return f"{v:.2f}" if abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """rows of dicts -> a markdown table; a column is (header, key or function of the row)."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(_fmt(get(r) if callable(get) else r.get(get, "")) for _, get in columns) + " |"
        for r in rows
    ]
    return "\n".join([head, rule, *body])
