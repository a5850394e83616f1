"""Sizes for people: every size qonnx prints goes through :func:`human_bytes`."""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: int | float) -> str:
    """``n`` bytes in binary units with one decimal: ``512 B``, ``16.1 MiB``, ``3.8 GiB`` (negative: ``-2.0 KiB``)."""
    if n < 0:
        return "-" + human_bytes(-n)
    if n < 1024:
        return f"{int(n)} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
