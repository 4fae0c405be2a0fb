"""Where a prefill's or a decode phase's CPU time goes, by native op: ``perf`` samples of this
process, each mapped to the machine code it fell in.

The native ops' Numba code has no symbols, but each compiled ``cfunc`` (an op's compute, a work
item's entry) sits in its own executable mapping with the functions it inlined, so a sample in
the mapping of ``native_linear._linear_item_entry`` is time in the Q4_1 linears' items, and so on
(``REGIONS``). Neighbouring mappings can merge (their labels are then joined), and a mapping
with no listed entry is reported with its size and address. Samples elsewhere are named by their
library (onnxruntime's own kernels: the LM head, the gather, norms and adds; Python; the kernel:
page faults, futex sleeps and wakes, context switches).
Needs ``perf`` (Debian's linux-perf) with permission to record this process.

    python benchmarks/op_share.py --bundle smol-int4.tqe --phase prefill --ctx 512 [--reps 20]
    python benchmarks/op_share.py --bundle smol-int4.tqe --phase decode --ctx 512 [--steps 1000]

Prints shares in percent and writes JSON (``--out``, default ``benchmarks/out/op_share_<phase>.json``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "wikitext2-valid.txt"
REGIONS = {  # label: (module, cfunc) whose mapping holds that part's code
    "linear items (LinearQ4_1)": ("native_linear", "_linear_item_entry"),
    "linear op body (input quantization)": ("native_linear", "linear_compute"),
    "attention op body (encode, ring decode, fp16 part)": ("native_op", "attention_compute"),
    "attention prefill items": ("native_prefill", "_prefill_item_entry"),
    "attention decode items": ("native_turboquant", "_decode_item_entry"),
    "rotary q/k/v": ("native_rope", "rope_compute"),
    "block offsets": ("native_offsets", "offsets_compute"),
}


def code_regions() -> list[tuple[int, int, str]]:
    """(start, end, label) of this process's anonymous executable mappings, labelled by the
    :data:`REGIONS` cfunc they hold (``numba code`` for the others)."""
    import importlib

    addrs = {label: getattr(importlib.import_module(f"tqedge.runtime.{mod}"), fn).address
             for label, (mod, fn) in REGIONS.items()}
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        f = line.split()
        if "x" in f[1] and len(f) < 6:  # executable, no file behind it: JIT code
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            names = [k for k, a in addrs.items() if lo <= a < hi]  # adjacent mappings can merge: all of them
            out.append((lo, hi, " + ".join(names) or f"numba code, no entry above ({(hi - lo) // 1024} KiB at {lo:#x})"))
    return out


def attribute(perf_data: Path, regions) -> dict[str, float]:
    """Shares (percent) of the samples in ``perf_data`` by region or library."""
    script = subprocess.run(["perf", "script", "-i", str(perf_data), "-F", "ip,dso"], capture_output=True,
                            text=True, check=True).stdout
    counts: collections.Counter = collections.Counter()
    for line in script.splitlines():
        f = line.split(None, 1)
        try:
            ip = int(f[0], 16)
        except (ValueError, IndexError):
            continue
        label = next((n for lo, hi, n in regions if lo <= ip < hi), None)
        if label is None:
            dso = f[1].strip().strip("()") if len(f) > 1 else "?"
            label = Path(dso).name or dso
            label = "onnxruntime" if label.startswith("libonnxruntime") else label
        counts[label] += 1
    total = sum(counts.values()) or 1
    return {k: round(100 * v / total, 1) for k, v in counts.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--phase", choices=("prefill", "decode"), required=True)
    ap.add_argument("--ctx", type=int, default=512, help="prompt tokens (prefill), or the context decode starts at")
    ap.add_argument("--reps", type=int, default=20, help="prefills recorded (--phase prefill)")
    ap.add_argument("--steps", type=int, default=1000, help="decode steps recorded (--phase decode)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=str(DATA))
    ap.add_argument("--freq", type=int, default=2999, help="samples per second per thread")
    ap.add_argument("--out")
    a = ap.parse_args()

    import tqedge
    from tqedge.runtime.footprint import PREFILL_CHUNK

    model = tqedge.load(a.bundle, threads=a.threads, verify="none")
    ids = model.tokenizer.encode(Path(a.text).read_text(encoding="utf-8")[: (a.ctx + a.steps) * 8],
                                 add_special_tokens=False).ids
    cache = model.new_cache(kv_budget=model.kv_bytes(a.ctx + a.steps + 64))  # the bundle's default KV bits

    def prefill():
        cache.reset()
        for s in range(0, a.ctx, PREFILL_CHUNK):
            model.forward(ids[s:min(a.ctx, s + PREFILL_CHUNK)], cache)

    prefill()  # untimed: kernels loaded, pages touched
    if a.phase == "decode":
        model.forward([ids[a.ctx]], cache)
    regions = code_regions()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        perf = subprocess.Popen(["perf", "record", "-q", "-F", str(a.freq), "-p", str(os.getpid()), "-o", str(data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # perf attaches
        t = time.perf_counter()
        if a.phase == "prefill":
            for _ in range(a.reps):
                prefill()
        else:
            for i in range(a.steps):
                model.forward([ids[a.ctx + 1 + i]], cache)
        wall = time.perf_counter() - t
        perf.send_signal(signal.SIGINT)
        if perf.wait(timeout=60) not in (0, -signal.SIGINT):
            raise SystemExit(f"perf record failed: {perf.stderr.read().decode()[-500:]}")
        shares = attribute(data, regions)
    per = a.reps * a.ctx / wall if a.phase == "prefill" else 1000 * wall / a.steps
    result = {"phase": a.phase, "ctx": a.ctx, "threads": a.threads, "bundle": str(a.bundle), "backend": model.backend_name,
              ("prefill_tok_s" if a.phase == "prefill" else "decode_ms_per_step"): round(per, 2),
              "shares_percent": shares, "cpu": platform.processor() or platform.machine(), "loadavg": os.getloadavg()}
    out = Path(a.out or HERE / "out" / f"op_share_{a.phase}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for k, v in shares.items():
        print(f"{v:5.1f} %  {k}")
    print(json.dumps({k: v for k, v in result.items() if k != "shares_percent"}))


if __name__ == "__main__":
    sys.exit(main())
