"""Numbers as people read them: bytes in binary units, counts in SI units, durations, table figures."""
from __future__ import annotations


def human(n: int | None) -> str:
    """Bytes in binary units, e.g. 3.0 MiB."""
    if n is None:
        return "unknown"
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


def si(x: float | None, missing: str = "—") -> str:
    """Counts in SI units to 3 significant digits (tokens, parameters, FLOPs): 950, 1.23k, 45.6M, 7.89G, ..."""
    if x is None:
        return missing
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def duration(seconds: float | None, missing: str = "—") -> str:
    """Seconds as people read them: 45 s, 12 min 3 s, 2 h 5 min."""
    if seconds is None:
        return missing
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    return f"{h} h {rest // 60} min" if h else f"{rest // 60} min {rest % 60} s"
