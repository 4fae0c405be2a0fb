"""The prefill attention tiles' two products, written in LLVM IR (``llvmlite``) and entered from
Numba code as intrinsics (the helpers of :mod:`tqedge.codec.simd`).

A prefill tile is :data:`~tqedge.codec.kernels_fused.TQ_ROWS` tokens × the GQA group of query
rows against :data:`KEYS` keys. Both products keep ``R`` query rows' accumulators in registers
for the whole reduction and vectorize over the other side, so no horizontal sum is ever formed:

- :func:`tile_scores`: ``s[r, 0:KEYS] = Σ_x q[r, x] · kt[x, 0:KEYS]`` over the key tile stored
  transposed (``kt`` (D, KEYS): each input ``x`` one contiguous vector of the tile's keys),
  one broadcast and one fused multiply-add per row, input and 16 keys;
- :func:`tile_pv`: ``acc[r, c:c+KEYS] += Σ_j p[r, j] · v[j, c:c+KEYS]`` in column chunks of
  :data:`KEYS` (values stay in their rows), one broadcast per row and key.

Each accumulator is one ``<64 x float>``, which LLVM splits into the target's registers (four
512-bit, eight 256-bit, sixteen 128-bit); :data:`ROWS` rows per call are what fit the register
file without spilling (four with AVX-512's 32 registers, one with AVX2's or NEON's). The sums
run in input (key) order with one rounding per fused multiply-add: results differ from a dot
product of another summation order by float32 rounding only (``tests/test_simd_attend.py``
checks against float64 NumPy).
"""

from __future__ import annotations

import llvmlite.ir as ir
from numba.core import cgutils

from tqedge.codec.simd import MODE, _c, _intrinsic, _ptr, _splat
from tqedge.errors import TqedgeError

KEYS = 64  # keys per tile (one accumulator vector per query row) and value columns per chunk
ROWS = 4 if MODE == "avx512" else 1  # query rows per call: what fits the registers (module docstring)
_F32 = ir.FloatType()
_VK = ir.VectorType(_F32, KEYS)


def _fma(builder, a, b, c):
    fn = builder.module.declare_intrinsic(f"llvm.fmuladd.v{KEYS}f32", fnty=ir.FunctionType(_VK, [_VK] * 3))
    return builder.call(fn, [a, b, c])


def _load_vec(builder, addr):
    return builder.load(_ptr(builder, addr, _VK), align=4)


def _scores(builder, nr, q, qs, kt, d, out, outs):
    acc = [cgutils.alloca_once(builder, _VK) for _ in range(nr)]
    for a in acc:
        builder.store(ir.Constant(_VK, [0.0] * KEYS), a)
    with cgutils.for_range(builder, d) as loop:
        x = loop.index
        k = _load_vec(builder, builder.add(kt, builder.mul(x, _c(4 * KEYS))))
        for r in range(nr):
            qa = builder.add(builder.add(q, builder.mul(qs, _c(r))), builder.mul(x, _c(4)))
            qv = _splat(builder, builder.load(_ptr(builder, qa, _F32), align=4), KEYS)
            builder.store(_fma(builder, qv, k, builder.load(acc[r])), acc[r])
    for r in range(nr):
        builder.store(builder.load(acc[r]), _ptr(builder, builder.add(out, builder.mul(outs, _c(r))), _VK), align=4)


def _pv(builder, nr, p, ps, n, v, vs, acc_at, accs, nc):
    with cgutils.for_range(builder, nc) as chunk:
        col = builder.mul(chunk.index, _c(4 * KEYS))
        rows = [builder.add(builder.add(acc_at, builder.mul(accs, _c(r))), col) for r in range(nr)]
        acc = [cgutils.alloca_once(builder, _VK) for _ in range(nr)]
        for a, at in zip(acc, rows):
            builder.store(_load_vec(builder, at), a)
        with cgutils.for_range(builder, n) as loop:
            j = loop.index
            vv = _load_vec(builder, builder.add(builder.add(v, builder.mul(vs, j)), col))
            for r in range(nr):
                pa = builder.add(builder.add(p, builder.mul(ps, _c(r))), builder.mul(j, _c(4)))
                pv = _splat(builder, builder.load(_ptr(builder, pa, _F32), align=4), KEYS)
                builder.store(_fma(builder, pv, vv, builder.load(acc[r])), acc[r])
        for a, at in zip(acc, rows):
            builder.store(builder.load(a), _ptr(builder, at, _VK), align=4)


def _rows(name, lits):
    if lits[0] not in range(ROWS + 1):
        raise TqedgeError(f"{name} needs a constant row count (0-{ROWS}), got {lits[0]}")
    return lits[0] or ROWS


#: ``tile_scores(nr, q, qs, kt, d, out, outs)`` (int64 addresses and byte strides): for the ``nr``
#: (a constant, 1 to :data:`ROWS`; 0: :data:`ROWS`) float32 query rows at ``q + r·qs`` (``d``
#: inputs), ``KEYS`` float32 scores at ``out + r·outs`` against the transposed key tile ``kt``
#: (``d`` rows of ``KEYS`` float32).
tile_scores = _intrinsic(7, lambda b, lits, *v: _scores(b, _rows("tile_scores", lits), *v[1:]))

#: ``tile_pv(nr, p, ps, n, v, vs, acc, accs, nc)``: ``acc[r, 0:nc·KEYS] += Σ_{j<n} p[r, j] ·
#: v[j, 0:nc·KEYS]`` for ``nr`` rows (as in :data:`tile_scores`); ``p + r·ps`` float32 weights,
#: ``v + j·vs`` and ``acc + r·accs`` float32 rows (byte strides).
tile_pv = _intrinsic(9, lambda b, lits, *v: _pv(b, _rows("tile_pv", lits), *v[1:]))
