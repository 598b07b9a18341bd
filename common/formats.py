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
