"""The parallel twin of the native op's prefill loop, entered through a C function pointer.

The ``TurboQuantAttention`` callback (:mod:`tqedge.runtime.native_op`) is cached machine code
with no parallel region in it: Numba links a cached parallel kernel against its thread pool's
symbols when the kernel is loaded, so code loaded before the pool started crashes when it
launches. This module starts the pool first (importing it is the decision to run in
parallel: :mod:`tqedge.runtime.kv_descriptor` imports it at the first prefill step whose thread
count is above one), then loads the parallel twin and exposes it as a ``cfunc`` address that
the descriptor hands to the op. The op calls one only while holding the process-wide launch
lock (:data:`tqedge.codec.numba_runtime.LOCK_ADDRESS`), else runs the serial twin.
"""

from __future__ import annotations

import numpy as np
from numba import carray, types
from numba.np.ufunc.parallel import _launch_threads

from tqedge.codec.numba_runtime import cfunc, njit
from tqedge.runtime import native_turboquant as NT
from tqedge.runtime.ort_numba import as_ptr

_launch_threads()  # before the parallel code below is compiled or loaded from the cache

_prefill_items_par = njit(warm=False, parallel=True, nogil=True,
                          fastmath={"reassoc", "contract", "nsz", "arcp", "afn"})(NT.prefill_items)


@cfunc(types.intp(types.intp), nogil=True)
def _prefill_entry(block_addr):
    """``prefill_items`` in parallel over the argument block at ``block_addr`` (NT.PB_*)."""
    b = carray(as_ptr(block_addr, np.int64), (NT.PB_WORDS,))
    hkv, t, g, d = b[NT.PB_HKV], b[NT.PB_T], b[NT.PB_G], b[NT.PB_D]
    dpk, dpv, nf, nc = b[NT.PB_DPK], b[NT.PB_DPV], b[NT.PB_NF], b[NT.PB_NC]
    f32 = np.float32
    qs = carray(as_ptr(b[NT.PB_QS], f32), (hkv, t * g, d))
    qp = carray(as_ptr(b[NT.PB_QP], f32), (hkv, t * g, dpk))
    kf = carray(as_ptr(b[NT.PB_KF], f32), (hkv, nf, d))
    vf = carray(as_ptr(b[NT.PB_VF], f32), (hkv, nf, d))
    pf = carray(as_ptr(b[NT.PB_PF], np.int64), (nf,))
    kd = carray(as_ptr(b[NT.PB_KD], f32), (hkv, nc, dpk))
    vd = carray(as_ptr(b[NT.PB_VD], f32), (hkv, nc, dpv))
    pc = carray(as_ptr(b[NT.PB_PC], np.int64), (nc,))
    um = carray(as_ptr(b[NT.PB_UM], f32), (dpv, d))
    rule = carray(as_ptr(b[NT.PB_RULE], np.int64), (5,))
    res = carray(as_ptr(b[NT.PB_RES], f32), (hkv, t * g, d))
    _prefill_items_par(qs, qp, g, kf, vf, pf, kd, vd, pc, um, b[NT.PB_T0], rule, res)
    return 0


PREFILL_ENTRY = _prefill_entry.address
