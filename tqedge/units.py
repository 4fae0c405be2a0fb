"""Byte sizes as people write them: ``"32MiB"``, ``"1.5 GB"``, ``"512k"``, ``4096``."""

from __future__ import annotations

import re

from tqedge.errors import TqedgeError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Parse a byte size.

    Args:
        value: an int (bytes), or a string such as ``"32MiB"``, ``"64MB"``, ``"1.5GiB"``,
            ``"512k"`` (a bare k/m/g/t means the binary unit).

    Returns:
        The size in bytes (int, rounded down).

    Raises:
        TqedgeError: the value is negative or not a size.
    """
    if isinstance(value, bool):
        raise TqedgeError(f"not a byte size: {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = _RE.match(str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise TqedgeError(
                f"not a byte size: {value!r} (use e.g. 32MiB, 64MB, 1GiB or a number of bytes)"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    if n < 0:
        raise TqedgeError(f"byte size must not be negative: {value!r}")
    return n


def format_bytes(n: int | float) -> str:
    """Format a byte count with binary units, e.g. ``33554432`` → ``"32.0 MiB"``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
