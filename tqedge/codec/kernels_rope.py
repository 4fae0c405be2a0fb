"""A layer's q/k/v split with RoPE, for the native op ``RotaryQKV``: a pure Numba function
(the op: :mod:`tqedge.runtime.native_rope`).

:func:`rope_qkv` cuts the fused q/k/v projection's rows into heads, applies RoPE to q and k (HF
rotate-half, ``x*cos + concat(-x2, x1)*sin``) and copies v. It stands for 16 small standard
nodes per layer (a ``Split``, three ``Reshape``, and ``Split``, ``Neg``, ``Concat``, two ``Mul``
and an ``Add`` for each of q and k). It is compiled without fast-math, so each output is rounded as
the standard spelling's two products and their sum are (no fused multiply-add): the cut segments'
bits exactly.

Same contract as :mod:`tqedge.codec.kernels_fused`: serial, no raise (the op validates shapes
first), writes only the arrays it is given.
"""

from __future__ import annotations

from tqedge.codec.numba_runtime import njit


@njit(warm=False, nogil=True)  # no fast-math: the standard ops' rounding (see the module docstring)
def rope_qkv(qkv, cos, sin, q, k, v):
    """``qkv`` (T, (Hq + 2·Hkv)·D) float32 → ``q`` (T, Hq, D) and ``k`` (T, Hkv, D) with RoPE
    (``cos``, ``sin`` (T, D): each position's angles, both halves), ``v`` (T, Hkv, D) as is."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    half = d // 2
    for i in range(t):
        row, c, s = qkv[i], cos[i], sin[i]
        for h in range(hq + hkv):
            x = row[h * d:(h + 1) * d]
            out = q[i, h] if h < hq else k[i, h - hq]
            for j in range(half):
                out[j] = x[j] * c[j] + (-x[j + half]) * s[j]
            for j in range(half, d):
                out[j] = x[j] * c[j] + x[j - half] * s[j]
        base = (hq + hkv) * d
        for h in range(hkv):
            out = v[i, h]
            for j in range(d):
                out[j] = row[base + h * d + j]
