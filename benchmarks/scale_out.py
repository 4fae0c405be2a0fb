"""Scale-out figures: Redis bytes per conversation per token, and throughput of 1 vs 2 replicas.

``bytes`` phase (deterministic): a conversation of N tokens (WikiText, the model's own cache
configuration) is encoded as the blob the server writes to Redis (the session-file bytes:
codes as stored + the fp16 sinks/window rows + header + checksum), against the same
conversation's raw fp16 K/V (what llama.cpp's slot save writes: 2 · layers · kv_heads ·
head_dim · 2 bytes per token).

``throughput`` phase: ``tqedge serve --replicas R --threads 1 --store redis://…`` on Ray Serve
for R = 1 and 2 in one run, ``--clients`` concurrent clients each holding a 2-turn
conversation (greedy, ``--max-tokens``), aggregate completion tok/s over the wall time.
A ``redis-server`` is started on loopback for it.

    python benchmarks/scale_out.py --bundle smol-int8.tqe [--phases bytes,throughput]

JSON to ``benchmarks/out/scale_out.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LENGTHS = [64, 300, 1000, 3000]
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "Why is the sky blue?",
             "Give me a short tip for learning Python.", "What do bees make?", "How many legs does a spider have?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bytes_phase(bundle: str, kv_budget: str) -> list[dict]:
    import tqedge
    from tqedge.data import read_text
    from tqedge.runtime import session_file as SF

    model = tqedge.load(bundle, verify="size")
    a = model.arch
    ids = model.encode(read_text("wikitext2") * 4)
    rows = []
    for kv_bits in (None, "exact"):
        for n in LENGTHS:
            cache = model.new_cache(kv_budget=kv_budget, kv_bits=kv_bits)
            for i in range(0, n, 256):
                model.forward(ids[i:min(n, i + 256)], cache)
            blob = SF.encode_session(SF.fingerprint(model.manifest, cache), cache, {"server": {"ids": ids[:n]}})
            raw = n * 2 * a.num_layers * a.num_kv_heads * a.head_dim * 2
            rows.append({"cache": kv_bits or "default", "tokens": n, "blob_bytes": len(blob),
                         "blob_bytes_per_token": round(len(blob) / n), "fp16_raw_bytes": raw,
                         "ratio_vs_fp16": round(raw / len(blob), 2)})
            print(rows[-1], flush=True)
    return rows


def _conversation(base: str, model_id: str, q: str, max_tokens: int, out: list, lock: threading.Lock):
    import httpx

    msgs = [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": q}]
    with httpx.Client(timeout=600) as c:
        for turn in range(2):
            r = c.post(base + "/v1/chat/completions", json={"model": model_id, "messages": msgs,
                                                             "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            body = r.json()
            with lock:
                out.append(body["usage"]["completion_tokens"])
            msgs += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "Say more."}]


def throughput_phase(bundle: str, replicas: list[int], clients: int, max_tokens: int) -> list[dict]:
    import httpx

    port_r = free_port()
    redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(port_r), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    store = f"redis://127.0.0.1:{port_r}/0"
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    rows = []
    try:
        for n in replicas:
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "tqedge.cli", "serve", bundle, "--replicas", str(n),
                                     "--threads", "1", "--store", store, "--port", str(port),
                                     "--max-sessions", str(max(2, clients))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            base = f"http://127.0.0.1:{port}"
            try:
                while True:
                    try:
                        if httpx.get(base + "/health", timeout=5).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(1)
                model_id = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
                _conversation(base, model_id, "Hello!", 4, [], threading.Lock())  # warm both paths
                out, lock = [], threading.Lock()
                threads = [threading.Thread(target=_conversation,
                                            args=(base, model_id, QUESTIONS[i % len(QUESTIONS)], max_tokens, out, lock))
                           for i in range(clients)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                rows.append({"replicas": n, "clients": clients, "requests": len(out), "tokens": sum(out),
                             "wall_s": round(wall, 2), "tok_per_s": round(sum(out) / wall, 2)})
                print(rows[-1], flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
                subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)
    finally:
        redis.terminate()
    if len(rows) == 2:
        rows.append({"speedup_2_vs_1": round(rows[1]["tok_per_s"] / rows[0]["tok_per_s"], 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--phases", default="bytes,throughput")
    ap.add_argument("--kv-budget", default="64MiB")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "out" / "scale_out.json"))
    a = ap.parse_args()
    res = {"bundle": a.bundle, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    phases = a.phases.split(",")
    if "bytes" in phases:
        res["bytes"] = bytes_phase(a.bundle, a.kv_budget)
    if "throughput" in phases:
        res["throughput"] = throughput_phase(a.bundle, [int(x) for x in a.replicas.split(",")], a.clients,
                                             a.max_tokens)
    res["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
