"""TurboQuant: configuration, encode/decode, and the projected-domain attention primitives.

One :class:`TurboQuant` codes vectors of ``dim`` channels. The channels are split into *parts*
(one part, or an outlier part and a regular part for fractional ``bits``); each part is rotated
by its own seeded rotation and coded by

- **TurboQuant_mse** (default): every coordinate of the rotated unit vector ``u = y/‖y‖`` gets
  the nearest centroid of the ``b``-bit Lloyd–Max codebook; one float16 scale per part,
  ``‖y‖/‖c[codes]‖`` (``norm="corrected"``: the decoded vector has the true norm) or ``‖y‖``
  (``norm="plain"``, the paper's form);
- **TurboQuant_prod** (``qjl=True``): the (b−1)-bit MSE stage, then the 1-bit QJL sketch
  ``sign(S r)`` of the residual ``r = y − ŷ_mse`` with a seeded Gaussian ``S`` (n×n), plus
  ``γ = ‖r‖`` as a second float16 scale. ``<q, x̂> = <q, x̂_mse> + γ·sqrt(π/2)/n·<S q, sign(S r)>``
  is an unbiased estimate of ``<q, x>``.

Code row layout (``code_bytes`` = B): for each part in order, its MSE codes packed at its
width, then (prod) its sign bits packed at 1 bit; every run starts on a byte boundary.
Scale row (``num_scales`` = P, float16): for each part, its MSE scale then (prod) its ``γ``.
Projected domain (``Dp``): for each part, its rotated coordinates then (prod) its sketch
coordinates. See :mod:`tqedge.codec.segments`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from tqedge.codec import kernels as K
from tqedge.codec.codebook import Codebook, get_codebook
from tqedge.codec.config import CodecConfig, Part, bytes_per_token, select_outlier_channels
from tqedge.codec.rotation import Rotation, gaussian_sketch, make_rotation
from tqedge.codec.segments import Segment, build_table
from tqedge.errors import TqedgeError

log = logging.getLogger(__name__)

__all__ = ["CodecConfig", "TurboQuant", "bytes_per_token", "select_outlier_channels", "derive_seed"]

F16_MAX = float(np.finfo(np.float16).max)


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed derived from ``seed`` and integer keys (e.g. layer, kind, part)."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0])


@dataclass
class _PartCoder:
    """The runtime objects of one part."""

    spec: Part
    channels: np.ndarray  # (n,) int64
    rotation: Rotation
    codebook: Codebook | None  # MSE codebook, None for pure QJL (bits 1 with qjl)
    sketch: np.ndarray | None  # (n, n) float32 S, prod only
    mse_seg: Segment | None
    qjl_seg: Segment | None


class TurboQuant:
    """Encoder/decoder and kernel front-end for one :class:`CodecConfig`.

    Attributes:
        config: the configuration.
        code_bytes: packed code bytes per vector (B).
        num_scales: float16 scales per vector (P).
        bytes_per_vector: ``code_bytes + 2 · num_scales``, exact.
        projected_dim: length of the projected domain (Dp; = dim, or 2·dim with QJL).
    """

    def __init__(self, config: CodecConfig):
        if not isinstance(config, CodecConfig):
            raise TqedgeError(f"TurboQuant needs a CodecConfig, got {type(config).__name__}")
        self.config = config
        self.dim = config.dim
        self.parts: list[_PartCoder] = []
        segments: list[Segment] = []
        byte_off = dim_off = scale_idx = 0
        for idx, part in enumerate(config.parts()):
            n = len(part.channels)
            kind = config.rotation if (n & (n - 1)) == 0 else "dense"  # Hadamard needs 2^k
            rot = make_rotation(kind, n, derive_seed(config.seed, idx, 0))
            cb = get_codebook(n, part.mse_bits) if part.mse_bits else None
            mse_seg = qjl_seg = sketch = None
            if cb is not None:
                mse_seg = Segment(part.mse_bits, n, byte_off, dim_off, scale_idx, cb.centroids)
                byte_off += (n * part.mse_bits + 7) // 8
                dim_off += n
                scale_idx += 1
            if part.qjl:
                sketch = gaussian_sketch(n, derive_seed(config.seed, idx, 1)).astype(np.float32)
                c = math.sqrt(math.pi / 2) / n
                qjl_seg = Segment(1, n, byte_off, dim_off, scale_idx, np.array([-c, c]))
                byte_off += (n + 7) // 8
                dim_off += n
                scale_idx += 1
            segments += [s for s in (mse_seg, qjl_seg) if s is not None]
            chans = np.asarray(part.channels, dtype=np.int64)
            self.parts.append(_PartCoder(part, chans, rot, cb, sketch, mse_seg, qjl_seg))
        self.segments = build_table(segments)
        self.code_bytes = byte_off
        self.num_scales = scale_idx
        self.bytes_per_vector = self.code_bytes + 2 * self.num_scales
        self.projected_dim = dim_off
        assert self.bytes_per_vector == config.bytes_per_vector  # config math == built layout
        self._identity = len(self.parts) == 1  # one part holding channels 0..d-1 in order

    def __repr__(self) -> str:
        return f"TurboQuant({self.config}, bytes_per_vector={self.bytes_per_vector})"

    # -- encode / decode -------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Quantize vectors.

        Args:
            x: float array (N, dim).

        Returns:
            codes uint8 (N, code_bytes), scales float16 (N, num_scales).
        """
        x = self._check_rows(x, self.dim, "x")
        n = x.shape[0]
        codes = np.zeros((n, self.code_bytes), dtype=np.uint8)
        scales = np.zeros((n, self.num_scales), dtype=np.float16)
        for pc in self.parts:
            xp = x if self._identity else x[:, pc.channels]  # (N, n)
            y = pc.rotation.apply(xp)  # (N, n) float32
            resid = y
            if pc.mse_seg is not None:
                norm = np.linalg.norm(y.astype(np.float64), axis=1)  # (N,)
                u = (y / np.where(norm > 0, norm, 1.0)[:, None]).astype(np.float32)  # (N, n) unit rows
                idx = K.quantize(u, pc.codebook.boundaries)  # (N, n) uint8
                K.pack_into(idx, pc.mse_seg.bits, codes, pc.mse_seg.byte_off)
                c = pc.codebook.centroids[idx]  # (N, n) float64
                if self.config.norm == "corrected":
                    scale = norm / np.linalg.norm(c, axis=1)
                else:
                    scale = norm
                s16 = self._to_f16(scale)  # (N,)
                scales[:, pc.mse_seg.scale_idx] = s16
                resid = y - (s16.astype(np.float64)[:, None] * c).astype(np.float32)  # (N, n)
            if pc.qjl_seg is not None:
                gamma = np.linalg.norm(resid.astype(np.float64), axis=1)  # (N,)
                z = resid @ pc.sketch.T  # (N, n) = S r per row
                signs = K.quantize(np.ascontiguousarray(z), np.zeros(1))  # 1 where S r ≥ 0
                K.pack_into(signs, 1, codes, pc.qjl_seg.byte_off)
                scales[:, pc.qjl_seg.scale_idx] = self._to_f16(gamma)
        return codes, scales

    def decode(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Reconstruct vectors: codes (N, B), scales (N, P) → (N, dim) float32."""
        blk = self.dequantize_projected(codes[None], scales[None])[0]  # (N, Dp)
        return self.unproject(blk)

    # -- projected domain ------------------------------------------------------------------
    def project_query(self, q: np.ndarray) -> np.ndarray:
        """Map queries into the projected domain: (..., dim) → (..., Dp) float32."""
        q = np.asarray(q, dtype=np.float32)
        if q.shape[-1] != self.dim:
            raise TqedgeError(f"query has last dimension {q.shape[-1]}, the codec expects {self.dim}")
        out = []
        for pc in self.parts:
            qr = pc.rotation.apply(q if self._identity else q[..., pc.channels])  # (..., n)
            if pc.mse_seg is not None:
                out.append(qr)
            if pc.qjl_seg is not None:
                out.append(qr @ pc.sketch.T)  # (..., n) = S R q
        return np.ascontiguousarray(np.concatenate(out, axis=-1), dtype=np.float32)

    def unproject(self, acc: np.ndarray) -> np.ndarray:
        """Map projected-domain sums back to channels: (..., Dp) → (..., dim) float32."""
        acc = np.asarray(acc, dtype=np.float32)
        if acc.shape[-1] != self.projected_dim:
            raise TqedgeError(f"projected array has last dimension {acc.shape[-1]}, expected {self.projected_dim}")
        out = np.zeros((*acc.shape[:-1], self.dim), dtype=np.float32)
        for pc in self.parts:
            n = len(pc.channels)
            a = np.zeros((*acc.shape[:-1], n), dtype=np.float32)
            if pc.mse_seg is not None:
                a += acc[..., pc.mse_seg.dim_off : pc.mse_seg.dim_off + n]
            if pc.qjl_seg is not None:
                a += acc[..., pc.qjl_seg.dim_off : pc.qjl_seg.dim_off + n] @ pc.sketch  # S^T v
            if self._identity:
                out = pc.rotation.inverse(a)
            else:
                out[..., pc.channels] = pc.rotation.inverse(a)
        return out

    # -- kernels ---------------------------------------------------------------------------
    def scores(self, qp: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """``<q, x̂_n>`` for projected queries: qp (H, G, Dp), codes (H, N, B), scales (H, N, P) → (H, G, N)."""
        codes, s16 = self._check_store(codes, scales)
        qp = np.ascontiguousarray(qp, dtype=np.float32)
        if qp.ndim != 3 or qp.shape[0] != codes.shape[0] or qp.shape[2] != self.projected_dim:
            raise TqedgeError(f"projected queries must be (H={codes.shape[0]}, G, {self.projected_dim}), got {qp.shape}")
        t = self.segments
        return K.scores(qp, codes, s16, t.table, t.cb, t.lut)

    def value_sum(self, p: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Weighted sum of coded vectors in the projected domain: p (H, G, N) → (H, G, Dp); unproject after."""
        codes, s16 = self._check_store(codes, scales)
        p = np.ascontiguousarray(p, dtype=np.float32)
        if p.ndim != 3 or p.shape[0] != codes.shape[0] or p.shape[2] != codes.shape[1]:
            raise TqedgeError(f"weights must be (H={codes.shape[0]}, G, N={codes.shape[1]}), got {p.shape}")
        t = self.segments
        return K.value_sum(p, codes, s16, t.table, t.cb, t.lut, t.dp)

    def dequantize_projected(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Decoded vectors in the projected domain: (H, N, B), (H, N, P) → (H, N, Dp) float32."""
        codes, s16 = self._check_store(codes, scales)
        t = self.segments
        return K.dequantize(codes, s16, t.table, t.cb, t.lut, t.dp)

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _check_rows(x: np.ndarray, dim: int, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != dim:
            raise TqedgeError(f"{name} must be (N, {dim}), got shape {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise TqedgeError(f"{name} holds NaN or infinite values")
        return x

    def _check_store(self, codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = np.asarray(codes)
        scales = np.asarray(scales)
        if codes.dtype != np.uint8 or codes.ndim != 3 or codes.shape[2] != self.code_bytes:
            raise TqedgeError(f"codes must be uint8 (H, N, {self.code_bytes}), got {codes.dtype} {codes.shape}")
        if scales.dtype != np.float16 or scales.shape != (*codes.shape[:2], self.num_scales):
            raise TqedgeError(
                f"scales must be float16 {(*codes.shape[:2], self.num_scales)}, got {scales.dtype} {scales.shape}"
            )
        # slices of a cache buffer are fine as long as each row is contiguous: no copy
        if codes.strides[-1] != 1:
            codes = np.ascontiguousarray(codes)
        if scales.strides[-1] != 2:
            scales = np.ascontiguousarray(scales)
        return codes, scales.view(np.uint16)

    @staticmethod
    def _to_f16(v: np.ndarray) -> np.ndarray:
        if np.any(v > F16_MAX):
            log.warning("TurboQuant scale above the float16 range (%.3g); clipped", float(np.max(v)))
            v = np.minimum(v, F16_MAX)
        return v.astype(np.float16)
