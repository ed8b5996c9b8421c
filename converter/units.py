"""Human-readable sizes and counts for messages, tables and model cards (SI units, as the Hub uses),
and lists said in one line."""

from __future__ import annotations


def human_bytes(n: float, digits: int = 2) -> str:
    """``269.03 MB``; whole bytes below 1 kB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable: TB returns


def human_count(n: float) -> str:
    """``106.17M`` parameters; plain integers below a thousand."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def first_of(items: list[str]) -> str:
    """A non-empty list said in one line: its first item, and how many more ("x (and 2 more)")."""
    return items[0] + (f" (and {len(items) - 1} more)" if len(items) > 1 else "")
