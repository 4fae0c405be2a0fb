"""Double-quantized NF4 absmax scales (``--weights nf4-dq``): the side file and its expansion.

QLoRA's double quantization stores the fp32 absmax of every 64-weight NF4 block as an 8-bit
code with fp32 constants per :data:`DQ_BLOCK` (256) absmax values. Here the 8-bit code is
logarithmic — absmax values are positive and spread over decades, so relative precision is
what matters (bitsandbytes' dynamic 8-bit map serves the same purpose) — with two fp32 per
block, the log of its smallest nonzero absmax and the log step::

    absmax[i] = 0                                   if code[i] == 0
              = exp(lo[b] + (code[i] - 1) * step[b])  else, b = i // 256, code uint8 1..255

so the relative error is at most ``exp(step / 2) - 1`` (≈ 0.5 % when a block's absmax span a
factor of e^2.5). ``MatMulBnb4`` reads fp32 absmax, so the runtime expands the codes once at
load and hands them to onnxruntime as initializers (``SessionOptions.add_external_initializers``):
the saving is on disk (0.5 → 0.13 bits per weight for the scales), not in memory.

The side file is an ``.npz`` (read with ``allow_pickle=False``) of concatenated arrays:
``names`` (str), ``segments`` (int32: the segment file that declares each initializer, -1 for
none), ``sizes`` (int64: absmax values per tensor), ``codes`` (uint8), ``scales`` (float32
(blocks, 2): ``[lo, step]``, ``ceil(size/256)`` blocks per tensor), ``block`` (int64 scalar).
In the graphs each such initializer is a placeholder with external data at :data:`PLACEHOLDER`
(never a file), so a graph loaded without the expansion fails loudly instead of running.

NumPy only: the runtime half imports this without onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tqedge.errors import TqedgeError

DQ_BLOCK = 256  # absmax values per second-level pair of fp32 constants (QLoRA: 256)
DQ_FILE = "absmax-dq.npz"  # next to weights.bin
PLACEHOLDER = "absmax-dq.expanded-at-load"  # external-data location of the placeholders


def encode(absmax: np.ndarray, block: int = DQ_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Double-quantize fp32 ``absmax`` (n,) ≥ 0 → (uint8 codes (n,), fp32 [lo, step] (ceil(n/block), 2))."""
    a = np.asarray(absmax, np.float32).reshape(-1)
    nb = -(-a.size // block)
    ap = np.zeros(nb * block, np.float32)
    ap[: a.size] = a
    ap = ap.reshape(nb, block)
    pos = ap > 0
    logs = np.log(np.where(pos, ap, 1.0)).astype(np.float64)
    lo = np.where(pos, logs, np.inf).min(1)
    hi = np.where(pos, logs, -np.inf).max(1)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    step = np.where(hi > lo, (hi - lo) / 254, 1.0)
    codes = np.where(pos, np.clip(np.round((logs - lo[:, None]) / step[:, None]), 0, 254) + 1, 0).astype(np.uint8)
    return codes.reshape(-1)[: a.size], np.stack([lo, step], 1).astype(np.float32)


def expand(codes: np.ndarray, scales: np.ndarray, block: int = DQ_BLOCK) -> np.ndarray:
    """fp32 absmax (n,) from :func:`encode`'s output."""
    sc = np.repeat(np.asarray(scales, np.float32).reshape(-1, 2), block, axis=0)[: codes.size]
    c = codes.astype(np.float32)
    return np.where(codes > 0, np.exp(sc[:, 0] + (c - 1) * sc[:, 1]), 0).astype(np.float32)


def write(path: str | Path, tensors: dict[str, tuple[int, np.ndarray]], block: int = DQ_BLOCK) -> None:
    """Write the side file: ``tensors`` maps initializer name → (segment index, fp32 absmax)."""
    names = list(tensors)
    enc = [encode(tensors[n][1], block) for n in names]
    with open(path, "wb") as f:
        np.savez(f, names=np.array(names, dtype=str), segments=np.array([tensors[n][0] for n in names], np.int32),
                 sizes=np.array([e[0].size for e in enc], np.int64),
                 codes=np.concatenate([e[0] for e in enc]) if enc else np.zeros(0, np.uint8),
                 scales=np.concatenate([e[1] for e in enc]) if enc else np.zeros((0, 2), np.float32),
                 block=np.int64(block))


def read(path: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """Expand the side file: segment index → {initializer name: fp32 absmax}.

    Raises:
        TqedgeError: a missing or malformed file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            names, segments, sizes = z["names"], z["segments"], z["sizes"]
            codes, scales, block = z["codes"], z["scales"].reshape(-1, 2), int(z["block"])
    except (OSError, KeyError, ValueError) as e:
        raise TqedgeError(f"cannot read double-quantized scales {path}: {e}") from None
    if not len(names) == len(segments) == len(sizes) or int(sizes.sum()) != codes.size:
        raise TqedgeError(f"double-quantized scales {path} are inconsistent (sizes do not add up)")
    out: dict[int, dict[str, np.ndarray]] = {}
    c = s = 0
    for name, seg, n in zip(names, segments, sizes):
        nb = -(-int(n) // block)
        if s + nb > len(scales):
            raise TqedgeError(f"double-quantized scales {path} are inconsistent (too few scales)")
        out.setdefault(int(seg), {})[str(name)] = expand(codes[c:c + n], scales[s:s + nb], block)
        c, s = c + int(n), s + nb
    return out
