"""A GGUF Q4_1 linear at one input row, written in LLVM IR (``llvmlite``) and entered from Numba
code as an intrinsic (the helpers of :mod:`tqedge.codec.simd`).

A Q4_1 block (:data:`Q4_1_BYTES` bytes, as the GGUF stores it) is float16 ``d``, float16 ``m``
and 16 bytes of codes: input ``j`` (< 16) is byte ``j``'s low nibble, input ``j + 16`` its high
nibble, and the weight is ``d·q + m``. The input row is quantized once per call to int8 per
block of 32 (:func:`tqedge.codec.kernels_linear.quantize_row_q8`: ``x ≈ dx·xq``, with the exact
float sum ``sx`` of each block kept for the ``m`` term), so a block's contribution is

    d · dx · Σ_j q_j · xq_j  +  m · sx

with the sum in integers: on x86 one ``vpmaddubsw`` (unsigned codes × signed inputs, 32 pairs
into 16 int16, which cannot saturate: 2 · 15 · 127 < 2^15) and one ``vpmaddwd`` against ones
(8 int32, each the sum of 4 adjacent products), then one float multiply-add per block into 8 float lanes; elsewhere (``MODE`` off,
e.g. AArch64) the same integer sum in portable IR that LLVM lowers for the target. Four output
rows share each block of the input (:data:`ROWS`). The integer sums are exact, so the result is
the NumPy formula's up to float32 summation order (``tests/test_linear_q4.py``).
"""

from __future__ import annotations

import llvmlite.ir as ir
from numba.core import cgutils

from tqedge.codec.simd import MODE, MODES, _c, _intrinsic, _ptr, _splat
from tqedge.errors import TqedgeError

Q4_1_BLOCK = 32  # inputs per block
Q4_1_BYTES = 20  # float16 d, float16 m, 16 bytes of codes
ROWS = 4  # output rows per call of the kernel (the input block is loaded once for them)
PREFETCH = 1024  # bytes ahead of row 0's block that each step prefetches (measured: 256 to 2048)
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _codes(builder, at):
    """<32 x i8>: the block's 32 codes (0..15) in input order, from the 16 bytes at ``at``."""
    v16 = ir.VectorType(_I8, 16)
    c = builder.load(_ptr(builder, at, v16), align=1)
    lo = builder.and_(c, ir.Constant(v16, [15] * 16))
    hi = builder.lshr(c, ir.Constant(v16, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))


def _isum(builder, mode, q, xv):
    """<8 x i32>: pair sums of ``q`` (unsigned codes) times ``xv`` (signed int8) — 4 products per lane."""
    v32b, v16w, v8d = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
    if mode in ("avx2", "avx512"):
        mb = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", fnty=ir.FunctionType(v16w, [v32b, v32b]))
        mw = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.wd", fnty=ir.FunctionType(v8d, [v16w, v16w]))
        return builder.call(mw, [builder.call(mb, [q, xv]), ir.Constant(v16w, [1] * 16)])
    v32d = ir.VectorType(_I32, 32)  # portable: widen, multiply, add adjacent lanes twice (x86's grouping)
    p = builder.mul(builder.zext(q, v32d), builder.sext(xv, v32d))
    for n in (16, 8):
        idx = ir.VectorType(_I32, n)
        p = builder.add(builder.shuffle_vector(p, p, ir.Constant(idx, list(range(0, 2 * n, 2)))),
                        builder.shuffle_vector(p, p, ir.Constant(idx, list(range(1, 2 * n, 2)))))
    return p


def _i32(v):
    return ir.Constant(_I32, v)


def _half_at(builder, at):
    return builder.fpext(builder.bitcast(builder.load(_ptr(builder, at, _I16), align=1), ir.HalfType()), _F32)


def _hsum8(builder, v):
    for n in (4, 2, 1):
        idx = ir.VectorType(_I32, n)
        v = builder.fadd(builder.shuffle_vector(v, v, ir.Constant(idx, list(range(n)))),
                         builder.shuffle_vector(v, v, ir.Constant(idx, list(range(n, 2 * n)))))
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _gemv_rows(builder, lits, mode, w, ws, bs, nb, xq, dx, sx, out):
    """out[r] (float32 at ``out + 4r``) = Σ_b d_rb·dx_b·<q_rb, xq_b> + m_rb·sx_b for the ``rows``
    Q4_1 rows at ``w + r·ws`` (``nb`` blocks each, ``bs`` bytes apart); ``xq`` int8 (nb·32), ``dx``, ``sx`` float32 (nb)."""
    rows = lits[0]
    v8f = ir.VectorType(_F32, 8)
    fma = builder.module.declare_intrinsic("llvm.fmuladd.v8f32", fnty=ir.FunctionType(v8f, [v8f, v8f, v8f]))
    fma1 = builder.module.declare_intrinsic("llvm.fmuladd.f32", fnty=ir.FunctionType(_F32, [_F32, _F32, _F32]))
    pf = builder.module.declare_intrinsic("llvm.prefetch.p0", fnty=ir.FunctionType(
        ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]))
    accs = [cgutils.alloca_once(builder, v8f) for _ in range(rows)]
    maccs = [cgutils.alloca_once(builder, _F32) for _ in range(rows)]
    for a, m in zip(accs, maccs):
        builder.store(ir.Constant(v8f, [0.0] * 8), a)
        builder.store(ir.Constant(_F32, 0.0), m)
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        xv = builder.load(_ptr(builder, builder.add(xq, builder.mul(b, _c(Q4_1_BLOCK))), ir.VectorType(_I8, 32)),
                          align=1)
        dxb = builder.load(_ptr(builder, builder.add(dx, builder.mul(b, _c(4))), _F32), align=4)
        sxb = builder.load(_ptr(builder, builder.add(sx, builder.mul(b, _c(4))), _F32), align=4)
        ahead = builder.add(builder.add(w, builder.mul(b, bs)), _c(PREFETCH))
        builder.call(pf, [builder.inttoptr(ahead, ir.IntType(8).as_pointer()), _i32(0), _i32(3), _i32(1)])
        for r in range(rows):
            at = builder.add(builder.add(w, builder.mul(ws, _c(r))), builder.mul(b, bs))
            s = builder.sitofp(_isum(builder, mode, _codes(builder, builder.add(at, _c(4))), xv), v8f)
            scale = _splat(builder, builder.fmul(_half_at(builder, at), dxb), 8)
            builder.store(builder.call(fma, [scale, s, builder.load(accs[r])]), accs[r])
            m = _half_at(builder, builder.add(at, _c(2)))
            builder.store(builder.call(fma1, [m, sxb, builder.load(maccs[r])]), maccs[r])
    for r in range(rows):
        y = builder.fadd(_hsum8(builder, builder.load(accs[r])), builder.load(maccs[r]))
        builder.store(y, _ptr(builder, builder.add(out, _c(4 * r)), _F32), align=4)


def make_q4_1_rows(mode: str):
    """An intrinsic ``q4_1_rows(rows, w, ws, bs, nb, xq, dx, sx, out)``: ``rows`` (1 or :data:`ROWS`,
    a constant) Q4_1 weight rows at ``w`` (``ws`` bytes apart; ``nb`` blocks of :data:`Q4_1_BYTES`,
    ``bs`` bytes apart: :data:`Q4_1_BYTES` as the GGUF stores a row, ``ROWS · Q4_1_BYTES`` with
    four rows' blocks interleaved) against the quantized input (``xq`` nb·32 int8, ``dx`` and ``sx`` nb
    float32): the rows' outputs as float32 at ``out``, ``out + 4``, …"""
    if mode not in MODES:
        raise TqedgeError(f"unknown permute mode {mode!r}")

    def body(builder, lits, *vals):
        if lits[0] not in (1, ROWS):
            raise TqedgeError(f"q4_1_rows needs constant rows (1 or {ROWS}), got {lits[0]}")
        _gemv_rows(builder, lits, mode, *vals[1:])

    return _intrinsic(9, body)


q4_1_rows = make_q4_1_rows(MODE)
