"""The process memory budget (runtime/memory.py): ``--memory`` is the peak RSS of the whole
process, measured by the kernel (``wait4``'s ``ru_maxrss`` of the child), not by tqedge; a budget
that cannot fit is refused with one line naming what would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from _bundles import smollm2_bundle  # noqa: F401  (fixture)

from tqedge.errors import TqedgeError
from tqedge.runtime import memory

MiB = 1024**2


def _generate(bundle, prompt: str, *args) -> tuple[int, str, str, int]:
    """Run ``tqedge generate`` in a child; (exit code, stdout, stderr, child peak RSS in bytes)."""
    cmd = [sys.executable, "-m", "tqedge.cli", "generate", str(bundle), "--raw", "--threads", "2",
           "--max-tokens", "4", "--json", *args]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(prompt, timeout=600)
    _, status, usage = os.wait4(p.pid, 0) if p.returncode is None else (p.pid, 0, None)
    if usage is None:  # communicate() already reaped it: ask the kernel for the children's peak
        import resource

        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    else:
        peak = usage.ru_maxrss * 1024
    return p.returncode, out, err, peak


@pytest.mark.parametrize("spin", [[], ["--spin"]], ids=["default", "spin"])
def test_generate_stays_under_memory_and_refuses_what_cannot_fit(smollm2_bundle, wikitext, spin):
    prompt = wikitext[:2600]  # ~600 tokens: several full prefill chunks
    # far too small: refused at load with one line that names the least memory that would do
    code, out, err, _ = _generate(smollm2_bundle, prompt, "--memory", "64MiB", *spin)
    assert code == 2 and out == ""
    # on a cold kernel cache the load first logs its one-off compile notice (WARNING ...: compiling ...)
    lines = [ln for ln in err.strip().splitlines() if not re.match(r"WARNING \S+: compiling ", ln)]
    assert len(lines) == 1 and lines[0].startswith("error: --memory 64.0 MiB is too small"), err
    need = int(re.search(r"needs at least (\d+) MiB", lines[0]).group(1))
    # a budget just above that minimum runs, and the kernel's peak RSS of the process stays under it
    budget = need + 24
    code, out, err, peak = _generate(smollm2_bundle, prompt, "--memory", f"{budget}MiB", *spin)
    assert code == 0, err
    stats = json.loads(out)["stats"]
    assert stats["kv_capacity_bytes"] >= 24 * MiB  # the KV cache got the rest
    assert stats["peak_memory_bytes"] <= budget * MiB
    assert peak <= budget * MiB, (peak / MiB, budget)


def test_kv_budget_for_gives_the_rest_or_names_the_minimum():
    assert memory.kv_budget_for("512MiB", 300 * MiB, 50 * MiB, 4 * MiB) == 162 * MiB
    assert memory.kv_budget_for("512MiB", 300 * MiB, 50 * MiB, 4 * MiB, kv_budget="100MiB") == 100 * MiB
    with pytest.raises(TqedgeError, match="needs at least 355 MiB"):
        memory.kv_budget_for("300MiB", 300 * MiB, 50 * MiB, 5 * MiB)
    with pytest.raises(TqedgeError, match=r"needs at least 450 MiB .*--kv-budget 100"):
        memory.kv_budget_for("400MiB", 300 * MiB, 50 * MiB, 4 * MiB, kv_budget="100MiB")


def test_rss_readings_are_plausible():
    now, peak = memory.current_rss(), memory.peak_rss()
    assert 10 * MiB < now <= peak < 64 * 1024 * MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/<pid>/status is Linux's")
def test_rss_breakdown_agrees_with_psutil():
    psutil = pytest.importorskip("psutil")
    mem, ps = memory.rss_breakdown(os.getpid()), psutil.Process().memory_info().rss
    assert set(mem) == {"rss", "anon", "file", "peak"}
    assert abs(mem["rss"] - ps) < 8 * MiB, (mem, ps)
    assert mem["anon"] + mem["file"] <= mem["rss"] <= mem["peak"]
    assert memory.rss_breakdown(2**31 - 1) == {}  # no such process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and wait4 as on Linux")
def test_the_two_peaks_and_wait_child():
    """A child forked from a process holding 160 MiB: its own image's peak (VmHWM) is the
    interpreter + 64 MiB it allocated and freed; ``ru_maxrss`` (``peak_rss``, and ``wait_child``'s
    figure, what ``--memory`` is checked against above) also holds what the parent had at fork."""
    held = bytes(1) * (160 * MiB)
    code = ("import sys; from tqedge.runtime import memory; b = b'x' * (64 << 20); del b; "
            "print(memory.rss_breakdown()['peak'], memory.current_rss(), memory.peak_rss()); sys.exit(3)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    status, kernel_peak, cpu_s = memory.wait_child(p.pid)
    own, now, ru_peak = map(int, out.split())
    assert status == 3 and cpu_s > 0
    assert own - now >= 60 * MiB  # the freed 64 MiB string is in the peak, not in the current RSS
    assert own < 150 * MiB < memory.current_rss(), (own / MiB, memory.current_rss() / MiB)
    assert kernel_peak >= ru_peak >= 160 * MiB  # the parent's resident set at fork
    del held


def _resident_kib(path_prefix: str) -> int:
    """Resident KiB of this process's mappings of files under ``path_prefix`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", head[0]):
                inside = len(head) == 6 and head[5].strip().startswith(path_prefix)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/maps mappings")
@pytest.mark.parametrize("access", ["read", "copy"])  # shared read-only; private writable (onnxruntime's)
def test_release_file_pages_drops_resident_pages_and_keeps_contents(tmp_path, access):
    """Also when another process maps the same pages (the pytest process that built a bundle and
    loaded it; a second server process): PAGEOUT would skip those, DONTNEED drops them here."""
    import mmap

    import numpy as np

    data = np.random.default_rng(0).integers(0, 256, 16 * MiB, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.tobytes())
    holder = subprocess.Popen([sys.executable, "-c", (
        "import mmap, sys; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
        "print(sum(m[i] for i in range(0, len(m), 4096)), flush=True); sys.stdin.read()"), str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # the other process has every page mapped
        mode = mmap.ACCESS_READ if access == "read" else mmap.ACCESS_COPY
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mode) as m:
            view = np.frombuffer(m, np.uint8)
            assert int(view[::4096].astype(np.int64).sum()) >= 0  # touch every page
            before = _resident_kib(str(tmp_path))
            released = memory.release_file_pages([tmp_path])
            after = _resident_kib(str(tmp_path))
            assert before >= 15 * 1024, before
            assert after <= 1024 and released >= 14 * MiB, (before, after, released)
            assert np.array_equal(view, data)  # read back from the file, unchanged
            del view
    finally:
        holder.communicate("", timeout=30)
    assert memory.release_file_pages([tmp_path / "nothing-here"]) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/maps mappings")
def test_a_loaded_model_holds_no_compiler_or_prepacked_weight_pages(smollm2_bundle, wikitext):
    """After load, the compiler's library (llvmlite: the kernels are loaded) and the weight file
    (onnxruntime prepacked it) are not resident, and a first prompt of ~500 tokens does not bring
    them back: the load's warm-up loaded the kernels a prompt calls (before, the first forward
    touched ~12 MiB of llvmlite again), and the weight file is read a page per embedding row
    (before, ~15 MiB: the kernel mapped 64 KiB around each). Measured on the second process:
    the first load after an install (kernels compiled in the warm-up child) still held ~24 MiB of
    llvmlite."""
    code = f"""
import json, os, re, sys
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
import llvmlite, tqedge
from test_memory import _resident_kib
bundle = {str(smollm2_bundle)!r}
llvm = os.path.dirname(llvmlite.__file__)
m = tqedge.load(bundle, threads=2, verify="none")
after_load = {{"llvm": _resident_kib(llvm), "weights": _resident_kib(os.path.realpath(bundle))}}
text = m.generate(sys.stdin.read(), max_tokens=4, temperature=0)
after_prompt = {{"llvm": _resident_kib(llvm), "weights": _resident_kib(os.path.realpath(bundle))}}
print(json.dumps({{"after_load": after_load, "after_prompt": after_prompt, "text": text}}))
"""
    for _ in range(2):  # the first may compile the kernels (a fresh install); the second is every later run
        out = subprocess.run([sys.executable, "-c", code], input=wikitext[:2200], capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["after_load"]["llvm"] < 8 * 1024, res  # ~68 MiB resident before round 18
    assert res["after_load"]["weights"] < 8 * 1024, res
    assert res["after_prompt"]["llvm"] < 8 * 1024, res
    assert res["after_prompt"]["weights"] < 4 * 1024, res
    assert res["text"]


def _written(tmp_path, mib: int):
    """A file of ``mib`` MiB of random bytes, written and flushed to disk (clean page-cache pages)."""
    import numpy as np

    data = np.random.default_rng(1).integers(0, 256, mib * MiB, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path, data


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/smaps mappings")
def test_release_code_pages_drops_read_only_mappings_and_keeps_written_ones(tmp_path):
    """A read-only mapping's pages go and read back unchanged; a private writable mapping, written
    to, keeps its pages and its write (a library's relocated data is such a mapping)."""
    import mmap

    import numpy as np

    path, data = _written(tmp_path, 16)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as ro, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as cow:
        view = np.frombuffer(ro, np.uint8)
        assert int(view[::4096].astype(np.int64).sum()) >= 0  # every page of the read-only mapping
        cow[:4096 * 8] = b"\x5a" * (4096 * 8)  # 8 private pages in the writable one
        before = _resident_kib(str(tmp_path))
        assert before >= 16 * 1024 + 8 * 4, before
        assert memory.release_code_pages() >= 15 * MiB
        assert _resident_kib(str(tmp_path)) <= 8 * 4 + 256, _resident_kib(str(tmp_path))  # the written pages stay
        assert cow[:4096 * 8] == b"\x5a" * (4096 * 8)
        assert np.array_equal(view, data)  # read back from the file, unchanged
        del view


_CODE_PROBE = """
import json, os, sys
import numpy as np
from tqedge.runtime import memory
lib = os.path.dirname(np.__file__)
sys.path.insert(0, sys.argv[2])
from test_memory import _resident_kib
before = _resident_kib(lib)
released = memory.release_code_pages() if sys.argv[1] == "release" else 0
after = _resident_kib(lib)
x = np.linspace(0.0, 1.0, 1001)
print(json.dumps({"before": before, "after": after, "released": released, "sum": float(x.sum()),
                  "dot": float(np.arange(64.0) @ np.arange(64.0))}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/smaps mappings")
def test_release_code_pages_drops_library_code_and_the_process_runs_on():
    """NumPy's libraries after import: their code pages go, and NumPy computes as before."""
    res = {}
    for mode in ("release", "keep"):
        out = subprocess.run([sys.executable, "-c", _CODE_PROBE, mode, os.path.dirname(__file__)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        res[mode] = json.loads(out.stdout)
    assert res["keep"]["after"] >= 3 * 1024 and res["keep"]["after"] >= res["keep"]["before"] - 64, res
    assert res["release"]["released"] > 0 and res["release"]["after"] < res["release"]["before"] / 2, res
    assert res["release"]["sum"] == res["keep"]["sum"] == pytest.approx(500.5)
    assert res["release"]["dot"] == res["keep"]["dot"] == float(sum(i * i for i in range(64)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / fadvise as on Linux")
def test_read_sparsely_maps_only_the_pages_touched(tmp_path):
    """A file in the page cache, mapped: a read faults in up to 16 cached pages around the one
    touched (64 KiB). After read_sparsely, one page per read, and the contents are unchanged."""
    import mmap

    import numpy as np

    path, data = _written(tmp_path, 16)
    assert np.array_equal(np.fromfile(path, np.uint8), data)  # every page in the page cache
    stride, reads = 256 * 1024, 64
    with open(path, "rb") as f:
        for sparse in (False, True):
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = np.frombuffer(m, np.uint8)
                if sparse:
                    assert memory.read_sparsely([tmp_path]) >= 1
                picked = view[::stride][:reads].copy()
                resident = _resident_kib(str(tmp_path))
                assert np.array_equal(picked, data[::stride][:reads])
                if sparse:
                    assert resident <= reads * 4 * 2, resident  # a page per read (some slack)
                else:
                    assert resident >= reads * 16, resident  # what it does without: the test can fail
                del view
    assert memory.read_sparsely([tmp_path / "nothing-here"]) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/maps mappings")
def test_releasing_drops_pages_while_the_block_reads(tmp_path):
    """A block that reads a 32 MiB mapping once (as onnxruntime reads weights to pack them) ends
    with few of its pages resident while ``releasing`` runs, and with all of them without it."""
    import mmap
    import time

    import numpy as np

    path, data = _written(tmp_path, 32)

    def read_through(view) -> int:
        total = 0
        for a in range(0, len(view), MiB):  # 1 MiB at a time, yielding the GIL as a C call would
            total += int(view[a:a + MiB:4096].astype(np.int64).sum())
            time.sleep(0.005)
        return total

    want = int(data[::4096].astype(np.int64).sum())
    with open(path, "rb") as f:
        for release in (False, True):
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = np.frombuffer(m, np.uint8)
                if release:
                    with memory.releasing([tmp_path], interval=0.01):
                        assert read_through(view) == want
                        resident = _resident_kib(str(tmp_path))
                    assert resident < 8 * 1024, resident
                else:
                    assert read_through(view) == want
                    assert _resident_kib(str(tmp_path)) >= 30 * 1024  # without it every page stays
                del view


_TRIM_PROBE = """
import ctypes, json, sys
from tqedge.runtime import memory
def anon():
    return memory.rss_breakdown()["anon"]
base = anon()
blocks = [ctypes.create_string_buffer(64 * 1024) for _ in range(400)]  # 25 MiB in heap-sized blocks
pin = ctypes.create_string_buffer(64 * 1024)  # above them: the heap's top cannot shrink past it
del blocks
freed = anon() - base
trimmed = memory.trim_heap() if sys.argv[1] == "trim" else None
print(json.dumps({"freed_but_resident": freed, "trimmed": trimmed, "kept": anon() - base}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="/proc/<pid>/status is Linux's")
def test_trim_heap_returns_freed_heap_pages():
    """25 MiB of heap blocks freed below a live one stay resident under glibc's default (what the
    tokenizer's parse left behind); trim_heap gives them back."""
    res = {}
    for mode in ("trim", "keep"):
        out = subprocess.run([sys.executable, "-c", _TRIM_PROBE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        res[mode] = json.loads(out.stdout)
    assert res["keep"]["kept"] >= 20 * MiB, res  # without the trim they stay: the test can fail
    assert res["trim"]["trimmed"] is True and res["trim"]["kept"] <= 4 * MiB, res


_HEAP_PROBE = """
import json, os, sys
import numpy as np
from tqedge.runtime import memory
fixed = memory.fix_mmap_threshold() if sys.argv[1] == "fix" else None
def rss():
    return memory.rss_breakdown()["anon"]
base = rss()
for _ in range(3):  # a temporary of 24 MiB, made and freed again, as the op's per-call buffers are
    a = np.ones(3 * 1024 * 1024)
    del a
print(json.dumps({"fixed": fixed, "kept": rss() - base}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="/proc/<pid>/status is Linux's")
def test_freed_temporaries_go_back_to_the_os():
    """glibc keeps a freed large block in its heap once its dynamic mmap threshold has risen
    (the default); with tqedge's fixed threshold the block goes back to the OS when freed."""
    def run(mode):
        env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, env=env,
                             timeout=120, check=True)
        return json.loads(out.stdout)

    default, fixed = run("default"), run("fix")
    assert fixed["fixed"] is True
    assert fixed["kept"] < 4 * MiB, fixed
    assert default["kept"] >= 20 * MiB, default  # what the fix is for (glibc's default)
