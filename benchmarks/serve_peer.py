"""llama.cpp's ``llama-server`` as the peer of :mod:`serve_load`'s batching curve (``--llama-server``).

Benchmark-only: nothing of llama.cpp is a tqedge dependency or committed. The binary is built
from the llama.cpp sources inside the llama-cpp-python sdist (the version the other llama.cpp
peers use), outside the repository, at its default CPU options (``GGML_NATIVE``), offline::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /work/lsrv-src
    tar xzf /work/lsrv-src/llama_cpp_python-0.3.36.tar.gz -C /work/lsrv-src
    cmake -S /work/lsrv-src/llama_cpp_python-0.3.36/vendor/llama.cpp -B /work/lsrv-build \\
        -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF      # no web-UI download
    cmake --build /work/lsrv-build --target llama-server -j2   # -> /work/lsrv-build/bin/llama-server

The measured server runs at llama-server's own defaults except what a batching server needs:
``-m GGUF --parallel 8 -c 8192 --host 127.0.0.1 --port P`` (8 slots of 1,024 tokens each;
default threads, default chat template handling: the GGUF's template through its Jinja engine).
Its CPU features come from a separate short probe start at trace verbosity (``-lv 4``: llama-server
prints ``system_info`` only there), so the measured server logs at its default verbosity.
Both sides are driven by the same client code (:func:`serve_load.one_round`, the ``openai`` client,
greedy ``temperature=0``, streaming).
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SIDE = "llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_system_info(binary: str, gguf: str, timeout: float = 60) -> dict:
    """Start ``binary`` at trace verbosity until it prints its ``system_info`` line, then stop it.

    Returns the line, the CPU features it reports as on (``AVX2 = 1`` …), its default thread
    count and ``--version``'s text."""
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(free_port()), "-lv", "4"],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        line, deadline = None, time.monotonic() + timeout
        try:
            while line is None and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
                log.seek(0)
                line = next((x.strip() for x in log if "system_info:" in x), None)
        finally:
            proc.kill()
            proc.wait()
    if line is None:
        raise SystemExit(f"{binary} printed no system_info line at -lv 4 within {timeout} s")
    line = line[line.index("system_info:"):]
    threads = re.search(r"n_threads = (\d+)", line)
    return {"system_info": line, "cpu_features": re.findall(r"(\w+) = 1\b", line.split("|", 1)[-1]),
            "default_threads": int(threads.group(1)) if threads else None,
            "version": (version.stdout + version.stderr).strip()}


@contextlib.contextmanager
def llama_serving(binary: str, gguf: str, parallel: int, ctx: int, wait_healthy, threads: int | None = None):
    """``llama-server -m gguf --parallel N -c ctx`` on a free loopback port, healthy (``/health``
    answers 200 once the model is loaded): yields (process, base URL, command, log path); stopped
    with SIGINT on exit. Its log goes to a temporary file (a pipe nobody reads would fill)."""
    port = free_port()
    cmd = [binary, "-m", gguf, "--parallel", str(parallel), "-c", str(ctx), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", str(threads)] if threads else []  # a diagnostic: the measured default is llama-server's own
    log_path = Path(tempfile.gettempdir()) / f"llama-server-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    with stopped_on_exit(proc):
        wait_healthy(proc, base, 300, log_path)
        yield proc, base, cmd, log_path


@contextlib.contextmanager
def stopped_on_exit(proc: subprocess.Popen):
    """Run the body, then stop the server ``proc`` with SIGINT (killed if not gone in 30 s)."""
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def ratios(bundles: dict, peer: dict) -> list[dict]:
    """tqedge / llama-server at each stream count both measured, per bundle: aggregate decode
    tok/s (wall) and per server CPU-second, with both sides' p95 TTFT beside them."""
    theirs = {r["streams"]: r for r in peer["rows"]}
    out = []
    for name, b in bundles.items():
        for r in b["rows"]:
            p = theirs.get(r["streams"])
            if p is None:
                continue
            out.append({"bundle": name, "streams": r["streams"],
                        "tqedge_decode_tok_s": r["decode_tok_s"], "llama_server_decode_tok_s": p["decode_tok_s"],
                        "x_decode_tok_s": _ratio(r["decode_tok_s"], p["decode_tok_s"]),
                        "x_decode_tok_per_cpu_s": _ratio(r["decode_tok_per_cpu_s"], p["decode_tok_per_cpu_s"]),
                        "tqedge_ttft_p95_s": r["ttft_p95_s"], "llama_server_ttft_p95_s": p["ttft_p95_s"]})
    return out


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def plot_curve(report: dict, path: Path) -> None:
    """PNG of :func:`serve_load.batching_curve`'s report: every bundle's curve, llama-server's
    beside them and the tqedge / llama-server ratio when it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peer = report.get("llama_server")
    sides = {**report["bundles"], **({f"{SIDE} ({Path(peer['gguf']).name})": peer} if peer else {})}
    fig, ax = plt.subplots(1, 5 if peer else 4, figsize=(22 if peer else 18, 4))
    for i, (name, b) in enumerate(sides.items()):  # one colour per side in every panel
        rows, c = [r for r in b["rows"] if r["decode_tok_s"]], f"C{i}"
        n = [r["streams"] for r in rows]
        ax[0].plot(n, [r["decode_tok_s"] for r in rows], "o-", c=c, label=name)
        ax[3].plot(n, [r["decode_tok_per_cpu_s"] for r in rows], "o-", c=c, label=name)
        ax[1].plot(n, [r["ttft_p50_s"] for r in rows], "o-", c=c, label=f"{name} p50")
        ax[1].plot(n, [r["ttft_p95_s"] for r in rows], "x--", c=c, label=f"{name} p95")
        ax[2].plot(n, [r["itl_p50_ms"] for r in rows], "o-", c=c, label=f"{name} p50")
        ax[2].plot(n, [r["itl_p95_ms"] for r in rows], "x--", c=c, label=f"{name} p95")
    titles = ["aggregate decode tok/s (steady state)", "time to first token (s)", "inter-token latency (ms)",
              "decode tokens per server CPU-second"]
    if peer:
        for name in report["bundles"]:
            rs = [r for r in report["vs_llama_server"] if r["bundle"] == name]
            ax[4].plot([r["streams"] for r in rs], [r["x_decode_tok_s"] for r in rs], "o-", label=f"{name} wall")
            ax[4].plot([r["streams"] for r in rs], [r["x_decode_tok_per_cpu_s"] for r in rs], "x--",
                       label=f"{name} per CPU-s")
        ax[4].axhline(1.0, color="grey", lw=0.8)
        titles.append("tqedge / llama-server aggregate decode tok/s")
    for a_, title in zip(ax, titles):
        a_.set_xscale("log", base=2)
        a_.set_xlabel("concurrent streams")
        a_.set_title(title)
        a_.legend(fontsize=7)
    vs = " vs llama-server" if peer else ""
    fig.suptitle(f"tqedge serve{vs}, continuous batching (load avg before {report['uptime_before'][0]:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
