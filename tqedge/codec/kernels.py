"""The codec kernels, Numba or NumPy, picked once at import.

Numba (:mod:`tqedge.codec.kernels_numba`) is used when it imports and ``TQEDGE_KERNELS`` is not
``numpy``; otherwise the pure-NumPy twin (:mod:`tqedge.codec.kernels_numpy`). ``BACKEND`` says
which. Both expose the same functions with the same results:

- ``quantize(vals (N, n), boundaries) -> codes uint8 (N, n)``
- ``pack_into(codes (N, n), bits, out (N, B) uint8, byte_off)``
- ``scores(qp (H, G, Dp), codes (H, N, B), scales16 (H, N, P) uint16, table, cb, lut) -> (H, G, N)``
- ``value_sum(p (H, G, N), codes, scales16, table, cb, lut, dp) -> (H, G, Dp)``
- ``dequantize(codes, scales16, table, cb, lut, dp) -> (H, N, Dp)``
- ``set_threads(n)``: threads the kernels may use when called from this thread (None: all
  usable cores; 1: serial). ``Model.forward`` sets it from ``load(threads=)``.

``table, cb, lut`` come from :class:`tqedge.codec.segments.SegmentTable`; ``scales16`` is the
float16 scale array viewed as uint16. Importing this module imports Numba but compiles nothing:
each kernel compiles (or loads from the on-disk cache) at its first call. How Numba is set up
(threading layer, parallel launches, cache directory): :mod:`tqedge.codec.numba_runtime`.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_wanted = os.environ.get("TQEDGE_KERNELS", "auto").strip().lower()

if _wanted == "numpy":
    from tqedge.codec import kernels_numpy as _impl
else:
    try:
        from tqedge.codec import numba_runtime  # before any kernel: layer, cache dir
        from tqedge.codec import kernels_numba as _impl
    except ImportError as exc:  # numba missing or broken on this platform
        if _wanted == "numba":
            raise
        log.info("numba unavailable (%s); using the NumPy kernels", exc)
        from tqedge.codec import kernels_numpy as _impl

BACKEND: str = _impl.BACKEND
quantize = _impl.quantize
pack_into = _impl.pack_into
scores = _impl.scores
value_sum = _impl.value_sum
dequantize = _impl.dequantize


def set_threads(n: int | None) -> None:
    """Threads the kernels may use when called from this thread (None: all usable cores)."""
    if BACKEND == "numba":
        numba_runtime.set_threads(n)


__all__ = ["BACKEND", "quantize", "pack_into", "scores", "value_sum", "dequantize", "set_threads"]
