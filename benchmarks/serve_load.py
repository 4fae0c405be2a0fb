"""Load test of ``tqedge serve`` over loopback: N concurrent streaming clients, a fixed number of requests.

Starts the server in a subprocess on a free 127.0.0.1 port, waits for ``/health``, then runs
``--clients`` threads with the official ``openai`` client. Each client holds multi-turn
conversations (``--turns`` user turns each, the reply fed back), so prefix reuse and — with
more conversations than ``--max-sessions`` — eviction to disk and restore are exercised. It
stops by itself after ``--requests`` requests or ``--deadline`` seconds, whichever is first.

Reported: requests/s, p50/p95 time to first token, tokens/s (all completion tokens / wall),
errors (429s counted apart, and retried after ``Retry-After``), cached prompt tokens, server
RSS at start (after load) and end, against the bound weights + KV budget + a fixed overhead.
JSON to ``benchmarks/out/serve_load.json``.

    python benchmarks/serve_load.py --bundle /tmp/smol.tqe [--clients 4] [--requests 16] \\
        [--max-tokens 24] [--kv-budget 64MiB] [--max-sessions 2] [--turns 2]

Batching curve (``--streams 1,2,4,8,16``, one server per bundle, repeatable ``--bundle``): for
each N, N clients send one greedy streaming request at once (``--max-tokens`` new tokens, a
distinct question each, the same questions for every N). Decode throughput is measured in the
steady state where all N streams are decoding: tokens received by all streams between the
moment the last stream got its first token and the moment the first stream finished, over that
window — prefill is excluded and reported apart (TTFT p50/p95). Inter-token latency p50/p95
over all streams. JSON to ``benchmarks/out/serve_batching.json`` and a PNG beside it.

    python benchmarks/serve_load.py --bundle int8.tqe --bundle int4.tqe --streams 1,2,4,8,16 --max-tokens 48

With ``--llama-server PATH --gguf FILE`` the same curve, by the same client code, runs against
llama.cpp's ``llama-server -m FILE --parallel 8 -c 8192`` after the bundles (:mod:`serve_peer`:
how to build it, what it runs with); the JSON gets its rows, CPU features and the tqedge /
llama-server ratios at each N, the PNG its curve and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "Why is the sky blue?",
             "Give me a short tip for learning Python.", "What do bees make?", "How many legs does a spider have?"]
DEFAULT_OUT = str(HERE / "out" / "serve_load.json")
FIXED_OVERHEAD_MIB = 400  # interpreter + onnxruntime + tokenizer + server; measured runtime overhead ≈ 360 MiB


def rss_mib(pid: int) -> dict:
    """RSS of process ``pid``, MiB: total, anonymous, file-backed, peak (:func:`tqedge.runtime.memory.rss_breakdown`)."""
    from tqedge.runtime.memory import rss_breakdown

    return {k: round(v / 2**20, 1) for k, v in rss_breakdown(pid).items()}


@contextlib.contextmanager
def serving(a, bundle: str):
    """``tqedge serve`` of ``bundle`` on a free loopback port, healthy: yields (process, base URL,
    start-up seconds); stopped with SIGINT on exit."""
    import serve_peer

    port = serve_peer.free_port()
    cmd = [sys.executable, "-m", "tqedge.cli", "serve", bundle, "--port", str(port), "--kv-budget", a.kv_budget,
           "--max-sessions", str(a.max_sessions), "--max-queue", str(a.max_queue)]
    cmd += ["--threads", str(a.threads)] if a.threads else []
    cmd += ["--kv-bits", a.kv_bits] if a.kv_bits else []
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    with serve_peer.stopped_on_exit(proc):
        wait_healthy(proc, base, 300)
        yield proc, base, time.perf_counter() - t


def wait_healthy(proc, base: str, timeout: float, log: Path | None = None) -> None:
    """Poll ``base``/health until 200; the server's stderr (or its ``log`` file) tail if it exits."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace") if log else proc.stderr.read()
            raise SystemExit(f"server exited: {tail[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit("server did not become healthy in time")


class Load:
    """Shared counters of the client threads."""

    def __init__(self, total: int, deadline: float):
        self.lock = threading.Lock()
        self.left, self.deadline = total, deadline
        self.results: list[dict] = []
        self.rejected = 0

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0 or time.monotonic() > self.deadline:
                return False
            self.left -= 1
            return True


def stream_chat(c, messages, max_tokens: int, **sampling) -> dict:
    """Stream one completion: the arrival time of every content chunk, text, finish reason, usage."""
    t0 = time.perf_counter()
    times, text, use, finish = [], [], None, None
    stream = c.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens, stream=True,
                                       stream_options={"include_usage": True}, **sampling)
    for ch in stream:
        if ch.choices:
            if piece := ch.choices[0].delta.content:
                times.append(time.perf_counter())
                text.append(piece)
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            use = ch.usage
    return {"t0": t0, "times": times, "total_s": time.perf_counter() - t0, "text": "".join(text), "finish": finish,
            "completion_tokens": use.completion_tokens if use else len(times),
            "prompt_tokens": use.prompt_tokens if use else 0,
            "cached_tokens": use.prompt_tokens_details.cached_tokens if use and use.prompt_tokens_details else 0}


def client_loop(idx: int, base: str, load: Load, a) -> None:
    import openai

    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=a.deadline)
    conv, turn = 0, 0
    messages = []
    while load.take():
        if turn == 0:
            messages = [{"role": "system", "content": f"You are assistant number {idx}-{conv}. Be brief."}]
        messages.append({"role": "user", "content": QUESTIONS[(idx + conv + turn) % len(QUESTIONS)]})
        while True:
            try:
                r = stream_chat(c, messages, a.max_tokens, temperature=0.7, seed=1)
                times, t0 = r.pop("times"), r.pop("t0")
                r.update(ok=True, ttft_s=times[0] - t0 if times else None)
                break
            except openai.RateLimitError as e:  # 429: wait as told, retry (not an error)
                with load.lock:
                    load.rejected += 1
                time.sleep(min(5.0, float(e.response.headers.get("retry-after", "1"))))
                if time.monotonic() > load.deadline:
                    r = {"ok": False, "error": "deadline while rate limited"}
                    break
            except openai.OpenAIError as e:
                r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
                break
        r.update(client=idx, conversation=conv, turn=turn)
        with load.lock:
            load.results.append(r)
        if r["ok"]:
            messages.append({"role": "assistant", "content": r["text"]})
            turn += 1
        if not r["ok"] or turn >= a.turns:
            conv, turn = conv + 1, 0
    c.close()


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 3)


LONG_QUESTIONS = ["Tell me a long story about a dragon who learns to cook.", "Explain in detail how a bicycle works.",
                  "Describe a day in the life of a lighthouse keeper.", "Write a long letter to a friend about autumn.",
                  "Explain step by step how bread is made.", "Describe the water cycle in detail.",
                  "Tell me a long story about a robot exploring the ocean.", "Explain how airplanes fly, in detail.",
                  "Describe your perfect city and its streets.", "Write a long poem about mountains and rivers.",
                  "Explain how computers store numbers.", "Tell me about the history of tea, in detail.",
                  "Describe a market in a busy town at dawn.", "Explain how plants grow from seeds, step by step.",
                  "Write a story about a cat who becomes a detective.", "Describe how the moon affects the tides."]


class CpuClock:
    """Samples a process's CPU seconds (user + system, all threads) every ``period`` s, so the
    CPU it spent in any wall-clock window can be read afterwards: on a shared machine, tokens
    per server CPU-second compare configurations whatever share of the cores the server got."""

    def __init__(self, pid: int, period: float = 0.05):
        self.path, self.tick = Path(f"/proc/{pid}/stat"), os.sysconf("SC_CLK_TCK")
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.period = period

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                f = self.path.read_text().rsplit(")", 1)[1].split()
                self.samples.append((time.perf_counter(), (int(f[11]) + int(f[12])) / self.tick))
            except (OSError, IndexError, ValueError):
                return
            time.sleep(0.05)

    def at(self, t: float) -> float:
        ts = [x for x, _ in self.samples]
        return float(np.interp(t, ts, [c for _, c in self.samples]))


def one_round(base: str, n: int, tag: str, max_tokens: int, clock: CpuClock | None = None) -> dict:
    """N concurrent streams; steady-state decode tok/s, TTFT and inter-token latency."""
    import openai

    res: list = [None] * n

    def run(i):
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=900)
        msgs = [{"role": "user", "content": f"[{tag}] {LONG_QUESTIONS[i % len(LONG_QUESTIONS)]}"}]
        try:
            res[i] = stream_chat(c, msgs, max_tokens, temperature=0)
        except Exception as e:  # noqa: BLE001  (reported, not raised: one failed stream must not hide the rest)
            res[i] = {"error": f"{type(e).__name__}: {e}"[:300]}
        c.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in res if r and "error" not in r and r["times"]]
    start = max(r["times"][0] for r in ok)  # every stream is decoding from here …
    end = min(r["times"][-1] for r in ok)  # … until the first one finishes
    in_window = sum(sum(1 for t in r["times"] if start < t <= end) for r in ok)
    gaps = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    ttft = [r["times"][0] - r["t0"] for r in ok]
    decode_all = sum(len(r["times"]) - 1 for r in ok) / max(1e-9, max(r["times"][-1] for r in ok) - start) \
        if n > 0 else None
    cpu = clock.at(end) - clock.at(start) if clock and end > start else None
    return {"streams": n, "ok": len(ok), "decode_server_cpu_s": round(cpu, 3) if cpu else None,
            "decode_tok_per_cpu_s": round(in_window / cpu, 2) if cpu else None, "errors": [r["error"] for r in res if r and "error" in r][:3],
            "completion_tokens": [r["completion_tokens"] for r in ok], "prompt_tokens": [r["prompt_tokens"] for r in ok],
            "decode_window_s": round(end - start, 3), "decode_tokens_in_window": in_window,
            "decode_tok_s": round(in_window / (end - start), 2) if end > start else None,
            "decode_tok_s_after_last_first_token": round(decode_all, 2),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "itl_p50_ms": round(1e3 * pct(gaps, 0.5), 1) if gaps else None,
            "itl_p95_ms": round(1e3 * pct(gaps, 0.95), 1) if gaps else None}


def curve(base: str, pid: int, a, label: str) -> list[dict]:
    """The batching curve against one healthy server at ``base`` (process ``pid``): best of
    ``--repeats`` per N; the same prompts for every server (tagged by N and repeat only)."""
    clock = CpuClock(pid)
    one_round(base, 1, "warm-up", 4)
    rows = []
    for n in (int(x) for x in a.streams.split(",")):  # best of --repeats by decode tok/s: the least disturbed run
        tries = [one_round(base, n, f"n{n} r{r}", a.max_tokens, clock) for r in range(a.repeats)]
        row = max(tries, key=lambda r: r["decode_tok_s"] or 0)
        row["decode_tok_s_all_repeats"] = [r["decode_tok_s"] for r in tries]
        row["decode_tok_per_cpu_s_all_repeats"] = [r["decode_tok_per_cpu_s"] for r in tries]
        row["loadavg"] = os.getloadavg()
        rows.append(row)
        print(json.dumps({"server": label, **{k: v for k, v in row.items()
                                              if k not in ("completion_tokens", "prompt_tokens")}}), flush=True)
    clock.stop.set()
    for key in ("decode_tok_s", "decode_tok_per_cpu_s"):
        one = next((r[key] for r in rows if r["streams"] == 1 and r[key]), None)
        for r in rows:
            r[f"x_one_stream_{key}"] = round(r[key] / one, 2) if one and r[key] else None
    return rows


def batching_curve(a) -> None:
    """The ``--streams`` mode (see the module docstring); with ``--llama-server`` the peer too."""
    import httpx

    import serve_peer

    report = {"config": {k: v for k, v in vars(a).items() if k != "out"}, "uptime_before": os.getloadavg(),
              "bundles": {}}
    if a.llama_server:  # first: a wrong binary or GGUF fails before the long tqedge runs
        peer = {"side": serve_peer.SIDE, "binary": a.llama_server, "gguf": a.gguf,
                **serve_peer.probe_system_info(a.llama_server, a.gguf)}
        print(json.dumps({k: peer[k] for k in ("cpu_features", "default_threads")}), flush=True)
    for bundle in a.bundle:
        with serving(a, bundle) as (proc, base, _):
            rows = curve(base, proc.pid, a, Path(bundle).name)
            st = httpx.get(base + "/v1/stats", timeout=10).json()
            rss = rss_mib(proc.pid)
        s = st["sessions"]
        report["bundles"][Path(bundle).name] = {
            "side": "tqedge", "rows": rows, "kv_bytes_allocated": s["kv_bytes_allocated"],
            "kv_bytes_total": s["kv_bytes_total"], "kv_within_budget": s["kv_bytes_allocated"] <= s["kv_bytes_total"],
            "rss_end_mib": rss, "server_requests": st["requests"]}
    if a.llama_server:
        args = (a.llama_server, a.gguf, a.llama_parallel, a.llama_ctx, wait_healthy, a.llama_threads)
        with serve_peer.llama_serving(*args) as (proc, base, cmd, log):
            peer.update(command=cmd, log=str(log), rows=curve(base, proc.pid, a, serve_peer.SIDE),
                        rss_end_mib=rss_mib(proc.pid))
        report["llama_server"] = peer
        report["vs_llama_server"] = serve_peer.ratios(report["bundles"], peer)
        for r in report["vs_llama_server"]:
            print(json.dumps(r), flush=True)
    report["uptime_after"] = os.getloadavg()
    out = Path(a.out if a.out != DEFAULT_OUT else HERE / "out" / "serve_batching.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    serve_peer.plot_curve(report, out.with_suffix(".png"))
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, action="append", help="repeat for several bundles (--streams mode)")
    p.add_argument("--streams", default=None, help="batching curve, e.g. 1,2,4,8,16 (see the module docstring)")
    p.add_argument("--repeats", type=int, default=1, help="--streams: runs per N, the best kept (shared machines)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--kv-budget", default="64MiB")
    p.add_argument("--max-sessions", type=int, default=2)
    p.add_argument("--max-queue", type=int, default=2)
    p.add_argument("--kv-bits", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole load phase")
    p.add_argument("--llama-server", default=None, help="--streams: also run this llama-server binary (serve_peer.py)")
    p.add_argument("--gguf", default=None, help="the GGUF llama-server serves (--llama-server)")
    p.add_argument("--llama-parallel", type=int, default=8, help="llama-server --parallel (slots)")
    p.add_argument("--llama-ctx", type=int, default=8192, help="llama-server -c (shared by its slots)")
    p.add_argument("--llama-threads", type=int, default=None, help="llama-server -t (default: its own)")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    if a.llama_server and not (a.streams and a.gguf and Path(a.llama_server).is_file() and Path(a.gguf).is_file()):
        p.error("--llama-server needs --streams and --gguf, both files existing")
    if a.streams:
        batching_curve(a)
        return
    a.bundle = a.bundle[0]

    import httpx

    from tqedge.units import parse_bytes

    with serving(a, a.bundle) as (proc, base, startup_s):
        rss_start = rss_mib(proc.pid)
        load = Load(a.requests, time.monotonic() + a.deadline)
        threads = [threading.Thread(target=client_loop, args=(i, base, load, a)) for i in range(a.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(a.deadline + 120)
        wall = time.perf_counter() - t0
        rss_end = rss_mib(proc.pid)
        stats = httpx.get(base + "/v1/stats", timeout=10).json()

    ok = [r for r in load.results if r["ok"]]
    errors = [r["error"] for r in load.results if not r["ok"]]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["completion_tokens"] for r in ok)
    weights_mib = sum(f.stat().st_size for f in Path(a.bundle).rglob("*") if f.is_file()) / 2 ** 20
    budget_mib = parse_bytes(a.kv_budget) / 2 ** 20
    bound = weights_mib + budget_mib + FIXED_OVERHEAD_MIB
    report = {
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "startup_s": round(startup_s, 2), "wall_s": round(wall, 2),
        "requests_ok": len(ok), "errors_non_429": len(errors), "error_samples": errors[:5],
        "rejected_429": load.rejected,
        "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "cached_prompt_tokens": sum(r["cached_tokens"] for r in ok),
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "rss_start_mib": rss_start, "rss_end_mib": rss_end,
        "rss_growth_mib": round(rss_end["rss"] - rss_start["rss"], 1),
        "bundle_mib": round(weights_mib, 1), "kv_budget_mib": budget_mib,
        "rss_bound_mib": round(bound, 1), "rss_end_within_bound": rss_end["rss"] <= bound,
        "server_stats": stats,
        "requests": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "text"}
                     for r in load.results],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("server_stats", "config", "requests")}, indent=2))


if __name__ == "__main__":
    main()
