"""Table and number formatting shared by the report's sections: rich tables in the terminal, Markdown-style text in
report.txt."""

from __future__ import annotations

import io

from rich import box
from rich.console import Console, Group
from rich.rule import Rule
from rich.table import Table
from rich.text import Text


def num(x: float | None, signed: bool = False) -> str:
    """A number a reader can scan: thousands separators for big values, more decimals for small ones."""
    if x is None:
        return "-"
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    sign = "+" if signed else ""
    size = abs(x)
    if size >= 1000:
        return f"{x:{sign},.1f}"
    if size >= 1:
        return f"{x:{sign}.2f}"
    if size >= 1e-3 or size == 0:
        return f"{x:{sign}.4f}"
    return f"{x:{sign}.2e}"


def ratio(x: float) -> str:
    return f"{x:,.0f}x" if x == x and x != float("inf") else str(x)


def spans(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'"""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "-"


def where(text: int, position: int, token: str) -> str:
    return f"text {text} pos {position} {token!r}"


class Style:
    def __init__(self, plain: bool):
        self.plain = plain

    def table(self, title: str | None, *columns: str, right: tuple[int, ...] = ()) -> Table:
        table = Table(
            title=Text(title) if title else None,
            box=box.MARKDOWN if self.plain else box.SIMPLE_HEAD,
            title_justify="left",
            title_style="" if self.plain else "bold",
            header_style="" if self.plain else "bold cyan",
            pad_edge=self.plain,
        )
        for index, column in enumerate(columns):
            table.add_column(Text(column), justify="right" if index in right else "left")
        return table

    def heading(self, title: str):
        return Text(f"\n## {title}\n") if self.plain else Rule(f"[bold]{title}", align="left")


def add_row(table: Table, *cells: str) -> None:
    """Cells as literal text: a token such as '[INST]' must not be read as rich markup."""
    table.add_row(*(Text(cell) for cell in cells))


def plain_text(parts: list, width: int = 140) -> str:
    """Renderables as plain UTF-8 text (no colour codes, no trailing blanks), as the report's text files hold them."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False, no_color=True, highlight=False).print(Group(*parts))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()).lstrip("\n") + "\n"
