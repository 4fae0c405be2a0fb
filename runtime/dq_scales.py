"""Double-quantized NF4 absmax scales (``--weights nf4-dq``): the side file and its expansion.

QLoRA's double quantization: the fp32 absmax of every 64-weight NF4 block is stored as an
8-bit code, with one fp32 scale per :data:`DQ_BLOCK` (256) absmax values and one fp32 offset
(their mean) per tensor::

    absmax[i] ≈ offset + scale[i // 256] * code[i] / 127      (code int8, |code| ≤ 127)

(a linear 8-bit code after subtracting the mean, where bitsandbytes uses its dynamic 8-bit
map). ``MatMulBnb4`` reads fp32 absmax, so the runtime expands the codes once at load and hands
them to onnxruntime as initializers (``SessionOptions.add_external_initializers``): the saving
is on disk (0.5 → 0.13 bits per weight for the scales), not in memory.

The side file is an ``.npz`` (read with ``allow_pickle=False``) of concatenated arrays:
``names`` (str), ``segments`` (int32: the segment file that declares each initializer),
``sizes`` (int64: absmax values per tensor), ``codes`` (int8), ``scales`` (float32,
``ceil(size/256)`` per tensor), ``offsets`` (float32, one per tensor), ``block`` (int64 scalar).
In the graphs each such initializer is a placeholder with external data at :data:`PLACEHOLDER`
(never a file), so a graph loaded without the expansion fails loudly instead of running.

NumPy only: the runtime half imports this without onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tqedge.errors import TqedgeError

DQ_BLOCK = 256  # absmax values per second-level fp32 scale (QLoRA)
DQ_FILE = "absmax-dq.npz"  # next to weights.bin
PLACEHOLDER = "absmax-dq.expanded-at-load"  # external-data location of the placeholders


def encode(absmax: np.ndarray, block: int = DQ_BLOCK) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Double-quantize fp32 ``absmax`` (n,) → (int8 codes (n,), fp32 scales (ceil(n/block),), fp32 offset)."""
    a = np.asarray(absmax, np.float32).reshape(-1)
    offset = np.float32(a.mean()) if a.size else np.float32(0)
    x = a - offset
    nb = -(-a.size // block)
    xp = np.zeros(nb * block, np.float32)
    xp[: a.size] = x
    scale = np.abs(xp.reshape(nb, block)).max(1).astype(np.float32)  # (nb,)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.round(xp.reshape(nb, block) / safe[:, None] * 127), -127, 127).astype(np.int8)
    return codes.reshape(-1)[: a.size], scale, offset


def expand(codes: np.ndarray, scales: np.ndarray, offset, block: int = DQ_BLOCK) -> np.ndarray:
    """fp32 absmax (n,) from :func:`encode`'s output."""
    s = np.repeat(np.asarray(scales, np.float32), block)[: codes.size]
    return (np.float32(offset) + s * (codes.astype(np.float32) / np.float32(127))).astype(np.float32)


def write(path: str | Path, tensors: dict[str, tuple[int, np.ndarray]], block: int = DQ_BLOCK) -> None:
    """Write the side file: ``tensors`` maps initializer name → (segment index, fp32 absmax)."""
    names = list(tensors)
    enc = [encode(tensors[n][1], block) for n in names]
    with open(path, "wb") as f:
        np.savez(f, names=np.array(names, dtype=str), segments=np.array([tensors[n][0] for n in names], np.int32),
                 sizes=np.array([e[0].size for e in enc], np.int64),
                 codes=np.concatenate([e[0] for e in enc]) if enc else np.zeros(0, np.int8),
                 scales=np.concatenate([e[1] for e in enc]) if enc else np.zeros(0, np.float32),
                 offsets=np.array([e[2] for e in enc], np.float32), block=np.int64(block))


def read(path: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """Expand the side file: segment index → {initializer name: fp32 absmax}.

    Raises:
        TqedgeError: a missing or malformed file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            names, segments, sizes = z["names"], z["segments"], z["sizes"]
            codes, scales, offsets, block = z["codes"], z["scales"], z["offsets"], int(z["block"])
    except (OSError, KeyError, ValueError) as e:
        raise TqedgeError(f"cannot read double-quantized scales {path}: {e}") from None
    if not (len(names) == len(segments) == len(sizes) == len(offsets)) or int(sizes.sum()) != codes.size:
        raise TqedgeError(f"double-quantized scales {path} are inconsistent (sizes do not add up)")
    out: dict[int, dict[str, np.ndarray]] = {}
    c = s = 0
    for name, seg, n, off in zip(names, segments, sizes, offsets):
        nb = -(-int(n) // block)
        if s + nb > scales.size:
            raise TqedgeError(f"double-quantized scales {path} are inconsistent (too few scales)")
        out.setdefault(int(seg), {})[str(name)] = expand(codes[c:c + n], scales[s:s + nb], off, block)
        c, s = c + int(n), s + nb
    return out
