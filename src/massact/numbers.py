"""Numbers written for reading, shared by the conclusion (analysis) and the report."""

from __future__ import annotations


def short(x: float | None, signed: bool = False) -> str:
    """A number for reading, not for checking: 24,494.3 -> '24.5k', 1,234,567 -> '1.2M', 0.0123 -> '0.012' (three
    significant digits at most; the tables hold the exact value)."""
    if x is None:
        return "-"
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    sign = "+" if signed and x >= 0 else ""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale * 0.9995:  # 999.96 reads '1.0k', not '1000'
            return f"{sign}{x / scale:.3g}{suffix}" if abs(x) < scale * 100 else f"{sign}{x / scale:.0f}{suffix}"
    return f"{sign}{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{sign}{x:.1e}"


def size(count: int) -> str:
    """A number of bytes for reading: 1,234 -> '1.2 kB', 52,000,000 -> '52.0 MB', 6.4e9 -> '6.40 GB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}" if unit in ("TB", "GB") else f"{count / scale:.1f} {unit}"
    return f"{count} B"
