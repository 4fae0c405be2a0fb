"""Codec configuration, the channel split for fractional rates, and the byte accounting.

Everything here is pure arithmetic on the configuration (no rotation or codebook is built), so
the cache can size its buffers from a budget cheaply.

Fractional ``bits`` (e.g. 3.5) split the channels into an *outlier* part coded at
``ceil(bits)`` and a regular part at ``floor(bits)``. The outlier channels are
``outlier_channels`` when given (any count; pick them with :func:`select_outlier_channels`),
otherwise the first ``round(dim · frac(bits))`` channels, so that the average rate is ``bits``
(d=64, 3.5 → 32 channels at 4 + 32 at 3; d=128, 2.5 → 64 at 3 + 64 at 2). The paper's
"2.5-bit" setting (32 channels at 3 + 96 at 2 for d=128) is 2.25 bits of codes on average; get
it with ``bits=2.5, outlier_channels=<32 indices>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tqedge.errors import TqedgeError

NORMS = ("corrected", "plain")


@dataclass(frozen=True)
class Part:
    """A set of channels coded by one TurboQuant instance at an integer rate."""

    channels: tuple[int, ...]
    bits: int  # total bits per coordinate (MSE bits + 1 with QJL)
    qjl: bool

    @property
    def mse_bits(self) -> int:
        return self.bits - 1 if self.qjl else self.bits

    @property
    def code_bytes(self) -> int:
        n = len(self.channels)
        return (n * self.mse_bits + 7) // 8 + ((n + 7) // 8 if self.qjl else 0)

    @property
    def num_scales(self) -> int:
        return int(self.mse_bits > 0) + int(self.qjl)


@dataclass(frozen=True)
class CodecConfig:
    """How one kind of vector (keys or values of a layer) is coded.

    Args:
        dim: channels per vector (head_dim).
        bits: bits per coordinate, 1..8; fractional → outlier split (see module docstring).
        rotation: ``"hadamard"`` (parts whose size is not a power of two fall back to dense) or ``"dense"``.
        seed: seed of the rotations (and QJL sketches); each part derives its own.
        norm: ``"corrected"`` (scale ‖x‖/‖c‖) or ``"plain"`` (scale ‖x‖).
        qjl: TurboQuant_prod: (b−1)-bit MSE stage + 1-bit QJL residual sketch.
        outlier_channels: indices of the high-rate channels for fractional ``bits``.
    """

    dim: int
    bits: float = 4.0
    rotation: str = "hadamard"
    seed: int = 0
    norm: str = "corrected"
    qjl: bool = False
    outlier_channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dim, (int, np.integer)) or self.dim < 3:
            raise TqedgeError(f"codec dim must be an integer ≥ 3, got {self.dim!r}")
        try:
            bits = float(self.bits)
        except (TypeError, ValueError):
            raise TqedgeError(f"codec bits must be a number in 1..8, got {self.bits!r}") from None
        if not 1 <= bits <= 8 or not math.isfinite(bits):
            raise TqedgeError(f"codec bits must be in 1..8, got {self.bits!r}")
        if self.rotation not in ("hadamard", "dense"):
            raise TqedgeError(f"unknown rotation {self.rotation!r} (use hadamard or dense)")
        if self.norm not in NORMS:
            raise TqedgeError(f"unknown norm {self.norm!r} (use corrected or plain)")
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "qjl", bool(self.qjl))
        if self.outlier_channels is not None:
            ch = tuple(sorted({int(c) for c in self.outlier_channels}))
            if len(ch) != len(list(self.outlier_channels)):
                raise TqedgeError("outlier_channels has repeated indices")
            if ch and (ch[0] < 0 or ch[-1] >= self.dim):
                raise TqedgeError(f"outlier_channels must lie in [0, {self.dim})")
            object.__setattr__(self, "outlier_channels", ch)
        self.parts()  # validate the split now

    def parts(self) -> list[Part]:
        """The channel parts, outlier part first."""
        lo = math.floor(self.bits)
        frac = self.bits - lo
        if frac == 0:
            if self.outlier_channels is not None:
                raise TqedgeError(f"outlier_channels needs fractional bits (e.g. {lo}.5), got {lo}")
            return [self._part(tuple(range(self.dim)), lo)]
        if self.outlier_channels is not None:
            out = self.outlier_channels
        else:
            out = tuple(range(round(self.dim * frac)))
        if not 0 < len(out) < self.dim:
            raise TqedgeError(f"{self.bits} bits on {self.dim} channels leaves an empty part; pick outlier_channels")
        rest = tuple(c for c in range(self.dim) if c not in set(out))
        return [self._part(out, lo + 1), self._part(rest, lo)]

    def _part(self, channels: tuple[int, ...], bits: int) -> Part:
        if len(channels) < 3:
            raise TqedgeError(f"a codec part needs at least 3 channels, got {len(channels)}")
        return Part(channels, bits, self.qjl)

    @property
    def code_bytes(self) -> int:
        """Packed code bytes per vector."""
        return sum(p.code_bytes for p in self.parts())

    @property
    def num_scales(self) -> int:
        """float16 scales per vector."""
        return sum(p.num_scales for p in self.parts())

    @property
    def bytes_per_vector(self) -> int:
        """Exact stored bytes per vector: codes + 2 bytes per scale."""
        return self.code_bytes + 2 * self.num_scales

    @property
    def effective_bits(self) -> float:
        """Average code bits per channel (scales excluded)."""
        return sum(len(p.channels) * p.bits for p in self.parts()) / self.dim


def bytes_per_token(cfg_k: CodecConfig, cfg_v: CodecConfig, num_layers: int, num_kv_heads: int) -> int:
    """Bytes one token's compressed keys and values take across all layers and KV heads."""
    return int(num_layers) * int(num_kv_heads) * (cfg_k.bytes_per_vector + cfg_v.bytes_per_vector)


def select_outlier_channels(samples: np.ndarray, n: int) -> tuple[int, ...]:
    """The ``n`` channels with the largest RMS over calibration samples.

    Args:
        samples: array (..., d) of vectors (e.g. keys of one layer and head).
        n: how many channels to pick, 0 < n < d.

    Returns:
        Sorted channel indices.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim < 1 or x.shape[-1] < 2:
        raise TqedgeError(f"calibration samples must be (..., d) with d ≥ 2, got shape {x.shape}")
    d = x.shape[-1]
    if not 0 < n < d:
        raise TqedgeError(f"number of outlier channels must be in 1..{d - 1}, got {n}")
    rms = np.sqrt(np.mean(x.reshape(-1, d) ** 2, axis=0))  # (d,)
    top = np.argsort(-rms, kind="stable")[:n]
    return tuple(sorted(int(i) for i in top))
