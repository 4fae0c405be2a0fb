"""Vector kernels written in LLVM IR (``llvmlite``), entered from Numba code as intrinsics.

**Codes by register permute** (x86): a segment's codes are a little-endian bit stream, so 16
codes of ``b`` ≤ 4 bits are ``2·b`` whole bytes: one integer load, a byte shuffle that gives each
lane the 32 bits from the byte its code starts in, a shift per lane (< 8), a mask, and the 16
centroids (at most 16 floats: one AVX-512 register) are picked by the lane indices with one
``vpermps``. On AVX2 the table is two 8-float halves (two ``vpermps`` and a blend on bit 3
for ``b`` = 4). The decoded floats are the codebook's own values (a permute moves bits), so
``dequantize`` gives the same bits as the byte tables of :mod:`tqedge.codec.kernels_numba`.

**Block kernels**: four rows (:data:`ROWS`) decoded into registers — codes by permute, or
float16 rows (:data:`HALVES`) by ``fpext``, which every target has — then dotted with up to
:data:`GMAX` queries (the four rows' sums in one transpose-add tree) or added into accumulators
with a weight per query and row; the group count is unrolled when the caller passes a constant.
:mod:`tqedge.codec.kernels_blocks` and :mod:`tqedge.runtime.fp16_kernels` are the Numba glue.

:data:`MODE` is chosen once from the host CPU (``llvmlite``'s feature list): ``"avx512"``,
``"avx2"`` or ``"off"`` (other CPUs, e.g. AArch64, keep the byte tables for codes; the float16
blocks run everywhere); the environment variable ``TQEDGE_SIMD=off`` turns the permute off. It
names the kernel cache directory too (:mod:`tqedge.codec.numba_runtime`): Numba freezes
:data:`PERMUTE` into the machine code.
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm
import llvmlite.ir as ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from tqedge.errors import TqedgeError

MODES = ("avx512", "avx2", "off")
LANES = 16  # codes per permute (an AVX-512 register of floats)
_I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()


def host_mode(features: dict | None = None, env: str | None = None) -> str:
    """The permute this CPU runs: ``TQEDGE_SIMD`` (``off`` or ``auto``, the default), then
    ``avx512`` with AVX-512F, ``avx2`` with AVX2, else ``off``."""
    env = os.environ.get("TQEDGE_SIMD", "auto") if env is None else env
    if env not in ("auto", "off"):
        raise TqedgeError(f"TQEDGE_SIMD must be auto or off, got {env!r}")
    if env == "off":
        return "off"
    f = llvm.get_host_cpu_features() if features is None else features
    return "avx512" if f.get("avx512f") else "avx2" if f.get("avx2") else "off"


MODE = host_mode()
PERMUTE = MODE != "off"


def _lanes(builder, src, bits):
    """The 16 code indices (<16 x i32>) of the ``2·bits`` bytes at address ``src``: the bytes
    widened into a vector once, each lane's 32-bit word gathered from the byte its code starts
    in (a constant byte shuffle), shifted by the code's offset in that byte (≤ 7) and masked."""
    x = builder.load(builder.inttoptr(src, ir.IntType(LANES * bits).as_pointer()), align=1)
    x = builder.zext(x, _I64) if bits < 4 else x
    v2 = builder.insert_element(ir.Constant(ir.VectorType(_I64, 2), ir.Undefined), x, ir.Constant(_I32, 0))
    v2 = builder.insert_element(v2, ir.Constant(_I64, 0), ir.Constant(_I32, 1))
    b16 = builder.bitcast(v2, ir.VectorType(ir.IntType(8), 16))
    picks = []
    for j in range(LANES):
        o = bits * j // 8
        picks += [min(o + m, 8) for m in range(4)]  # byte 8 is zero: past the codes
    w = builder.bitcast(builder.shuffle_vector(b16, b16, ir.Constant(ir.VectorType(_I32, 4 * LANES), picks)),
                        ir.VectorType(_I32, LANES))
    w = builder.lshr(w, ir.Constant(ir.VectorType(_I32, LANES), [bits * j % 8 for j in range(LANES)]))
    return builder.and_(w, ir.Constant(ir.VectorType(_I32, LANES), [(1 << bits) - 1] * LANES))


def _half(builder, v, lo):
    n = v.type.count // 2
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(lo, lo + n))))


def _table(builder, mode, tbl):
    """The padded codebook at address ``tbl`` as the permute wants it (one or two registers)."""
    vf, v8 = ir.VectorType(_F32, LANES), ir.VectorType(_F32, 8)
    if mode == "avx2":
        return (builder.load(builder.inttoptr(tbl, v8.as_pointer()), align=4),
                builder.load(builder.inttoptr(builder.add(tbl, ir.Constant(_I64, 32)), v8.as_pointer()), align=4))
    return builder.load(builder.inttoptr(tbl, vf.as_pointer()), align=4)


def _decode(builder, mode, bits, table, src):
    """<16 x float>: the centroids of the 16 codes at address ``src``."""
    idx = _lanes(builder, src, bits)
    vf = ir.VectorType(_F32, LANES)
    if mode == "avx512":
        fn = builder.module.declare_intrinsic(
            "llvm.x86.avx512.permvar.sf.512", fnty=ir.FunctionType(vf, [vf, ir.VectorType(_I32, LANES)]))
        return builder.call(fn, [table, idx])
    if mode == "avx2":
        v8, i8 = ir.VectorType(_F32, 8), ir.VectorType(_I32, 8)
        fn = builder.module.declare_intrinsic("llvm.x86.avx2.permps", fnty=ir.FunctionType(v8, [v8, i8]))
        halves = []
        for h in (0, 8):
            ih = _half(builder, idx, h)
            r = builder.call(fn, [table[0], ih])  # vpermps reads the index's low 3 bits
            if bits == 4:
                hi = builder.icmp_unsigned(">", ih, ir.Constant(i8, [7] * 8))
                r = builder.select(hi, builder.call(fn, [table[1], ih]), r)
            halves.append(r)
        return builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_I32, LANES), list(range(16))))
    out = ir.Constant(vf, ir.Undefined)  # portable IR (any target): lane by lane; never chosen by the kernels
    for j in range(LANES):
        lane = ir.Constant(_I32, j)
        out = builder.insert_element(out, builder.extract_element(table, builder.extract_element(idx, lane)), lane)
    return out


def _emit(builder, mode, bits, src, tbl, dst):
    out = _decode(builder, mode, bits, _table(builder, mode, tbl), src)
    builder.store(out, builder.inttoptr(dst, ir.VectorType(_F32, LANES).as_pointer()), align=4)


def _intrinsic(nargs, emit):
    """An intrinsic of ``nargs`` integer arguments (addresses, strides, counts; anything else is
    a typing error, so an address never passes through a float). ``emit(builder, lits, *vals)``
    writes the body: ``lits[i]`` is argument i's value when the caller passed a constant (the
    code is then specialised to it), else None; ``vals`` are int64."""

    def typer(typingctx, *args):
        if not all(isinstance(a, types.Integer) for a in args):
            return None
        lits = tuple(a.literal_value if isinstance(a, types.IntegerLiteral) else None for a in args)

        def codegen(context, builder, sig, vals):
            emit(builder, lits, *[context.cast(builder, v, t, types.int64) for v, t in zip(vals, sig.args)])
            return context.get_dummy_value()

        return types.void(*args), codegen

    names = ", ".join(f"a{i}" for i in range(nargs))
    scope: dict = {}
    exec(f"def fn(typingctx, {names}):\n    return typer(typingctx, {names})", {"typer": typer}, scope)
    return intrinsic(prefer_literal=True)(scope["fn"])


def _check(bits, mode):
    if bits not in (1, 2, 3, 4) or mode not in MODES:
        raise TqedgeError(f"no permute decode for {bits} bits in mode {mode!r}")


def make_decode16(bits: int, mode: str):
    """An intrinsic ``decode16(src, table, dst)`` (int64 addresses): the 16 codes of ``bits``
    bits in the ``2·bits`` bytes at ``src`` → 16 float32 at ``dst``, ``table`` 16 float32
    (the centroids, padded)."""
    _check(bits, mode)
    return _intrinsic(3, lambda b, lits, src, tbl, dst: _emit(b, mode, bits, src, tbl, dst))


decode16_b1, decode16_b2, decode16_b3, decode16_b4 = (make_decode16(b, MODE) for b in (1, 2, 3, 4))

# -- decode fused with the kernels' arithmetic: no decoded tile in memory -----------------------
GMAX = 8  # query heads per KV head the block kernels take (more: the kernels' tile path)
NKMAX = 16  # groups of 16 codes per segment (Dp ≤ 256)
ROWS = 4  # code rows per block call


def _c(v):
    return ir.Constant(_I64, v)


def _splat(builder, x, n=LANES):
    v = builder.insert_element(ir.Constant(ir.VectorType(x.type, n), ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _fmuladd(builder, a, b, c):
    vf = ir.VectorType(_F32, LANES)
    fn = builder.module.declare_intrinsic("llvm.fmuladd.v16f32", fnty=ir.FunctionType(vf, [vf, vf, vf]))
    return builder.call(fn, [a, b, c])


def _ptr(builder, addr, ty):
    return builder.inttoptr(addr, ty.as_pointer())


def _sv(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(lanes)), lanes))


def _pair_sum(builder, a, b, lo, hi):
    return builder.fadd(_sv(builder, a, b, lo), _sv(builder, a, b, hi))


def _row_sums(builder, accs):
    """The lane sums of 1 or 4 <16 x float> vectors as <1|4 x float> (for four rows one
    transpose-add tree instead of four reductions)."""
    if len(accs) == 1:
        a = accs[0]
        for n in (8, 4, 2, 1):
            a = _pair_sum(builder, a, a, list(range(n)), list(range(n, 2 * n)))
        return a
    a0, a1, a2, a3 = accs
    lo8, hi8 = list(range(8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32))
    x = _pair_sum(builder, a0, a1, lo8, hi8)  # lanes 0-7: row 0's partial sums, 8-15: row 1's
    y = _pair_sum(builder, a2, a3, lo8, hi8)
    z = _pair_sum(builder, x, y, [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27],
                  [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31])  # 4 lanes per row
    w = _pair_sum(builder, z, z, [0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15])
    return _pair_sum(builder, w, w, [0, 2, 4, 6], [1, 3, 5, 7])


HALVES = 16  # ``bits`` of a float16 row source (the cache's sinks and window): no table, no scale


class _Groups:
    """The ``nk`` groups of 16 values of ``rows`` rows, decoded once into a stack buffer: codes
    of ``bits`` ≤ 4 by permute, or :data:`HALVES` (16 float16 widened by ``fpext``, which every
    target has). With ``nk`` known when compiling, loops over groups are unrolled with constant
    indices and LLVM keeps the decoded vectors in registers; otherwise they are loops over the buffer."""

    def __init__(self, builder, mode, bits, rows, nk_lit, nk, src, rs, tbl):
        self.b, self.rows, self.lit, self.nk = builder, rows, nk_lit, nk
        vf = ir.VectorType(_F32, LANES)
        table = None if bits == HALVES else _table(builder, mode, tbl)
        self.buf = cgutils.alloca_once(builder, vf, size=NKMAX * ROWS)
        for k, kk in self.each():
            for r in range(rows):
                at = builder.add(builder.add(src, builder.mul(kk, _c(2 * bits))), builder.mul(rs, _c(r)))
                if bits == HALVES:
                    h = builder.load(_ptr(builder, at, ir.VectorType(ir.HalfType(), LANES)), align=2)
                    builder.store(builder.fpext(h, vf), self.slot(kk, r))
                else:
                    builder.store(_decode(builder, mode, bits, table, at), self.slot(kk, r))

    def slot(self, kk, r):
        return self.b.gep(self.buf, [self.b.add(self.b.mul(kk, _c(self.rows)), _c(r))])

    def each(self):
        """(k, k as an int64 value) for every group: constants, or one runtime loop."""
        if self.lit is not None:
            for k in range(self.lit):
                yield k, _c(k)
        else:
            with cgutils.for_range(self.b, self.nk) as loop:
                yield None, loop.index


def _scales(builder, sh, shs, rows):
    """float32 of the float16 scales at ``sh``, ``sh + shs``, … as <rows x float>."""
    out = ir.Constant(ir.VectorType(_F32, rows), ir.Undefined)
    for r in range(rows):
        h = builder.load(_ptr(builder, builder.add(sh, builder.mul(shs, _c(r))), ir.IntType(16)), align=2)
        out = builder.insert_element(out, builder.fpext(builder.bitcast(h, ir.HalfType()), _F32), ir.Constant(_I32, r))
    return out


def _dots(builder, dec, rows, q, qs, ng, finish):
    """For each query g (16·nk float32 at ``q + g·qs``): the dot products with the decoded rows,
    <rows x float>, handed to ``finish(g, sums)``."""
    vf = ir.VectorType(_F32, LANES)
    accs = [cgutils.alloca_once(builder, vf) for _ in range(rows)]  # promoted to registers
    with cgutils.for_range(builder, ng) as gl:
        for a in accs:
            builder.store(ir.Constant(vf, [0.0] * LANES), a)
        qg = builder.add(q, builder.mul(gl.index, qs))
        for k, kk in dec.each():
            qv = builder.load(_ptr(builder, builder.add(qg, builder.mul(kk, _c(4 * LANES))), vf), align=4)
            for r, a in enumerate(accs):
                builder.store(_fmuladd(builder, qv, builder.load(dec.slot(kk, r)), builder.load(a)), a)
        finish(gl.index, _row_sums(builder, [builder.load(a) for a in accs]))


def _weighted_sums(builder, dec, rows, ng, weights, acc, accs):
    """acc[g] (16·nk float32 at ``acc + g·accs``) += Σ_r w[r] · decoded row r, with
    ``weights(g)`` the <rows x float> weights of query g."""
    vf = ir.VectorType(_F32, LANES)
    with cgutils.for_range(builder, ng) as gl:
        pw = weights(gl.index)
        ws = [_splat(builder, builder.extract_element(pw, ir.Constant(_I32, r))) for r in range(rows)]
        ag = builder.add(acc, builder.mul(gl.index, accs))
        for k, kk in dec.each():
            at = _ptr(builder, builder.add(ag, builder.mul(kk, _c(4 * LANES))), vf)
            a = builder.load(at, align=4)
            for r in range(rows):
                a = _fmuladd(builder, ws[r], builder.load(dec.slot(kk, r)), a)
            builder.store(a, at, align=4)


def _row_weights(builder, p, ps, rows, scale=None):
    """The weights of query g: float32 at ``p + g·ps + 4r``, times ``scale`` if given."""
    def weights(g):
        w = builder.load(_ptr(builder, builder.add(p, builder.mul(g, ps)), ir.VectorType(_F32, rows)), align=4)
        return w if scale is None else builder.fmul(w, scale)

    return weights


def _scores_block(builder, lits, mode, src, rs, tbl, q, qs, ng, nk, sh, shs, out, outs, first):
    """out[g, r] (``out + g·outs + 4r``) = (0 if first else out[g, r]) + scale_r · <q[g], row r>."""
    bits, rows = lits[0], lits[1]
    dec = _Groups(builder, mode, bits, rows, lits[8], nk, src, rs, tbl)
    scale = _scales(builder, sh, shs, rows)
    keep = builder.icmp_signed("==", first, _c(0))

    def finish(g, sums):
        v = builder.fmul(sums, scale)
        dst = _ptr(builder, builder.add(out, builder.mul(g, outs)), ir.VectorType(_F32, rows))
        old = builder.load(dst, align=4)
        builder.store(builder.select(keep, builder.fadd(old, v), v), dst, align=4)

    _dots(builder, dec, rows, q, qs, ng, finish)


def _values_block(builder, lits, mode, src, rs, tbl, p, ps, ng, nk, sh, shs, acc, accs):
    """acc[g] (``acc + g·accs``) += Σ_r p[g, r] (``p + g·ps + 4r``) · scale_r · row r."""
    bits, rows = lits[0], lits[1]
    dec = _Groups(builder, mode, bits, rows, lits[8], nk, src, rs, tbl)
    scale = _scales(builder, sh, shs, rows)
    _weighted_sums(builder, dec, rows, ng, _row_weights(builder, p, ps, rows, scale), acc, accs)


def _f16_scores_block(builder, lits, src, rs, q, qs, ng, nk, bias, out, outs):
    """out[g, r] = <q[g], float16 row r> + bias[r], or -inf where bias[r] is -inf (that row is
    not read: an unwritten slot may hold any bits)."""
    rows = lits[0]
    vr = ir.VectorType(_F32, rows)
    dec = _Groups(builder, None, HALVES, rows, lits[6], nk, src, rs, 0)
    b = builder.load(_ptr(builder, bias, vr), align=4)
    ninf = ir.Constant(vr, [float("-inf")] * rows)
    unread = builder.fcmp_ordered("==", b, ninf)

    def finish(g, sums):
        dst = _ptr(builder, builder.add(out, builder.mul(g, outs)), vr)
        builder.store(builder.select(unread, ninf, builder.fadd(sums, b)), dst, align=4)

    _dots(builder, dec, rows, q, qs, ng, finish)


def _f16_values_block(builder, lits, src, rs, p, ps, ng, nk, acc, accs):
    """acc[g] += Σ_r p[g, r] · float16 row r (rows the caller has checked are read)."""
    rows = lits[0]
    dec = _Groups(builder, None, HALVES, rows, lits[6], nk, src, rs, 0)
    _weighted_sums(builder, dec, rows, ng, _row_weights(builder, p, ps, rows), acc, accs)


def _f16_blocks(emit, nargs):
    def body(builder, lits, *vals):
        if lits[0] not in (1, ROWS):
            raise TqedgeError(f"float16 block kernels need constant rows (1 or {ROWS}), got {lits[0]}")
        emit(builder, lits, *vals[1:])

    return _intrinsic(nargs, body)


#: ``f16_scores_block(rows, src, rs, q, qs, g, nk, bias, out, outs)``: ``rows`` (1 or :data:`ROWS`,
#: a constant) float16 rows at ``src`` (``rs`` bytes apart, 16·nk halves each) against ``g`` query
#: vectors at ``q`` (``qs`` bytes apart): ``out + g·outs + 4·r`` = dot + ``bias[r]`` (float32 at
#: ``bias + 4·r``), or -inf where that bias is -inf. Any CPU (``fpext half``).
f16_scores_block = _f16_blocks(_f16_scores_block, 10)
#: ``f16_values_block(rows, src, rs, p, ps, g, nk, acc, accs)``: ``acc + g·accs`` += Σ_r ``p[g, r]``
#: (float32 at ``p + g·ps + 4·r``) · float16 row r.
f16_values_block = _f16_blocks(_f16_values_block, 9)


def _blocks(emit, nargs, mode):
    def body(builder, lits, *vals):
        if lits[0] not in (1, 2, 3, 4) or lits[1] not in (1, ROWS):
            raise TqedgeError(f"block kernels need constant bits (1-4) and rows (1 or {ROWS}), got {lits[:2]}")
        emit(builder, lits, mode, *vals[2:])

    return _intrinsic(nargs, body)


def make_scores_block(mode: str):
    """An intrinsic ``scores_block(bits, rows, src, rs, table, q, qs, g, nk, sh, shs, out, outs,
    first)``: ``bits`` (1–4) and ``rows`` (1 or :data:`ROWS`) constants; ``rows`` code rows at
    ``src`` (``rs`` bytes apart), ``nk`` ≤ :data:`NKMAX` groups of 16 codes each (a constant
    unrolls the groups), ``table`` 16 float32; ``g`` ≤ :data:`GMAX` query vectors at ``q``
    (``qs`` bytes apart, 16·nk float32 each); float16 scales at ``sh`` (``shs`` bytes apart).
    Writes ``scale · <q, decoded row>`` for each query and row to ``out + g·outs + 4·r`` (or adds
    it there unless ``first``)."""
    if mode not in MODES:
        raise TqedgeError(f"unknown permute mode {mode!r}")
    return _blocks(_scores_block, 14, mode)


def make_values_block(mode: str):
    """An intrinsic ``values_block(bits, rows, src, rs, table, p, ps, g, nk, sh, shs, acc,
    accs)``: as :func:`make_scores_block`, ``acc + g·accs`` (16·nk float32) += Σ_r ``p[g, r]``
    (float32 at ``p + g·ps + 4·r``) · scale_r · decoded row r."""
    if mode not in MODES:
        raise TqedgeError(f"unknown permute mode {mode!r}")
    return _blocks(_values_block, 13, mode)


scores_block, values_block = make_scores_block(MODE), make_values_block(MODE)
