"""``tqedge eval`` CLI (--json schema, errors) and the quality study's smoke run."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from _bundles import smollm2_bundle  # noqa: F401  (fixture)
from tqedge.cli import cli
from tqedge.data import text_path

ROOT = Path(__file__).resolve().parents[1]
PPL_FIELDS = {"ppl", "ppl_exact", "delta_pct", "kl", "top1_agree", "tokens", "kv_bits", "bytes_per_token",
              "ppl_last_quarter"}


def _bench(name: str):
    """Import benchmarks/<name>.py (a script directory, not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_eval_ppl_json(smollm2_bundle, wikitext, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(wikitext[:3000])
    res = CliRunner().invoke(cli, ["eval", "ppl", str(smollm2_bundle), "--text", str(text), "--ctx", "48",
                                   "--windows", "2", "--kv-bits", "4,3", "--window", "8", "--sinks", "0", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert PPL_FIELDS <= set(r)
    assert r["tokens"] == 2 * 47 and r["kv_bits"] == "4,3" and r["bytes_per_token"] == 5400
    assert r["delta_pct"] == 100 * (r["ppl"] / r["ppl_exact"] - 1)


def test_eval_defaults_to_the_shipped_text(smollm2_bundle):
    """No --text / --haystack: both commands read tqedge.data's WikiText-2 excerpt."""
    shipped = text_path()
    res = CliRunner().invoke(cli, ["eval", "ppl", str(smollm2_bundle), "--ctx", "64", "--windows", "2", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["text"] == str(shipped) and r["tokens"] == 2 * 63 and 1 < r["ppl_exact"] < 1000
    res = CliRunner().invoke(cli, ["eval", "needle", str(smollm2_bundle), "--ctx", "300", "--depths", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout.strip().splitlines()[-1])
    (case,) = r["cases"]
    assert set(r["grid"]) == {"300"} and set(r["grid"]["300"]) == {"0.5"} and r["accuracy"] in (0.0, 1.0)
    assert 250 <= case["prompt_tokens"] <= 300 and case["found"] == r["grid"]["300"]["0.5"]
    assert isinstance(case["found"], bool) and case["value"].isdigit()


def test_eval_errors(smollm2_bundle, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    res = CliRunner().invoke(cli, ["eval", "ppl", str(smollm2_bundle), "--text", str(text), "--ctx", "64"])
    assert res.exit_code == 2 and "fewer than one window" in res.output
    res = CliRunner().invoke(cli, ["eval", "needle", str(smollm2_bundle), "--ctx", "1K,x"])
    assert res.exit_code == 2 and "context lengths" in res.output
    res = CliRunner().invoke(cli, ["eval", "needle", str(smollm2_bundle), "--depths", "0,2"])
    assert res.exit_code == 2 and "[0, 1]" in res.output


def test_quality_smoke(smollm2_bundle, tmp_path):
    """The study's CI smoke run: exact ≤ K4V4 ≤ K2V2 (NLL within noise, KL strictly), JSON fields."""
    quality = _bench("quality")
    out = tmp_path / "q.json"
    assert quality.main(["--smoke", "--bundle", str(smollm2_bundle), "--text", str(text_path()), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    k4, k2 = (next(r for r in doc["results"] if r["config"] == n) for n in ("K4V4", "K2V2"))
    for r in (k4, k2):
        assert PPL_FIELDS | {"bits_per_value", "tokens_in_32mib", "delta_last_quarter_pct"} <= set(r)
    assert 0 < k4["kl"] < k2["kl"]
    assert k4["delta_pct"] > -0.5 and k2["delta_pct"] > k4["delta_pct"] - 0.5
    assert k4["bytes_per_token"] > k2["bytes_per_token"]


def test_vs_llamacpp_dry_run(tmp_path, capsys):
    """The llama.cpp comparison is runnable without llama-cpp-python: --dry-run checks inputs."""
    vs_llamacpp = _bench("vs_llamacpp")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert vs_llamacpp.main(["--gguf", str(gguf), "--bundle", str(tmp_path), "--text", str(text_path()), "--dry-run",
                             "--llama-python", str(tmp_path / "missing" / "python")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [j["kv"] for j in plan["jobs"] if j["side"] == "llama" and j["phase"] == "ppl"] == ["f16", "q8_0", "q4_0"]
    assert {j["phase"] for j in plan["jobs"]} == {"ppl", "speed"}
    assert any(j["side"] == "tqedge" and j["kv"] == "exact" for j in plan["jobs"])
    assert len(plan["problems"]) == 1 and "--llama-python" in plan["problems"][0]
    assert "llama_cpp" not in sys.modules  # nothing imported from llama.cpp at import time
    # second-half NLL as llama-perplexity counts it: targets from the middle of the window on
    lp = -np.arange(12, dtype=float).reshape(4, 3)  # 4 positions, 3-token vocabulary
    total, half, n = vs_llamacpp.nll_stats(lp, [0, 1, 2, 0])
    assert total == 0 + 4 + 8 + 9 and half == 8 + 9 and n == 2
    # speed ratios are against llama.cpp's fastest KV type at each context, per phase row merged
    rows = vs_llamacpp.merge_rows([
        {"side": "llama.cpp", "kv": "f16", "phase": "speed", "decode_tok_s": {"512": 40.0, "2048": 10.0},
         "prefill_tok_s": {"512": 100.0, "2048": 80.0}, "peak_rss_mib": 300},
        {"side": "llama.cpp", "kv": "q8_0", "phase": "speed", "decode_tok_s": {"512": 20.0, "2048": 20.0},
         "prefill_tok_s": {"512": 50.0, "2048": 40.0}, "peak_rss_mib": 290},
        {"side": "tqedge", "kv": "exact", "phase": "ppl", "ppl": 13.0, "peak_rss_mib": 700},
        {"side": "tqedge", "kv": "exact", "phase": "speed", "decode_tok_s": {"512": 20.0, "2048": 30.0},
         "prefill_tok_s": {"512": 100.0, "2048": 40.0}, "peak_rss_mib": 500}])
    (q,) = vs_llamacpp.ratios(rows)
    assert q["decode"] == {"512": 0.5, "2048": 1.5} and q["prefill"] == {"512": 1.0, "2048": 0.5}
    tq = rows[-1]
    assert tq["ppl"] == 13.0 and tq["peak_rss_mib_speed"] == 500 and tq["peak_rss_mib_ppl"] == 700


def test_worker_failure_names_the_signal():
    """A peer worker killed by a signal (llama.cpp's AMX code on a VM that does not grant AMX dies
    of SIGILL with nothing on stderr) is reported by the signal's name, an exit by its code."""
    vs_llamacpp = _bench("vs_llamacpp")
    killed = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"],
                            capture_output=True, text=True, check=False)
    assert vs_llamacpp.worker_failed("llama f16 at 512", killed).startswith(
        "llama f16 at 512 failed (killed by SIGILL):")
    exited = subprocess.run([sys.executable, "-c", "import sys; sys.exit('no model')"],
                            capture_output=True, text=True, check=False)
    assert vs_llamacpp.worker_failed("og", exited) == "og failed (exit 1):\nno model\n"


def test_vs_llamacpp_onnxruntime_genai_peer(tmp_path, capsys):
    """--og-python adds one onnxruntime-genai job (speed phase only) and ratios against it."""
    vs_llamacpp = _bench("vs_llamacpp")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert vs_llamacpp.main(["--gguf", str(gguf), "--bundle", str(tmp_path), "--text", str(text_path()), "--dry-run",
                             "--llama-python", sys.executable, "--og-python", sys.executable,
                             "--og-model", str(tmp_path / "no-model")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [(j["side"], j["phase"]) for j in plan["jobs"] if j["side"] == "og"] == [("og", "speed")]
    assert len(plan["problems"]) == 1 and "--og-model" in plan["problems"][0]  # no genai_config.json there
    assert "onnxruntime_genai" not in sys.modules
    rows = vs_llamacpp.merge_rows([
        {"side": "onnxruntime-genai", "kv": "fp32", "phase": "speed", "decode_tok_s": {"512": 40.0},
         "prefill_tok_s": {"512": 200.0}, "peak_rss_mib": 400, "kv_bytes_per_token": 46080},
        {"side": "tqedge", "kv": "exact", "phase": "speed", "decode_tok_s": {"512": 60.0},
         "prefill_tok_s": {"512": 100.0}, "peak_rss_mib": 300, "kv_bytes_per_token": 5400}])
    assert vs_llamacpp.ratios(rows) == []  # no llama.cpp row: no ratio against it
    (q,) = vs_llamacpp.ratios(rows, "onnxruntime-genai")
    assert q["decode"] == {"512": 1.5} and q["prefill"] == {"512": 0.5} and q["rss"] == 0.75
    assert "ratio vs onnxruntime-genai's fastest | exact | | | | 0.50x | 1.50x | 0.75x |" in vs_llamacpp.table(rows)


def test_layer_allocation_lowers_the_cheapest_layers():
    """allocate: fewest lowered layers that meet the byte target, cheapest KL cost first."""
    layer_bits = _bench("layer_bits")
    kl = {0: 0.5, 1: 0.1, 2: 0.9, 3: 0.2}  # per-layer KL when lowered; base KL 0.05
    rows = [{"config": "K4V3", "kl": 0.05, "bytes_per_token": 400, "settings": {}}]
    rows += [{"config": f"K4V3+L{i}@K4V2", "kl": 0.05 + c, "bytes_per_token": 376,
              "settings": {"layer_bits": {str(i): [4.0, 2.0]}}} for i, c in kl.items()]
    got = layer_bits.allocate([{"results": rows}], max_bytes=360)  # needs 40 bytes: two layers of 24
    assert got["lowered"] == [1, 3] and got["bytes_per_token"] == 352
    assert got["config"] == "K4V3+L1,3@K4V2" and abs(got["predicted_kl_cost"] - 0.3) < 1e-12
    assert layer_bits.allocate([{"results": rows}], max_bytes=400)["config"] == "K4V3"
    assert [c.name for c in layer_bits.sweep_configs("4,3", "4,2", 2)] == ["K4V3", "K4V3+L0@K4V2", "K4V3+L1@K4V2"]


def test_eval_needle_raw(smollm2_bundle):
    """--raw: a raw completion prompt even though the bundle has a chat template."""
    res = CliRunner().invoke(cli, ["eval", "needle", str(smollm2_bundle), "--raw", "--ctx", "300", "--depths", "0.5",
                                   "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["prompt"] == "raw" and r["cases"][0]["prompt_tokens"] <= 300
