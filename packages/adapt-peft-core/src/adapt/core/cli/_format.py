"""Plain-text formatting shared by the commands: aligned tables, sizes, element counts."""

from __future__ import annotations


def table(rows: list[list[str]], headers: list[str]) -> str:
    """``rows`` under ``headers``, columns padded to their widest cell, a dashed rule under
    the headers, trailing spaces stripped."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(s.rstrip() for s in out)


def human_bytes(n: float) -> str:
    """``n`` bytes as ``"512 B"``, ``"15.0 KiB"``, ``"1.2 MiB"`` or ``"3.4 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def numel(shape: tuple[int, ...]) -> int:
    """The number of elements of a tensor of ``shape``."""
    count = 1
    for d in shape:
        count *= d
    return count
