"""How tqedge runs Numba: threading layer, parallel launches, thread count, on-disk cache.

Imported by :mod:`tqedge.codec.kernels` before any kernel is defined, so everything here is
settled before Numba compiles or launches anything:

- **Threading layer: ``workqueue``**, unless the user set ``NUMBA_THREADING_LAYER``. It ships
  inside Numba on every platform (no system libgomp, which a bare arm64 Debian lacks; TBB has
  no aarch64 wheel) and its workers block on a condition variable between kernels: no spinning
  pool steals the core onnxruntime or another process needs (GNU OpenMP spins by default
  unless ``OMP_WAIT_POLICY=PASSIVE``, which users don't set). Its one flaw, aborting the
  process when two threads launch parallel kernels at once, is removed by :func:`launch`:
  a parallel kernel runs only while holding one process-wide lock word (:data:`LOCK_ADDRESS`,
  taken by compare-and-swap, so the native op takes the same lock from nopython code on
  onnxruntime's thread), and a thread that finds it held runs the kernel's serial twin
  instead (same results) rather than waiting.
- **Thread count**: :func:`set_threads` (per calling thread, like ``numba.set_num_threads``;
  ``Model.forward`` sets it from ``load(threads=)`` / ``--threads``). With 1 thread the
  parallel twins never run, so Numba's pool is never even started.
- **Cache**: compiled kernels go to ``tqedge.paths.numba_cache_dir() / "src-<key>-<simd>"``
  (``user_cache_dir() / "numba"`` unless the user set ``NUMBA_CACHE_DIR``; the key,
  :func:`source_key`, changes with any tqedge module, because Numba would otherwise load
  stale code for a kernel whose callees changed; ``<simd>`` is
  :data:`tqedge.codec.simd.MODE`, which the kernels freeze) — never into
  site-packages, where stale cache files outlive a ``pip uninstall`` and turn ``tqedge/`` into
  a namespace package that shadows a later editable install. :func:`njit` scopes Numba's
  ``CACHE_DIR`` to the decoration of tqedge's own kernels (:func:`cfunc` for the native op's
  callbacks) (Numba binds a function's cache
  location when it is decorated), so other Numba code in the process keeps its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import threading
import types
from contextlib import contextmanager
from pathlib import Path

from tqedge.paths import numba_cache_dir

log = logging.getLogger(__name__)

LAYER = "workqueue"
if "NUMBA_THREADING_LAYER" not in os.environ:  # read by numba at import and at config reload
    os.environ["NUMBA_THREADING_LAYER"] = LAYER

import numba  # noqa: E402  (after the threading layer is chosen)
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.core import types as _nt  # noqa: E402
from numba.extending import intrinsic  # noqa: E402
from numba.np.ufunc import parallel as _parallel  # noqa: E402

if os.environ["NUMBA_THREADING_LAYER"] == LAYER and numba.config.THREADING_LAYER != LAYER:
    numba.config.THREADING_LAYER = LAYER  # numba was imported before tqedge set the variable
if _parallel._is_initialized and numba.threading_layer() != numba.config.THREADING_LAYER:
    log.warning("Numba's thread pool already runs the %s layer (started before tqedge was imported)",
                numba.threading_layer())

_tls = threading.local()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: threads a parallel kernel may use: Numba's pool size, at most the cores this process may run on
MAX_THREADS = max(1, min(numba.config.NUMBA_NUM_THREADS, _usable_cores()))


def set_threads(n: int | None) -> None:
    """Threads the kernels may use when called from this thread (None: :data:`MAX_THREADS`).

    Values above :data:`MAX_THREADS` are clamped; 1 runs every kernel serially."""
    _tls.threads = MAX_THREADS if n is None else max(1, min(int(n), MAX_THREADS))


# -- the on-disk cache ---------------------------------------------------------------------
def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def cache_dir() -> Path:
    """Where tqedge's compiled kernels are cached: :func:`tqedge.paths.numba_cache_dir`, or a
    per-user temporary directory if that is not writable (never next to the installed sources)."""
    return _CACHE_DIR


def source_key() -> str:
    """A digest of the size and mtime of every module of tqedge (its ``runtime`` included).

    Numba checks a cached kernel only against its own source file, not the kernels it calls
    or the constants it reads from other modules: after an edit there (or an upgrade that
    kept a file's mtime), it would load stale machine code. Naming the cache directory by
    this key recompiles after any change instead."""
    import importlib.util

    import tqedge

    roots = {Path(tqedge.__file__).resolve().parent}
    spec = importlib.util.find_spec("tqedge.runtime")
    roots |= {Path(p).resolve() for p in (spec.submodule_search_locations or [])} if spec else set()
    h = hashlib.sha256()
    for root in sorted(roots):
        for f in sorted(root.rglob("*.py")):
            st = f.stat()
            h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def _choose_cache_dir() -> Path:
    from tqedge.codec.simd import MODE  # frozen into the kernels' machine code

    want = numba_cache_dir() / f"src-{source_key()}-{MODE}"
    if _writable(want):
        return want
    user = os.getuid() if hasattr(os, "getuid") else "user"
    fallback = Path(tempfile.gettempdir()) / f"tqedge-numba-{user}" / want.name
    log.warning("cannot write the kernel cache to %s; using %s", want, fallback)
    return fallback


_CACHE_DIR = _choose_cache_dir()


@contextmanager
def _cache_dir_scope():
    old = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(cache_dir())
    try:
        yield
    finally:
        numba.config.CACHE_DIR = old


#: every kernel made by :func:`njit`, in definition order (warm-up and its test enumerate them)
DISPATCHERS: list = []


def njit(*, parallel: bool = False, warm: bool = True, **opts):
    """``numba.njit(cache=True, **opts)`` whose cache lives in :func:`cache_dir` (the cache
    location is bound when the function is decorated). ``warm``: registered in
    :data:`DISPATCHERS`, which the warm-up compiles (the native op's kernels are not: they
    compile with its session)."""
    def decorate(fn):
        with _cache_dir_scope():
            disp = numba.njit(cache=True, parallel=parallel, **opts)(fn)
        if warm:
            DISPATCHERS.append(disp)
        return disp
    return decorate


#: callables run once, before the first :func:`cfunc` of the process is compiled or loaded
#: (``tqedge.runtime`` registers the one that compiles the native op in a child process)
BEFORE_FIRST_CFUNC: list = []


def cfunc(sig, **opts):
    """``numba.cfunc(sig, cache=True, **opts)`` whose cache lives in :func:`cache_dir` (a cfunc
    compiles when it is decorated; :data:`BEFORE_FIRST_CFUNC` runs first)."""
    def decorate(fn):
        while BEFORE_FIRST_CFUNC:
            BEFORE_FIRST_CFUNC.pop(0)()
        with _cache_dir_scope():
            return numba.cfunc(sig, cache=True, **opts)(fn)
    return decorate


def serial_twin(fn):
    """A copy of ``fn`` under its own name. Numba's disk cache keys entries by the function's
    name, line and bytecode, not by ``parallel``: compiled from one function object, the serial
    twin would load the parallel machine code from the cache (or the reverse)."""
    name = fn.__name__ + "_serial"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


# -- the launch lock: one int64 word, taken with compare-and-swap from Python (``launch``) and
# from nopython code (the native op reads its address from kv_desc)
@intrinsic
def _cas64(typingctx, addr, expected, new):
    """Atomic compare-and-swap of the int64 at ``addr`` (seq_cst); returns the old value."""
    if not all(isinstance(t, _nt.Integer) for t in (addr, expected, new)):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(context.cast(builder, args[0], addr, _nt.int64), ir.IntType(64).as_pointer())
        old = builder.cmpxchg(ptr, context.cast(builder, args[1], expected, _nt.int64),
                              context.cast(builder, args[2], new, _nt.int64), "seq_cst", "seq_cst")
        return builder.extract_value(old, 0)

    return _nt.int64(addr, expected, new), codegen


@intrinsic
def load_acquire(typingctx, addr):
    """Atomic read (acquire) of the int64 at ``addr``: a plain load on x86 and AArch64, never
    hoisted out of a loop; for spinning on a word without taking its cache line exclusive."""
    if not isinstance(addr, _nt.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(context.cast(builder, args[0], addr, _nt.int64), ir.IntType(64).as_pointer())
        return builder.load_atomic(ptr, "acquire", 8)

    return _nt.int64(addr), codegen


_MACHINE = platform.machine().lower()


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint: ``pause`` on x86, ``yield`` on AArch64, nothing elsewhere."""
    def codegen(context, builder, sig, args):
        mod = builder.module
        if _MACHINE in ("x86_64", "amd64", "i686", "i386"):
            fn = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(fn, [])
        elif _MACHINE in ("aarch64", "arm64"):
            fn = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [ir.IntType(32)]),
                                                "llvm.aarch64.hint")
            builder.call(fn, [ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()

    return _nt.none(), codegen


@njit(warm=False, nogil=True)
def try_acquire(addr: int) -> bool:
    """Take the launch lock at ``addr`` if it is free (never waits)."""
    return _cas64(addr, 0, 1) == 0


@njit(warm=False, nogil=True)
def release(addr: int) -> None:
    """Free the launch lock at ``addr`` (held by the caller)."""
    _cas64(addr, 1, 0)


#: the process-wide launch lock word (0 free, 1 held): a parallel kernel runs only while holding it
LOCK_WORD = np.zeros(1, np.int64)
LOCK_ADDRESS = LOCK_WORD.ctypes.data


def current_threads() -> int:
    """Threads the kernels may use when called from this thread (see :func:`set_threads`)."""
    return getattr(_tls, "threads", MAX_THREADS)


def sync_pool_threads() -> int:
    """Give Numba's per-thread pool size this thread's :func:`current_threads` (for a parallel
    kernel launched from nopython code on this thread, e.g. inside the native op); returns it."""
    n = current_threads()
    if n > 1 and getattr(_tls, "numba_threads", 0) != n:  # numba's count is per thread, too
        numba.set_num_threads(n)
        _tls.numba_threads = n
    return n


def launch(parallel, serial, *args):
    """Run ``parallel(*args)`` on this thread's thread count if it is > 1 and no other parallel
    kernel is running in the process, else ``serial(*args)`` (same results)."""
    if current_threads() > 1 and try_acquire(LOCK_ADDRESS):
        try:
            sync_pool_threads()
            return parallel(*args)
        finally:
            release(LOCK_ADDRESS)
    return serial(*args)
