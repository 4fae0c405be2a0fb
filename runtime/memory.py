"""Process memory: resident set now and at peak, and the KV budget a process budget leaves.

``tqedge.load(bundle, memory="512MiB")`` (``--memory`` on every runtime command) means: the
peak resident set of the whole process stays under 512 MiB. The runtime measures what it
cannot choose and gives the KV cache the rest::

    memory = fixed + working set + KV budget

- **fixed**: the peak resident set right after loading, once one short warm-up has run
  (:func:`warm_up`: interpreter and libraries, onnxruntime's sessions and prepacked weights,
  the kernels compiled or loaded from Numba's cache): :func:`measure_fixed`, measured, not
  modelled.
- **working set**: what one prefill chunk adds on top (onnxruntime's activations in its
  arena, the attention tiles, allocator slack): :func:`working_set_bytes`, the float32
  activations of a chunk times :data:`WORKING_SET_FACTOR`, measured on the reference machine.
- **KV budget**: the rest, rounded down to a MiB (the cache's buffers are preallocated but
  only touched as tokens arrive, so they count fully once the context is full).

A budget that cannot hold the fixed cost, the working set and the smallest cache is refused
with one line naming the least memory that would do.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading

from tqedge.errors import TqedgeError
from tqedge.units import format_bytes, parse_bytes

log = logging.getLogger(__name__)

MiB = 1024**2
# Peak RSS over a prefill chunk minus the RSS after load + warm-up, divided by the chunk's float32
# activations (activation_bytes): 75 MiB / 15.1 MB ≈ 5 for SmolLM2-135M int4, 512-token chunks,
# 2 threads (benchmarks/memory.py); rounded up to 6 for allocator variance.
WORKING_SET_FACTOR = 6
WARMUP_TOKENS = 16  # prompt tokens of the warm-up forward that precedes the fixed-cost reading
WARMUP_WINDOW = 4  # its fp16 window: small, so the warm-up reads compressed keys too


_STATUS_KEYS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}


def current_rss() -> int | None:
    """Resident set of this process now, in bytes (None where the OS does not say cheaply)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def rss_breakdown(pid: int | str = "self") -> dict[str, int]:
    """Resident set of process ``pid`` from ``/proc/<pid>/status``, in bytes: ``rss`` (VmRSS),
    ``anon`` (RssAnon), ``file`` (RssFile) and ``peak`` (VmHWM: the peak of this process image
    only, unlike :func:`peak_rss`); {} where there is no /proc."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _STATUS_KEYS:
                    out[_STATUS_KEYS[key]] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _maxrss_bytes(maxrss: int) -> int:
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # Linux: KiB, macOS: bytes


def peak_rss() -> int | None:
    """Peak resident set of this process so far, in bytes (None on Windows): the kernel's
    ``ru_maxrss``, the figure a parent's ``wait4`` gets and ``--memory`` bounds. On Linux it
    includes what the parent held when it forked this process; ``rss_breakdown()["peak"]``
    (VmHWM) is this image's own peak."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def wait_child(pid: int) -> tuple[int, int, float]:
    """Reap child ``pid`` (``os.wait4``; Unix): its exit code, the kernel's peak resident set of
    it in bytes (``ru_maxrss``, which on Linux includes what this process held when it forked the
    child) and its CPU seconds (user + system). Read its pipes first."""
    _, status, ru = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), _maxrss_bytes(ru.ru_maxrss), ru.ru_utime + ru.ru_stime


#: ``madvise`` advice from <linux/mman.h>. DONTNEED: drop these pages from this process (another
#: process mapping the same file keeps them, dirty pages of a file just written stay in the page
#: cache; a page touched again is read back from the file), safe only where the mapping holds no
#: private copy of a page (a library's relocated data does; onnxruntime's writable private
#: mapping of a weight file does not, it never writes there). PAGEOUT (Linux ≥ 5.4): reclaim
#: them, for the other mappings: the kernel skips private copies (no swap) and pages other
#: processes map. RANDOM: a fault on this mapping reads no pages around the faulting one.
MADV_RANDOM, MADV_WILLNEED, MADV_DONTNEED, MADV_PAGEOUT = 1, 3, 4, 21
#: files a native op reads in place on every step (a bundle's RESIDENT_DATA): no call here releases
#: or sparsifies their pages (:func:`keep_resident`)
_KEEP: set[str] = set()
# seconds between the releases of :func:`releasing` (SmolLM2 int4, 3 loads each: 0.02 s left the
# load's peak at 297-318 MiB, 0.005 s at 295-300 MiB, for +0.07 s of load time)
RELEASE_INTERVAL = 0.005


def _file_mappings(paths=None, read_only: bool = False) -> list[tuple[int, int, bool]]:
    """(start, end, dontneed_safe) of this process's mappings of the files ``paths`` name (a file,
    or every file under a directory; None: every file), from /proc/self/smaps; ``read_only``:
    only mappings without write permission. ``dontneed_safe``: no anonymous (copy-on-write) page
    in the mapping, so every resident page is the file's own."""
    names = [os.path.realpath(p) for p in paths or ()]
    prefixes = tuple(n + os.sep for n in names)
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if not head[0].endswith(":"):  # a mapping's header line; its fields ("Rss:", ...) follow
                path = head[5].rstrip("\n") if len(head) == 6 else ""
                cur = None
                wanted = path.startswith("/") if paths is None else path in names or path.startswith(prefixes)
                wanted = wanted and path not in _KEEP
                if path and wanted and not (read_only and "w" in head[1]):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    cur = [lo, hi, True]
                    out.append(cur)
            elif cur is not None and head[0] == "Anonymous:" and int(head[1]):
                cur[2] = False
    return [tuple(m) for m in out]


def _file_mappings_to_advise(paths=None, read_only: bool = False):
    """(libc's ``madvise``, :func:`_file_mappings` of these arguments), or None where the OS has no
    such call or no /proc/self/smaps (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
        return madvise, _file_mappings(paths, read_only)
    except (OSError, AttributeError, ValueError) as e:
        log.debug("cannot advise file mappings (%s)", e)
        return None


def _advise_released(found, advice) -> int:
    """Apply ``advice(dontneed_safe)`` (an ``MADV_*`` value, or None to skip) to each mapping of
    ``found`` (from :func:`_file_mappings_to_advise`); the bytes of resident file pages released."""
    if found is None:
        return 0
    madvise, spans = found
    before = rss_breakdown().get("file", 0)
    for lo, hi, dontneed_safe in spans:
        a = advice(dontneed_safe)
        if a is not None:
            madvise(lo, hi - lo, a)
    return max(0, before - rss_breakdown().get("file", 0))


def release_file_pages(paths, concurrent: bool = False) -> int:
    """Drop this process's resident pages of the files ``paths`` name (a file, or every file under
    a directory): ``madvise`` over their mappings, ``MADV_DONTNEED`` where the mapping holds no
    private (copy-on-write) page, ``MADV_PAGEOUT`` elsewhere. ``concurrent``: another thread may
    be using those mappings (see :func:`releasing`), so ``MADV_PAGEOUT`` everywhere: it never
    discards a private page, whereas one written between reading smaps and ``DONTNEED`` would be.

    For files the process has finished reading but keeps mapped: the compiler's library once the
    kernels are loaded, a bundle's weight file once onnxruntime (or XNNPACK) has packed the
    weights into its own memory. Their pages are clean and reclaimable anyway, but they count in
    the resident set (and against ``--memory``) until the kernel needs the room. A page touched
    again is read back from the file. Returns the bytes of resident file pages released; 0 where
    the OS has no such call (not Linux).
    """
    return _advise_released(_file_mappings_to_advise(paths),
                            lambda safe: MADV_DONTNEED if safe and not concurrent else MADV_PAGEOUT)


def release_code_pages() -> int:
    """Drop this process's resident pages of its read-only file mappings that hold no private
    page (``MADV_DONTNEED``): the code and constants of every shared library, and any file mapped
    read-only. Pages still in use come back at their next touch, from the page cache (a minor
    fault); the rest, code that ran once (imports, the session build, onnxruntime's graph
    optimizer, the tokenizer's parser), stays out. ``Model`` calls it after the load's warm-up,
    which ran the code a prompt runs. Read-only mappings without a private page cannot lose a
    write (a library's relocated data holds private pages, and is skipped). Measured, SmolLM2
    int4: file pages after load 45 -> 3 MiB, 21 MiB after a 512-token prompt (47 before), decode
    unchanged. Returns the bytes released; 0 where the OS has no such call (not Linux)."""
    return _advise_released(_file_mappings_to_advise(None, read_only=True),
                            lambda safe: MADV_DONTNEED if safe else None)


@contextlib.contextmanager
def releasing(paths, interval: float = RELEASE_INTERVAL):
    """Run the block while a thread releases ``paths``' file pages every ``interval`` seconds
    (:func:`release_file_pages`, ``concurrent``). For a block that reads files once through its
    own mappings and releases the GIL, as building an onnxruntime session does: it maps the
    weight file, reads every weight once to pack it into its own memory, and the packed copy and
    the pages it was read from were both resident at the end of the build (measured, SmolLM2
    int4: the load's peak RSS 322 MiB, ~50 MiB of it the weight file's pages)."""
    done = threading.Event()

    def run():
        while not done.wait(interval):
            release_file_pages(paths, concurrent=True)

    thread = threading.Thread(target=run, name="tqedge-release", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def keep_resident(paths) -> int:
    """Exempt the files ``paths`` from every release here, and read their mapped pages in now
    (``MADV_WILLNEED``): weights a native op reads in place on every step (a bundle's
    ``RESIDENT_DATA``, which onnxruntime maps), so the first prompt does not fault them in one
    page at a time. Returns the number of mappings advised (0 off Linux)."""
    if not paths:
        return 0
    found = _file_mappings_to_advise(paths)
    _KEEP.update(os.path.realpath(p) for p in paths)
    if found is None:
        return 0
    madvise, spans = found
    return sum(madvise(lo, hi - lo, MADV_WILLNEED) == 0 for lo, hi, _ in spans)


def read_sparsely(paths) -> int:
    """From now on, fetch only the pages of ``paths``' files that are touched: ``MADV_RANDOM`` on
    this process's mappings of them (a fault reads no pages around it) and ``POSIX_FADV_DONTNEED``
    on the files (their clean pages no process maps leave the page cache, so a fault has no
    cached neighbours to map either: Linux maps up to 16 cached pages around a faulting one).

    For a bundle after load, once :func:`release_file_pages` dropped its pages: onnxruntime then
    reads only the embedding rows of the tokens seen (and a few small tensors), one page each,
    instead of 64 KiB around each (measured, SmolLM2 int4: 15 MiB of the weight file resident
    after 512 prompt tokens, under 2 MiB with this; 30 -> 9 MiB at 8K). Other processes keep
    what they map; one that reads the file later reads it from disk. Returns the number of
    mappings advised; 0 where the OS has no such calls (not Linux).
    """
    found = _file_mappings_to_advise(paths)
    if found is None:
        return 0
    madvise, spans = found
    advised = sum(madvise(lo, hi - lo, MADV_RANDOM) == 0 for lo, hi, _ in spans)
    for root in paths:
        files = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for path in (f for f in files if os.path.realpath(f) not in _KEEP):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)
    return advised


#: glibc's ``mallopt`` parameter and the value tqedge sets: blocks of 1 MiB or more get their own
#: mapping, returned to the OS when freed. glibc's default threshold starts at 128 KiB and rises
#: to the size of any such block freed (up to 32 MiB); after the first prefill the attention op's
#: per-call temporaries (MBs at long context: the compressed ring decoded for the step) then come
#: from the heap and stay resident. Measured (SmolLM2 int4, 8K context): peak RSS 487 -> 431 MiB,
#: decode unchanged. Set by the native backend only: the segment path's kernels allocate tens of
#: MB per layer call, and mapping them afresh each call doubled its time (a 4K-token fill through
#: ``cache.attend``: 37-39 s -> 77-90 s).
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 1024**2


def fix_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process (large temporaries
    go back to the OS when freed; the native backend calls it), unless the user set one
    (``MALLOC_MMAP_THRESHOLD_`` or a ``glibc.malloc.mmap_threshold`` tunable). True if set;
    False on other C libraries."""
    if not _glibc() or "MALLOC_MMAP_THRESHOLD_" in os.environ \
            or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        return ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name on this OS
        return False


def trim_heap() -> bool:
    """Give the free pages inside the C heap back to the OS (glibc's ``malloc_trim``); True if
    called. ``Model`` calls it after parsing the tokenizer, before the backend loads: parsing
    ``tokenizer.json`` (a 49K-token BPE) peaks ~40 MiB above the tokenizer it keeps, and glibc
    keeps the freed pages resident where later allocations of other sizes never reuse them
    (measured: +30 MiB resident after the parse, +14 after a trim)."""
    if not _glibc():
        return False
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def compiler_dirs() -> list[str]:
    """Where the kernel compiler's libraries live (llvmlite's package), if it is loaded: after the
    kernels are loaded from Numba's cache the process no longer runs the compiler."""
    mod = sys.modules.get("llvmlite")
    return [os.path.dirname(mod.__file__)] if mod is not None and getattr(mod, "__file__", None) else []


def activation_bytes(a, chunk: int) -> int:
    """float32 activations of a prefill step of ``chunk`` tokens: the residual stream, q/k/v,
    the MLP's gate/up/product, and one row of logits (only the last position gets logits)."""
    per_token = 3 * a.hidden_size + (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + 3 * a.intermediate_size
    return 4 * (chunk * per_token + a.vocab_size)


def working_set_bytes(a, chunk: int) -> int:
    """What a forward of ``chunk`` tokens adds to the resident set (measured factor, see module)."""
    return WORKING_SET_FACTOR * activation_bytes(a, chunk)


def warm_up(model) -> None:
    """One short run through a throwaway cache with a :data:`WARMUP_WINDOW`-token window: a prefill
    of :data:`WARMUP_TOKENS` tokens and two decode steps, so every kernel the default cache calls
    is loaded from Numba's cache (or compiled) and onnxruntime's arena is primed. ``Model`` runs it
    at load, before it releases the compiler's pages: loading a kernel touches the compiler's
    library again, and in a first prompt those pages came back on top of the prompt's own
    (measured, SmolLM2 int4: peak RSS at 512 tokens -11 MiB, at 8K -22 MiB)."""
    from tqedge.runtime.generate import decode_one_token, prefill

    opts = {**model.cache_defaults, "window": WARMUP_WINDOW, "policy": "slide"}
    opts["kv_budget"] = kv_bytes(model.manifest, 0, **opts)
    cache = model.new_cache(**opts)
    token = int(prefill(model, cache, [0] * WARMUP_TOKENS).argmax())
    for _ in range(2):
        token = int(decode_one_token(model, cache, token).argmax())


def measure_fixed() -> int:
    """The model's fixed cost: the peak RSS so far, read after ``Model`` loaded and warmed up
    (:func:`warm_up`). The peak, not the current RSS: load and compilation peak above the
    steady state (for an fp32 bundle by ~70 MiB), and the process has already been there."""
    return max(current_rss() or 0, peak_rss() or 0)


def kv_bytes(manifest, tokens: int, kv_bits=None, window=None, sinks=None, rotation=None, norm=None, qjl=None,
             **_) -> int:
    """Budget a cache of this configuration needs for ``tokens`` tokens (at least its minimum);
    a model with sliding-window layers pays their fixed rings first (runtime/sliding_cache.py).
    Sized from the layouts alone: nothing is allocated."""
    import numpy as np

    from tqedge.runtime.cache import ExactKVCache, codec_configs
    from tqedge.runtime.compressed_cache import MIN_COMPRESSED, CompressedKVCache
    from tqedge.runtime.kv_spec import parse_kv_spec
    from tqedge.runtime.sliding_cache import WindowKVCache

    a, kv = manifest.architecture, manifest.kv
    h, d = a.num_kv_heads, a.head_dim
    sinks = kv.sinks if sinks is None else int(sinks)
    window = kv.window if window is None else int(window)
    bits, layer_bits = (None, None) if kv_bits is None else parse_kv_spec(kv_bits)
    exact = kv_bits is not None and bits is None
    windows = [a.layer_window(i) for i in range(a.num_layers)]
    full = [i for i, w in enumerate(windows) if w is None]
    sliding = [w for w in windows if w is not None]
    rings = WindowKVCache.layout_bytes(len(sliding), h, d, sliding[0], np.float32 if exact else np.float16) \
        if sliding else 0
    if exact:
        return rings + max(tokens, sinks + 2) * ExactKVCache.bytes_per_token(len(full), h, d)
    keys, values = codec_configs(kv, a.num_layers, d, bits, rotation, norm, qjl, layer_bits=layer_bits)
    fixed, per = CompressedKVCache.layout_bytes([keys[i] for i in full], [values[i] for i in full], h, d, sinks,
                                                window)
    return rings + fixed + max(tokens - sinks, window + MIN_COMPRESSED) * per


def kv_budget_for(memory, fixed: int, working: int, min_kv: int, kv_budget=None) -> int:
    """The KV budget a process budget of ``memory`` leaves, or the given ``kv_budget`` checked
    against it.

    Raises:
        TqedgeError: the fixed cost, the working set and the smallest cache (or the given
            ``kv_budget``) do not fit; the message names the least memory that would.
    """
    memory = parse_bytes(memory)
    want = min_kv if kv_budget is None else parse_bytes(kv_budget)
    need = fixed + working + want
    if need > memory:
        what = "the smallest KV cache" if kv_budget is None else f"--kv-budget {format_bytes(want)}"
        raise TqedgeError(
            f"--memory {format_bytes(memory)} is too small: needs at least {-(-need // MiB)} MiB at this "
            f"context ({format_bytes(fixed)} measured after load, {format_bytes(working)} working set of a "
            f"prefill chunk, {format_bytes(want)} for {what})")
    if kv_budget is not None:
        return want
    return max(min_kv, (memory - fixed - working) // MiB * MiB)
