"""A GGUF Q4_1 linear, written in LLVM IR (``llvmlite``) and entered from Numba code as an
intrinsic (the helpers of :mod:`tqedge.codec.simd`).

A Q4_1 block of the GGUF is float16 ``d``, float16 ``m`` and 16 bytes of codes: input ``j``
(< 16) is byte ``j``'s low nibble, input ``j + 16`` its high nibble, and the weight is
``d·q + m``. The kernel reads four rows' blocks ``b`` as one **group block** of
:data:`GROUP_BYTES` bytes (the same bytes, rearranged by
:func:`tqedge.codec.kernels_linear.group_q4_1`): the four ``d``, the four ``m``, then the four
rows' 16 code bytes. Groups follow one another, so the weight is one sequential stream
(prefetched :data:`PREFETCH` bytes ahead); two rows' codes are one 32-byte load.

The input rows are quantized to int8 per block of 32 (:func:`~tqedge.codec.kernels_linear.quantize_rows_q8`:
``x ≈ dx·xq``, and each block's exact float sum ``sx`` for the ``m`` term), each block stored as
64 bytes: inputs 0–15 twice, then 16–31 twice, so that one ``vpmaddubsw`` multiplies two rows'
low nibbles (unsigned) by the inputs they weigh (signed) and a second the high nibbles; their
int16 sums (≤ 4 · 15 · 127, no saturation) added, one ``vpmaddwd`` against ones gives 8 int32
lanes, four per row. Per row pair and input: that, one conversion, one scale (four ``d`` times
``dx`` at once, then a permute) and one fused multiply-add; ``m · sx`` for four rows in one
multiply-add. Elsewhere (``MODE`` off, e.g. AArch64) the same integer sums in portable IR.

**Dot product** (:data:`DOT`, chosen once from the CPU like ``MODE``): ``"avx2"`` is the pair
above; ``"avxvnni"`` (AVX-VNNI, or AVX-512 VNNI on 256-bit registers) does the same lanes with
two ``vpdpbusd``; ``"avx512vnni"`` widens the tile to all four rows at once — the group's 64
code bytes in one 512-bit register, the input block broadcast to both halves, two
``vpdpbusd`` per input and group block, one conversion and one fused multiply-add.
The integer sums are exact in every variant, so the result is the formula's up to float32
summation order (``tests/test_linear_q4.py``), the variants give the same bits, and one input
row gives the same bits in a tile of any size.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import llvmlite.ir as ir
from numba.core import cgutils

from tqedge.codec.simd import MODE, _c, _intrinsic, _ptr, _splat
from tqedge.errors import TqedgeError

Q4_1_BLOCK = 32  # inputs per block
Q4_1_BYTES = 20  # a GGUF block: float16 d, float16 m, 16 bytes of codes
ROWS = 4  # weight rows per group
GROUP_BYTES = ROWS * Q4_1_BYTES  # 4 d, 4 m (float16), 4 × 16 code bytes
XQ_BYTES = 2 * Q4_1_BLOCK  # a quantized input block: inputs 0-15 twice, 16-31 twice
NXMAX = 3  # input rows per call: a group block is unpacked once for them (2×3 fit the 16 AVX2 registers best, measured 2-8; AVX-512 VNNI: 3 and 6 alike, 8 slower)
PREFETCH = 1024  # bytes ahead of the group block each step prefetches (measured: 256 to 2048)
DOTS = ("avx512vnni", "avxvnni", "avx2", "off")  # how the kernel forms its integer sums (module docstring)
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V32B = ir.VectorType(_I8, 32)


def host_dot(mode: str = MODE, features: dict | None = None) -> str:
    """The dot product this CPU runs (:data:`DOTS`): ``off`` where the permute mode is off, else
    the widest of AVX-512 VNNI (with AVX-512F and VL), AVX-VNNI, AVX2."""
    if mode == "off":
        return "off"
    f = llvm.get_host_cpu_features() if features is None else features
    if mode == "avx512" and f.get("avx512vnni") and f.get("avx512vl"):
        return "avx512vnni"
    return "avxvnni" if f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl")) else "avx2"


DOT = host_dot()


def _i32(v):
    return ir.Constant(_I32, v)


def _sv(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(lanes)), lanes))


def _nibbles(builder, at):
    """(low, high) <32 x i8> nibbles of the 32 code bytes at ``at`` (two rows' codes)."""
    c = builder.load(_ptr(builder, at, _V32B), align=1)
    m = ir.Constant(_V32B, [15] * 32)
    return builder.and_(c, m), builder.and_(builder.lshr(c, ir.Constant(_V32B, [4] * 32)), m)


def _isum(builder, dot, lo, hi, xlo, xhi):
    """<8 x i32>: lanes 0–3 row a's, 4–7 row b's partial sums of codes × inputs (each lane four
    adjacent products of the low and four of the high nibbles)."""
    v16w, v8d = ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
    if dot == "avxvnni":
        return _dpbusd(builder, _dpbusd(builder, ir.Constant(v8d, [0] * 8), lo, xlo), hi, xhi)
    if dot == "avx2":
        mb = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", fnty=ir.FunctionType(v16w, [_V32B, _V32B]))
        mw = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.wd", fnty=ir.FunctionType(v8d, [v16w, v16w]))
        p = builder.add(builder.call(mb, [lo, xlo]), builder.call(mb, [hi, xhi]))
        return builder.call(mw, [p, ir.Constant(v16w, [1] * 16)])
    v32d = ir.VectorType(_I32, 32)  # portable: the same products summed in the same lanes
    p = builder.add(builder.mul(builder.zext(lo, v32d), builder.sext(xlo, v32d)),
                    builder.mul(builder.zext(hi, v32d), builder.sext(xhi, v32d)))
    for n in (16, 8):
        p = builder.add(_sv(builder, p, p, list(range(0, 2 * n, 2))), _sv(builder, p, p, list(range(1, 2 * n, 2))))
    return p


def _dpbusd(builder, acc, u8, s8):
    """``acc`` + the sums of four adjacent u8 × s8 byte products (``vpdpbusd``, 256 or 512 bits;
    the operands typed as i32 lanes, the form LLVM accepts before and after it retyped them)."""
    n = acc.type.count
    vd = ir.VectorType(_I32, n)
    fn = builder.module.declare_intrinsic(f"llvm.x86.avx512.vpdpbusd.{32 * n}", fnty=ir.FunctionType(vd, [vd] * 3))
    return builder.call(fn, [acc, builder.bitcast(u8, vd), builder.bitcast(s8, vd)])


def _halves4(builder, at):
    v4h = ir.VectorType(ir.HalfType(), 4)
    return builder.fpext(builder.load(_ptr(builder, at, v4h), align=1), ir.VectorType(_F32, 4))


def _row_sums(builder, a, b):
    """<4 x float>: the sums of lanes 0–3 and 4–7 of ``a`` (rows 0, 1) and of ``b`` (rows 2, 3)."""
    u = builder.fadd(_sv(builder, a, b, [0, 1, 4, 5, 8, 9, 12, 13]), _sv(builder, a, b, [2, 3, 6, 7, 10, 11, 14, 15]))
    return builder.fadd(_sv(builder, u, u, [0, 2, 4, 6]), _sv(builder, u, u, [1, 3, 5, 7]))


def _codes(builder, dot, g):
    """The group block's (low, high) nibbles at ``g``: per row pair (two <32 x i8>), or with
    ``avx512vnni`` all four rows at once (one <64 x i8> pair)."""
    if dot != "avx512vnni":
        return [_nibbles(builder, builder.add(g, _c(16))), _nibbles(builder, builder.add(g, _c(48)))]
    v64b = ir.VectorType(_I8, 64)
    c = builder.load(_ptr(builder, builder.add(g, _c(16)), v64b), align=1)
    mask = ir.Constant(v64b, [15] * 64)
    return [(builder.and_(c, mask), builder.and_(builder.lshr(c, ir.Constant(v64b, [4] * 64)), mask))]


def _scaled_sums(builder, dot, lo, hi, xlo, xhi, sc, p):
    """(float integer sums, their scales) of code part ``p``: rows 2p, 2p+1 in lanes 0–3, 4–7;
    with ``avx512vnni`` (one part) rows 0–3 in lanes 4r–4r+3, the input broadcast to both halves."""
    if dot != "avx512vnni":
        s = _isum(builder, dot, lo, hi, xlo, xhi)
        return builder.sitofp(s, ir.VectorType(_F32, 8)), _sv(builder, sc, sc, [2 * p] * 4 + [2 * p + 1] * 4)
    both = list(range(32)) * 2
    s = _dpbusd(builder, ir.Constant(ir.VectorType(_I32, 16), [0] * 16), lo, _sv(builder, xlo, xlo, both))
    s = _dpbusd(builder, s, hi, _sv(builder, xhi, xhi, both))
    return builder.sitofp(s, ir.VectorType(_F32, 16)), _sv(builder, sc, sc, [r for r in range(4) for _ in range(4)])


def _tile(builder, lits, dot, w, nb, xq, xqs, dx, sx, fs, out, outs):
    """out[j, 0:4] (float32 at ``out + j·outs``) = Σ_b Σ_r-block d·dx_jb·<q, xq_jb> + m·sx_jb for
    the group at ``w`` (``nb`` group blocks) and the ``nx`` quantized inputs j: ``xq + j·xqs``
    (nb · :data:`XQ_BYTES` int8), ``dx + j·fs`` and ``sx + j·fs`` (nb float32). The row sums
    add the same lanes in the same order for every ``dot``."""
    nx = lits[0]
    parts, lanes = (1, 16) if dot == "avx512vnni" else (2, 8)
    vf, v4f = ir.VectorType(_F32, lanes), ir.VectorType(_F32, 4)
    fma = builder.module.declare_intrinsic(f"llvm.fmuladd.v{lanes}f32", fnty=ir.FunctionType(vf, [vf] * 3))
    fma4 = builder.module.declare_intrinsic("llvm.fmuladd.v4f32", fnty=ir.FunctionType(v4f, [v4f] * 3))
    pf = builder.module.declare_intrinsic("llvm.prefetch.p0", fnty=ir.FunctionType(
        ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]))
    acc = [[cgutils.alloca_once(builder, vf) for _ in range(parts)] for _ in range(nx)]
    macc = [cgutils.alloca_once(builder, v4f) for _ in range(nx)]
    for j in range(nx):
        for a in acc[j]:
            builder.store(ir.Constant(vf, [0.0] * lanes), a)
        builder.store(ir.Constant(v4f, [0.0] * 4), macc[j])
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        g = builder.add(w, builder.mul(b, _c(GROUP_BYTES)))
        builder.call(pf, [builder.inttoptr(builder.add(g, _c(PREFETCH)), ir.IntType(8).as_pointer()),
                          _i32(0), _i32(3), _i32(1)])
        d4, m4 = _halves4(builder, g), _halves4(builder, builder.add(g, _c(8)))
        codes = _codes(builder, dot, g)
        for j in range(nx):
            xa = builder.add(builder.add(xq, builder.mul(xqs, _c(j))), builder.mul(b, _c(XQ_BYTES)))
            xlo = builder.load(_ptr(builder, xa, _V32B), align=1)
            xhi = builder.load(_ptr(builder, builder.add(xa, _c(32)), _V32B), align=1)
            fa = builder.add(builder.mul(fs, _c(j)), builder.mul(b, _c(4)))
            dxj = builder.load(_ptr(builder, builder.add(dx, fa), _F32), align=4)
            sxj = builder.load(_ptr(builder, builder.add(sx, fa), _F32), align=4)
            sc = builder.fmul(d4, _splat(builder, dxj, 4))
            for p, (lo, hi) in enumerate(codes):
                s, scale = _scaled_sums(builder, dot, lo, hi, xlo, xhi, sc, p)
                builder.store(builder.call(fma, [s, scale, builder.load(acc[j][p])]), acc[j][p])
            builder.store(builder.call(fma4, [m4, _splat(builder, sxj, 4), builder.load(macc[j])]), macc[j])
    for j in range(nx):
        a = [builder.load(x) for x in acc[j]]
        if parts == 1:  # the four rows' lanes as the two-part layout holds them: rows 0, 1 | rows 2, 3
            a = [_sv(builder, a[0], a[0], list(range(8))), _sv(builder, a[0], a[0], list(range(8, 16)))]
        y = builder.fadd(_row_sums(builder, a[0], a[1]), builder.load(macc[j]))
        builder.store(y, _ptr(builder, builder.add(out, builder.mul(outs, _c(j))), v4f), align=4)


def make_q4_1_tile(dot: str):
    """An intrinsic ``q4_1_tile(nx, w, nb, xq, xqs, dx, sx, fs, out, outs)`` whose integer sums
    are formed by ``dot`` (:data:`DOTS`): one group of four
    Q4_1 weight rows at ``w`` (``nb`` group blocks of :data:`GROUP_BYTES`) against ``nx`` (1 to
    :data:`NXMAX`, a constant; 0: :data:`NXMAX`, a full tile) quantized inputs (``xq`` nb · :data:`XQ_BYTES` int8, ``xqs`` bytes
    apart; ``dx`` and ``sx`` nb float32, ``fs`` bytes apart): input j's four outputs as float32 at
    ``out + j·outs``."""
    if dot not in DOTS:
        raise TqedgeError(f"unknown dot product {dot!r}")

    def body(builder, lits, *vals):
        if lits[0] not in range(NXMAX + 1):
            raise TqedgeError(f"q4_1_tile needs a constant nx (0-{NXMAX}), got {lits[0]}")
        _tile(builder, (lits[0] or NXMAX,), dot, *vals[1:])

    return _intrinsic(10, body)


q4_1_tile = make_q4_1_tile(DOT)
