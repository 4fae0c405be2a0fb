"""Cold start: compile the attention kernels once per install and device, not in a user's chat.

A Numba kernel compiles at its first call (seconds to minutes on a small board: the first
decode steps after a fresh install took 64 s, 15 s and 6 s) unless its machine code is in the
on-disk cache (:mod:`tqedge.codec.numba_runtime`). :func:`warmup` runs a one-layer compressed
cache through the calls a chat makes — chunked prefill past the parallel threshold, decode on
short and long contexts, across a window backlog encode and after a trim — so every signature
the runtime uses is compiled and cached at once: dtypes *and* array layouts (the cache passes
ring slices, fancy-indexed copies and, with one scale per vector, Fortran-ordered scale arrays;
serial and parallel twins). Driving the cache's own API rather than a list of signatures keeps
it exact as the cache changes; ``tests/test_warmup.py`` checks that a real generate afterwards
compiles nothing new.

The layouts depend on the model's shape (one KV head or several; one scale per vector or
more), so the warm-up uses the bundle's KV heads, head size and bit widths. :func:`ensure_warm`
runs it when no marker says this was done: ``tqedge.load`` compiles what a short chat needs
(what its first two tokens would compile anyway, so the second token no longer stalls); the
rest — prefill over compressed keys, the parallel twins of long contexts — compiles at first
use, once per device, unless ``tqedge doctor --warmup`` compiled all of it ahead (measured:
compiling everything at load cost a cold first token 56 s CPU instead of 6; compiling the
rest in a background thread slowed the user's decode steps ~4x while it ran, and a short
``tqedge generate`` exited before it finished). The marker is a file in the kernel cache
directory named by a hash of what Numba's cache depends on (kernel sources, Numba, Python,
CPU) and of that shape, so clearing the directory, upgrading, editing a kernel or loading a
differently shaped model warms up again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CHUNK = 256  # prefill chunk of the warm-up
WARM_PARALLEL_MIN = 4096  # the parallel twins' threshold during the warm-up (the code is the same at any size)
SHORT_PROMPT = 32  # inside the window: a short chat's prefill reads no compressed keys


@dataclass(frozen=True)
class Shape:
    """What the kernels' argument layouts depend on: KV heads, head size, the (key, value) bit
    widths to run (one per distinct scale-count combination), QJL keys, rotation."""

    num_kv_heads: int = 2
    head_dim: int = 64
    bits: tuple[tuple[float, float], ...] = ((4.0, 3.0),)
    qjl: bool = False
    rotation: str = "hadamard"

    @classmethod
    def of(cls, manifest) -> "Shape":
        """The shape of a bundle's default KV cache (every per-layer bit width it uses)."""
        kv, a = manifest.kv, manifest.architecture
        pairs = {(float(kv.key_bits), float(kv.value_bits))}
        pairs |= {(float(k), float(v)) for k, v in (kv.layer_bits or {}).values()}
        return cls(a.num_kv_heads, a.head_dim, tuple(sorted(pairs)), bool(kv.qjl), kv.rotation)

    def kv_spec(self):
        from tqedge.bundle import KVSpec

        return KVSpec(qjl=self.qjl, rotation=self.rotation)


def _layouts(shape: Shape) -> list[tuple[float, float]]:
    """One bit pair per distinct (key scales, value scales) count: the rest compile the same."""
    from tqedge.runtime.cache import build_codecs

    seen, out = set(), []
    for bits in shape.bits:
        keys, values = build_codecs(shape.kv_spec(), 1, shape.head_dim, bits)
        key = (keys[0].num_scales == 1, values[0].num_scales == 1)
        if key not in seen:
            seen.add(key)
            out.append(bits)
    return out


def _device_key() -> dict:
    """What compiled machine code depends on besides the sources: Numba, Python, the CPU."""
    import llvmlite.binding as ll
    import numba

    return {"numba": numba.__version__, "python": sys.version, "machine": platform.machine(),
            "cpu": [ll.get_process_triple(), ll.get_host_cpu_name(), ll.get_host_cpu_features().flatten()]}


def marker_path(shape: Shape = Shape()) -> Path | None:
    """The marker of a completed warm-up for this install, device and shape (None without Numba)."""
    from tqedge.codec import kernels

    if kernels.BACKEND != "numba":
        return None
    from tqedge.codec import numba_runtime
    from tqedge.runtime import compressed_cache, sampling_numba  # noqa: F401  (every kernel module)

    sources = sorted({d.py_func.__code__.co_filename for d in numba_runtime.DISPATCHERS})
    key = {**_device_key(),
           "sources": [[f, Path(f).stat().st_mtime_ns, Path(f).stat().st_size] for f in sources],
           "shape": [shape.num_kv_heads == 1, _layouts(shape), shape.qjl, shape.rotation]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return numba_runtime.cache_dir() / f"warm-{digest}.json"


def warmup(shape: Shape = Shape(), short: bool = True, long: bool = True) -> float:
    """Compile (or load from the disk cache) every kernel signature the runtime uses for ``shape``.

    Args:
        shape: the model shape (see :class:`Shape`).
        short: what a short chat needs first: a prompt inside the window, decode (the serial
            twins) until keys are read compressed, a window backlog encode.
        long: the rest: prefill over compressed keys (dequantize, in every layout), the
            parallel twins (with their threshold lowered to :data:`WARM_PARALLEL_MIN` head·keys
            for the warm-up, so a few thousand keys reach them), a trim and re-prefill.

    Returns:
        Seconds it took.
    """
    from tqedge.codec import kernels, kernels_numba
    from tqedge.runtime.cache import build_codecs
    from tqedge.runtime.compressed_cache import CompressedKVCache

    t0 = time.perf_counter()
    kv, h, d = shape.kv_spec(), shape.num_kv_heads, shape.head_dim
    rng = np.random.default_rng(0)
    kernels.set_threads(None)  # the parallel twins too (where there is more than one core)
    if short:  # the sampled draw, with make_sampler's argument types
        from tqedge.runtime.sampling_numba import sample

        sample(rng.standard_normal(64).astype(np.float32), 0.7, 8, 0.9, 0.05, 0.5)
    threshold, kernels_numba.PARALLEL_MIN = kernels_numba.PARALLEL_MIN, WARM_PARALLEL_MIN
    try:
        for bits in _layouts(shape):
            keys, values = build_codecs(kv, 1, d, bits)
            n_long = -(-WARM_PARALLEL_MIN // h) + kv.window + CHUNK  # compressed keys past the parallel threshold

            def step(cache, t: int) -> None:
                cache.prepare(t)
                q = rng.standard_normal((t, 2 * h, d), dtype=np.float32)  # 2 query heads per KV head
                k = rng.standard_normal((t, h, d), dtype=np.float32)
                v = rng.standard_normal((t, h, d), dtype=np.float32)
                cache.attend(0, q, k, v, d ** -0.5)
                cache.commit()

            if short:  # a short chat: prompt inside the window, decode until keys leave it
                cache = CompressedKVCache(keys, values, h, d, ring=4 * kv.window, sinks=kv.sinks, window=kv.window)
                step(cache, SHORT_PROMPT)
                for _ in range(kv.window + 2):  # compressed keys appear; crosses a window backlog encode
                    step(cache, 1)
            if long:  # prefill over compressed keys, then long contexts (the parallel twins)
                cache = CompressedKVCache(keys, values, h, d, ring=n_long + 2 * kv.window, sinks=kv.sinks, window=kv.window)
                while cache.offset < n_long:
                    step(cache, min(CHUNK, n_long - cache.offset))
                step(cache, 1)
                cache.trim(3)  # a regenerated reply: re-prefill over keys that lost their fp16 copy
                step(cache, 2)
                step(cache, 1)
    finally:
        kernels_numba.PARALLEL_MIN = threshold
    return time.perf_counter() - t0


def _write_marker(path: Path, seconds: float) -> None:
    from tqedge.files import atomic_write_bytes

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps({"seconds": round(seconds, 2), "time": time.time()}) + "\n").encode())
    except OSError as e:  # a read-only cache: warm for this process only
        log.warning("cannot write %s: %s", path, e)


def ensure_warm(manifest=None, force: bool = False, full: bool = False) -> float | None:
    """Warm up for ``manifest``'s shape (default: a generic one) unless a marker says it was
    done (or ``force``), then write the marker.

    Args:
        manifest: the bundle's manifest (its KV shape), or None for a generic shape.
        force: warm up even if the marker exists.
        full: everything (``tqedge doctor --warmup``); else the short-chat part only
            (``tqedge.load``: what a short chat's first two tokens would compile anyway). The
            rest then compiles at first use and is cached like any kernel.

    Returns:
        Seconds spent, or None when already warm (or there is nothing to compile).
    """
    shape = Shape.of(manifest) if manifest is not None else Shape()
    path = marker_path(shape)
    if path is None:
        return None
    full_path = path.with_name(path.stem + "-full.json")
    if not force and (full_path.is_file() or (path.is_file() and not full)):
        return None
    log.warning("compiling the attention kernels for this device (once; cached in %s)", path.parent)
    seconds = warm_in_child(shape, full)
    if seconds is None:  # no child process here: compile in this one
        seconds = warmup(shape, long=full) + compile_native()
    else:  # the child compiled the native op too
        _write_marker(native_marker(), seconds)
    _write_marker(path, seconds)
    if full:
        _write_marker(full_path, seconds)
    log.info("kernels compiled in %.1fs", seconds)
    return seconds


def compile_native() -> float:
    """Compile (or load) the native op's cfuncs (they compile when their module is imported);
    returns seconds. Nothing to do where the op cannot run (no onnxruntime C API)."""
    t0 = time.perf_counter()
    try:
        from tqedge.runtime import native_op  # noqa: F401
    except (ImportError, OSError) as e:
        log.info("native op not compiled: %s", e)
    return time.perf_counter() - t0


CHILD_ENV = "TQEDGE_WARMUP_CHILD"  # set in the child: it compiles, it does not spawn another


def warm_in_child(shape: Shape, full: bool) -> float | None:
    """Run the warm-up (:func:`warmup` and :func:`compile_native`) in a child Python process that
    fills the kernel cache, so this process loads every kernel from the cache; returns the
    child's seconds, or None when the child could not run (the caller then compiles here).

    Why a child: a kernel compiled in this process and the same kernel loaded from the cache are
    not always the same machine code (Numba links a callee's code into its caller and the
    process resolves a shared symbol to whichever copy it loaded first), and float sums in the
    last bits were enough to change the README prompt's first token between a fresh and a warm
    install. Loading from the cache in every process, the first one included, gives every run
    the same code. The compiler's peak memory (~400 MiB above a warm load) stays in the child."""
    return _run_child([json.dumps(asdict(shape))] + (["--full"] if full else []))


def _run_child(args: list[str]) -> float | None:
    """``python -P -m tqedge.runtime.warmup ARGS`` on this process's tqedge: the child's seconds,
    or None (logged) when it could not run, failed or compiled into another cache directory."""
    import os
    import subprocess

    import tqedge

    if os.environ.get(CHILD_ENV):
        return None
    from tqedge.codec import numba_runtime

    root = str(Path(tqedge.__file__).resolve().parents[1])  # the tqedge this process imported
    env = {**os.environ, CHILD_ENV: "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:  # -P: not the working directory first on sys.path (a source checkout there would shadow this tqedge)
        r = subprocess.run([sys.executable, "-P", "-m", "tqedge.runtime.warmup", *args], env=env,
                           capture_output=True, text=True, timeout=3600)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        log.warning("warm-up child did not run (%s); compiling in this process", e)
        return None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning("warm-up child failed (exit %d: %s); compiling in this process", r.returncode, last)
        return None
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out["cache_dir"] != str(numba_runtime.cache_dir()):  # it imported other tqedge sources
        log.warning("warm-up child compiled into %s, not %s; compiling in this process",
                    out["cache_dir"], numba_runtime.cache_dir())
        return None
    return float(out["seconds"])


def native_marker() -> Path:
    """The marker of the native op's kernels compiled into the cache (per Numba, Python, CPU;
    the cache directory itself is per tqedge source)."""
    from tqedge.codec import numba_runtime

    digest = hashlib.sha256(json.dumps(_device_key(), sort_keys=True).encode()).hexdigest()[:16]
    return numba_runtime.cache_dir() / f"native-{digest}.json"


def _native_in_child() -> None:
    """Before this process compiles or loads its first cfunc: unless the marker says they are
    cached, compile the native op's kernels in a child (see :func:`warm_in_child`)."""
    import os

    if os.environ.get(CHILD_ENV):
        return
    path = native_marker()
    if path.is_file():
        return
    log.warning("compiling the native op's kernels for this device (once; cached in %s)", path.parent)
    seconds = _run_child(["--native"])
    if seconds is not None:
        _write_marker(path, seconds)


def register_native_hook() -> None:
    """Make the first cfunc of the process wait for :func:`_native_in_child` (``tqedge.runtime``
    calls this at import, so importing the native op before ``tqedge.load`` is covered too)."""
    from tqedge.codec import kernels, numba_runtime

    if kernels.BACKEND == "numba" and _native_in_child not in numba_runtime.BEFORE_FIRST_CFUNC:
        numba_runtime.BEFORE_FIRST_CFUNC.append(_native_in_child)


def _main(argv: list[str]) -> None:
    """The child of :func:`_run_child`: ``python -m tqedge.runtime.warmup SHAPE_JSON [--full]`` or
    ``--native`` (the native op's kernels only)."""
    if argv[0] == "--native":
        seconds = compile_native()
    else:
        d = json.loads(argv[0])
        shape = Shape(**{**d, "bits": tuple(map(tuple, d["bits"]))})
        seconds = compile_native() + warmup(shape, long="--full" in argv[1:])
    from tqedge.codec import numba_runtime

    print(json.dumps({"seconds": round(seconds, 2), "cache_dir": str(numba_runtime.cache_dir())}))


if __name__ == "__main__":
    _main(sys.argv[1:])
