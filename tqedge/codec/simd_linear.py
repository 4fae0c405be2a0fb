"""A GGUF Q4_1 linear, written in LLVM IR (``llvmlite``) and entered from Numba code as an
intrinsic (the helpers of :mod:`tqedge.codec.simd`).

A Q4_1 block of the GGUF is float16 ``d``, float16 ``m`` and 16 bytes of codes: input ``j``
(< 16) is byte ``j``'s low nibble, input ``j + 16`` its high nibble, and the weight is
``d·q + m``. The kernel reads :data:`ROWS` (16) rows' blocks ``b`` as one **group block** of
:data:`GROUP_BYTES` bytes (the same bytes, rearranged at export by
:func:`tqedge.codec.kernels_linear.group_q4_1`): the 16 ``d``, the 16 ``m``, then for each of the
four code dwords ``p`` the 16 rows' bytes ``4p … 4p + 3``. So one register lane is one weight
row: a 64-byte load is dword ``p`` of 16 rows, its low nibbles weigh inputs ``4p … 4p + 3`` and
its high nibbles inputs ``16 + 4p …``, and one ``vpdpbusd`` against that input dword broadcast
adds four products to each of the 16 rows' sums. Eight of them make a block's exact integer sums
for 16 rows; then one conversion, one multiply (``d`` times the input's scale), and two fused
multiply-adds (the ``d`` term, then ``m`` times the input block's sum) per 16 rows and input —
the float work per block is shared by 16 rows instead of one. Groups follow one another, so the
weight is one sequential stream (prefetched :data:`PREFETCH` bytes ahead).

The input rows are quantized to int8 per block of 32 (:func:`~tqedge.codec.kernels_linear.quantize_rows_q8`:
``x ≈ dx·xq``, and each block's float sum ``sx`` for the ``m`` term; one block in registers,
:data:`quantize_block`), :data:`XQ_BYTES` per
block in input order. A tile is one group against up to :func:`nx_max` input rows: the group's
unpacked codes stay in registers while the inputs pass.

**Dot product** (:data:`DOT`, chosen once from the CPU like ``MODE``): ``"avx512vnni"`` is the
above on 512-bit registers; ``"avxvnni"`` (AVX-VNNI, or AVX-512 VNNI on 256-bit registers) the
same on 8 rows at a time (two passes per group); ``"avx2"`` forms the same integer sums with
``vpmaddubsw`` (two products per int16 lane; a block's eight pairs stay below 2^15) and one
``vpmaddwd`` against ones; elsewhere (``MODE`` off, e.g. AArch64) the same sums in portable IR.
Each row's float arithmetic is the same few operations in the same order whatever the variant,
the lane count or the tile size, so the variants give the same bits and one input row gives the
same bits in a tile of any size (``tests/test_linear_q4.py``); the result is the formula's up to
float32 rounding of those per-block terms.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import llvmlite.ir as ir
from numba.core import cgutils

from tqedge.codec.simd import MODE, _c, _intrinsic, _ptr, _splat
from tqedge.errors import TqedgeError

Q4_1_BLOCK = 32  # inputs per block
Q4_1_BYTES = 20  # a GGUF block: float16 d, float16 m, 16 bytes of codes
ROWS = 16  # weight rows per group: one AVX-512 register's int32 lanes
GROUP_BYTES = ROWS * Q4_1_BYTES  # 16 d, 16 m (float16), 4 code dwords × 16 rows
XQ_BYTES = Q4_1_BLOCK  # a quantized input block: 32 int8 codes in input order
PREFETCH = 1024  # bytes ahead of the group block each step prefetches
DOTS = ("avx512vnni", "avxvnni", "avx2", "off")  # how the kernel forms its integer sums (module docstring)
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


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


def lanes(dot: str) -> int:
    """Rows a pass of ``dot``'s tile holds in one register (16 on 512 bits, else 8)."""
    return ROWS if dot == "avx512vnni" else ROWS // 2


def nx_max(dot: str) -> int:
    """Input rows a full tile of ``dot`` takes: the eight unpacked code registers, ``d``, ``m``
    and one accumulator per input fit the register file (32 on AVX-512, 16 on AVX2). Measured on
    AVX-512 (256 inputs, 3,072 × 576): 4 / 6 / 8 / 12 / 16 inputs → 344 / 349 / 392 / 400 / 389 GOP/s."""
    return 8 if dot == "avx512vnni" else 3


NXMAX = nx_max(DOT)


def _sv(builder, a, b, lanes_):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(lanes_)), lanes_))


def _dpbusd(builder, acc, u8, s8):
    """``acc`` + the sums of four adjacent u8 × s8 byte products (``vpdpbusd``, 256 or 512 bits;
    the operands typed as i32 lanes, the form LLVM accepts before and after it retyped them)."""
    n = acc.type.count
    vd = ir.VectorType(_I32, n)
    fn = builder.module.declare_intrinsic(f"llvm.x86.avx512.vpdpbusd.{32 * n}", fnty=ir.FunctionType(vd, [vd] * 3))
    return builder.call(fn, [acc, builder.bitcast(u8, vd), builder.bitcast(s8, vd)])


def _block_sums(builder, dot, pairs):
    """<n x i32>: per lane, the sum over the (u8 codes, s8 inputs) register pairs of their four
    adjacent byte products — a block's exact integer sums, one row per lane."""
    n = pairs[0][0].type.count
    vd, vb = ir.VectorType(_I32, n), ir.VectorType(_I8, 4 * n)
    if dot in ("avx512vnni", "avxvnni"):
        acc = ir.Constant(vd, [0] * n)
        for u, s in pairs:
            acc = _dpbusd(builder, acc, u, s)
        return acc
    if dot == "avx2":
        vw = ir.VectorType(_I16, 2 * n)
        mb = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", fnty=ir.FunctionType(vw, [vb, vb]))
        mw = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.wd", fnty=ir.FunctionType(vd, [vw, vw]))
        w = None
        for u, s in pairs:  # |Σ| ≤ 8 · 2 · 15 · 128 < 2^15: exact in int16
            q = builder.call(mb, [builder.bitcast(u, vb), builder.bitcast(s, vb)])
            w = q if w is None else builder.add(w, q)
        return builder.call(mw, [w, ir.Constant(vw, [1] * (2 * n))])
    v4 = ir.VectorType(_I32, 4 * n)  # portable: the same products summed per lane
    w = None
    for u, s in pairs:
        q = builder.mul(builder.zext(builder.bitcast(u, vb), v4), builder.sext(builder.bitcast(s, vb), v4))
        w = q if w is None else builder.add(w, q)
    for m in (2 * n, n):
        w = builder.add(_sv(builder, w, w, list(range(0, 2 * m, 2))), _sv(builder, w, w, list(range(1, 2 * m, 2))))
    return w


def _pass(builder, nx, n, h, dot, w, nb, xq, xqs, dx, sx, fs, out, outs):
    """Rows ``h·n … h·n + n`` of the group at ``w`` against ``nx`` inputs (:func:`_tile`)."""
    vf, vi = ir.VectorType(_F32, n), ir.VectorType(_I32, n)
    fma = builder.module.declare_intrinsic(f"llvm.fmuladd.v{n}f32", fnty=ir.FunctionType(vf, [vf] * 3))
    pf = builder.module.declare_intrinsic("llvm.prefetch.p0", fnty=ir.FunctionType(
        ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]))
    acc = [cgutils.alloca_once(builder, vf) for _ in range(nx)]
    for a in acc:
        builder.store(ir.Constant(vf, [0.0] * n), a)
    mask, four = ir.Constant(vi, [0x0F0F0F0F] * n), ir.Constant(vi, [4] * n)
    vh = ir.VectorType(ir.HalfType(), n)
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        g = builder.add(w, builder.mul(b, _c(GROUP_BYTES)))
        if h == 0:
            builder.call(pf, [builder.inttoptr(builder.add(g, _c(PREFETCH)), ir.IntType(8).as_pointer()),
                              ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        d = builder.fpext(builder.load(_ptr(builder, builder.add(g, _c(2 * n * h)), vh), align=1), vf)
        m = builder.fpext(builder.load(_ptr(builder, builder.add(g, _c(2 * ROWS + 2 * n * h)), vh), align=1), vf)
        codes = []
        for p in range(4):
            c = builder.load(_ptr(builder, builder.add(g, _c(4 * ROWS + 4 * ROWS * p + 4 * n * h)), vi), align=1)
            codes.append((builder.and_(c, mask), builder.and_(builder.lshr(c, four), mask)))
        for j in range(nx):
            xa = builder.add(builder.add(xq, builder.mul(xqs, _c(j))), builder.mul(b, _c(XQ_BYTES)))
            pairs = []
            for p, (lo, hi) in enumerate(codes):
                xl = builder.load(_ptr(builder, builder.add(xa, _c(4 * p)), _I32), align=1)
                xh = builder.load(_ptr(builder, builder.add(xa, _c(16 + 4 * p)), _I32), align=1)
                pairs += [(lo, _splat(builder, xl, n)), (hi, _splat(builder, xh, n))]
            s = builder.sitofp(_block_sums(builder, dot, pairs), vf)
            fa = builder.add(builder.mul(fs, _c(j)), builder.mul(b, _c(4)))
            dxj = builder.load(_ptr(builder, builder.add(dx, fa), _F32), align=4)
            sxj = builder.load(_ptr(builder, builder.add(sx, fa), _F32), align=4)
            y = builder.call(fma, [s, builder.fmul(d, _splat(builder, dxj, n)), builder.load(acc[j])])
            builder.store(builder.call(fma, [m, _splat(builder, sxj, n), y]), acc[j])
    for j in range(nx):
        o = builder.add(builder.add(out, builder.mul(outs, _c(j))), _c(4 * n * h))
        builder.store(builder.load(acc[j]), _ptr(builder, o, vf), align=4)


def _tile(builder, nx, dot, w, nb, xq, xqs, dx, sx, fs, out, outs):
    """out[j, 0:16] (float32 at ``out + j·outs``) = Σ_b d·dx_jb·<q, xq_jb> + m·sx_jb for the
    group at ``w`` (``nb`` group blocks) and the ``nx`` quantized inputs j: ``xq + j·xqs``
    (nb · :data:`XQ_BYTES` int8), ``dx + j·fs`` and ``sx + j·fs`` (nb float32); in
    ``ROWS / lanes(dot)`` passes over the blocks."""
    n = lanes(dot)
    for h in range(ROWS // n):
        _pass(builder, nx, n, h, dot, w, nb, xq, xqs, dx, sx, fs, out, outs)


def make_q4_1_tile(dot: str):
    """An intrinsic ``q4_1_tile(nx, w, nb, xq, xqs, dx, sx, fs, out, outs)`` whose integer sums
    are formed by ``dot`` (:data:`DOTS`): one group of 16 Q4_1 weight rows at ``w`` (``nb``
    group blocks of :data:`GROUP_BYTES`) against ``nx`` (1 to ``nx_max(dot)``, a constant; 0: a
    full tile) quantized inputs (``xq`` nb · :data:`XQ_BYTES` int8, ``xqs`` bytes apart; ``dx``
    and ``sx`` nb float32, ``fs`` bytes apart): input j's 16 outputs as float32 at ``out + j·outs``."""
    if dot not in DOTS:
        raise TqedgeError(f"unknown dot product {dot!r}")
    top = nx_max(dot)

    def body(builder, lits, *vals):
        if lits[0] not in range(top + 1):
            raise TqedgeError(f"q4_1_tile needs a constant nx (0-{top}), got {lits[0]}")
        _tile(builder, lits[0] or top, dot, *vals[1:])

    return _intrinsic(10, body)


q4_1_tile = make_q4_1_tile(DOT)


def _tree(builder, v, op):
    """``v``'s lanes combined by ``op`` in a fixed pairwise order (halves, then quarters, …): the
    same bits on every target."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = op(_sv(builder, v, v, list(range(n))), _sv(builder, v, v, list(range(n, 2 * n))))
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _quantize(builder, x, xq, dxp, sxp):
    """One input block: 32 float32 at ``x`` → 32 int8 codes at ``xq``, its scale at ``dxp`` and
    its sum at ``sxp`` (:func:`~tqedge.codec.kernels_linear.quantize_rows_q8`)."""
    v32 = ir.VectorType(_F32, Q4_1_BLOCK)

    def f32(name):  # a unary intrinsic on the block's 32 floats
        return builder.module.declare_intrinsic(name, fnty=ir.FunctionType(v32, [v32]))

    v = builder.load(_ptr(builder, x, v32), align=4)
    a = _tree(builder, builder.call(f32("llvm.fabs.v32f32"), [v]),
              lambda p, q: builder.select(builder.fcmp_ordered(">", p, q), p, q))
    zero, k = ir.Constant(_F32, 0.0), ir.Constant(_F32, 127.0)
    inv = builder.select(builder.fcmp_ordered(">", a, zero), builder.fdiv(k, a), zero)  # MLAS's rule: exact division
    q = builder.call(f32("llvm.rint.v32f32"), [builder.fmul(v, _splat(builder, inv, Q4_1_BLOCK))])  # ties to even
    builder.store(builder.fptosi(q, ir.VectorType(_I8, Q4_1_BLOCK)), _ptr(builder, xq, ir.VectorType(_I8, Q4_1_BLOCK)), align=1)
    builder.store(builder.fdiv(a, k), _ptr(builder, dxp, _F32), align=4)
    builder.store(_tree(builder, v, builder.fadd), _ptr(builder, sxp, _F32), align=4)


# ``quantize_block(x, xq, dxp, sxp)`` (addresses): one block of 32 inputs quantized to int8 (:func:`_quantize`)
quantize_block = _intrinsic(4, lambda builder, lits, *vals: _quantize(builder, *vals))
