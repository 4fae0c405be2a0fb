"""``tqedge eval`` CLI (--json schema, errors) and the quality study's smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from click.testing import CliRunner

from _bundles import smollm2_bundle  # noqa: F401  (fixture)
from tqedge.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PPL_FIELDS = {"ppl", "ppl_exact", "delta_pct", "kl", "top1_agree", "tokens", "kv_bits", "bytes_per_token",
              "ppl_last_quarter"}


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
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import quality
    finally:
        sys.path.pop(0)
    out = tmp_path / "q.json"
    assert quality.main(["--smoke", "--bundle", str(smollm2_bundle), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    k4, k2 = (next(r for r in doc["results"] if r["config"] == n) for n in ("K4V4", "K2V2"))
    for r in (k4, k2):
        assert PPL_FIELDS | {"bits_per_value", "tokens_in_32mib", "delta_last_quarter_pct"} <= set(r)
    assert 0 < k4["kl"] < k2["kl"]
    assert k4["delta_pct"] > -0.5 and k2["delta_pct"] > k4["delta_pct"] - 0.5
    assert k4["bytes_per_token"] > k2["bytes_per_token"]
