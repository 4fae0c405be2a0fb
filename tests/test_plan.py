"""tqedge plan: parameter counts against the GGUF file, KV bytes against a hand computation
from (d, bits, layers, heads), token counts against the cache the runtime really builds,
monotonicity/consistency of the table, and the CLI's error on a bad --memory."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
from _bundles import smollm2_bundle  # noqa: F401  (fixture)

from tqedge.bundle import ArchSpec, KVSpec, Manifest, TokenizerSpec, WeightSpec
from tqedge.errors import TqedgeError
from tqedge.runtime import footprint, memory, plan
from tqedge.runtime.cache import make_cache

GiB, MiB = 1024**3, 1024**2

# SmolLM2-135M-Instruct (the real model's GGUF metadata)
SMOL = ArchSpec(name="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5,
                max_position_embeddings=8192, tie_word_embeddings=True)


def manifest(arch: ArchSpec = SMOL, **kv) -> Manifest:
    return Manifest(name="smollm2", architecture=arch, tokenizer=TokenizerSpec(),
                    weights=WeightSpec(format="int8"), kv=KVSpec(**kv))


def test_parameter_count_matches_the_exporters_shape_table():
    # exporters/spec.py lists every tensor the exporter requires (checked there against the GGUF)
    from tqedge.exporters import spec
    ms = spec.ModelSpec(arch=SMOL, weights={}, tokenizer_json="", tokenizer=TokenizerSpec())
    assert footprint.parameter_count(SMOL) == sum(math.prod(s) for s in ms.expected_shapes().values())
    assert footprint.parameter_count(SMOL) == 134_515_008  # SmolLM2-135M's published parameter count


def test_parameter_count_untied_with_bias_by_hand():
    a = ArchSpec(name="qwen2", vocab_size=100, hidden_size=16, intermediate_size=40, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4,
                 max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True)
    per_layer = 16 * 16 + 2 * (8 * 16) + 16 * 16 + 3 * 40 * 16 + 2 * 16 + (16 + 8 + 8)
    assert footprint.parameter_count(a) == 2 * per_layer + 2 * 100 * 16 + 16


def test_weight_bytes_by_hand_for_one_format():
    # int4 MatMulNBits, blocks of 32: 16 B of codes + a 4 B fp32 scale per block, zero points
    # two 4-bit values per byte per row; the 576-wide inputs are 18 blocks, the 1536-wide 48.
    def int4(n, k):
        blocks = math.ceil(k / 32)
        return n * blocks * 20 + n * math.ceil(blocks / 2)

    linears = 30 * (int4(576, 576) * 2 + int4(192, 576) * 2 + int4(1536, 576) * 2 + int4(576, 1536))
    head = 49152 * 576 * 21 // 16  # 8-bit head: blocks of 16 codes + a 4 B scale + a 1 B zero point
    norms_fp32 = 4 * (61 * 576)
    # tied: on disk the embedding gathers the head's own int8 rows; resident, the gather's copy counts
    assert footprint.weight_bytes(SMOL, "int4", resident=False) == linears + head + norms_fp32
    assert footprint.weight_bytes(SMOL, "int4") == linears + 2 * head + norms_fp32


def test_weight_bytes_untied_counts_the_head_once_per_copy():
    untied = dataclasses.replace(SMOL, tie_word_embeddings=False)
    head_fp32 = 4 * 49152 * 576
    # fp32: tied shares the table with the head; untied stores the head as its own matrix
    assert footprint.weight_bytes(untied, "fp32") - footprint.weight_bytes(SMOL, "fp32") == head_fp32
    # int4 stores the head as int8 blocks and gathers the tied embedding from them; untied adds the
    # embedding's own int8 rows (16 codes + a 4-byte scale + a zero point per block of 16)
    assert footprint.weight_bytes(untied, "int4", resident=False) - footprint.weight_bytes(SMOL, "int4", resident=False) == 49152 * 576 * 21 // 16
    assert footprint.weight_bytes(untied, "int4") == footprint.weight_bytes(SMOL, "int4")
    # int8 keeps a float16 gather table beside its int8 head, tied or not
    assert footprint.weight_bytes(untied, "int8", resident=False) == footprint.weight_bytes(SMOL, "int8", resident=False)
    assert footprint.parameter_count(untied) - footprint.parameter_count(SMOL) == 49152 * 576


def test_weight_formats_are_ordered():
    w = {f: footprint.weight_bytes(SMOL, f) for f in footprint.WEIGHT_FORMATS}
    d = {f: footprint.weight_bytes(SMOL, f, resident=False) for f in footprint.WEIGHT_FORMATS}
    assert w["int4"] < w["int8"] < w["fp32"]
    assert d["int4"] < d["int8"] < d["fp16"] < d["fp32"]
    assert w["fp16"] > d["fp16"]  # cast to fp32 at load: resident more than on disk


@pytest.mark.parametrize("kb, vb", [(4, 3), (8, 8), (2, 2)])
def test_kv_bytes_by_hand(kb, vb):
    m = manifest()
    # one vector: d*b/8 bytes of codes + one fp16 scale; per token: layers * kv_heads * (K + V)
    per = 30 * 3 * ((64 * kb // 8 + 2) + (64 * vb // 8 + 2))
    got = footprint.kv_bytes(SMOL, m.kv, f"K{kb}V{vb}")
    assert got["per_token"] == per
    assert got["sinks"] == m.kv.sinks
    assert got["fixed"] == (m.kv.sinks + m.kv.window) * 2 * 30 * 3 * 64 * 2  # fp16 K and V
    assert footprint.kv_bytes(SMOL, m.kv, "exact fp32")["per_token"] == 2 * 30 * 3 * 64 * 4


def test_kv_tokens_inverse_of_budget_for():
    kv = manifest().kv
    for config in footprint.KV_CONFIGS:
        for n in (200, 1000, 12345):
            need = footprint.kv_budget_for(n, SMOL, kv, config)
            assert footprint.kv_tokens(need, SMOL, kv, config) == n
            assert footprint.kv_tokens(need - 1, SMOL, kv, config) == n - 1


@pytest.mark.parametrize("config, bits", [("exact fp32", "exact"), ("K4V3", "4,3"), ("K2V2", "2,2")])
def test_kv_tokens_match_the_cache_the_runtime_builds(config, bits):
    m = manifest()
    budget = 8 * MiB
    cache = make_cache(m, budget, kv_bits=bits)
    assert cache.capacity == footprint.kv_tokens(budget, SMOL, m.kv, config)
    assert cache.nbytes <= budget


def test_table_is_monotone_and_capped():
    p = plan.plan(manifest(), None)
    assert [d["memory"] for d in p["devices"]] == list(plan.DEVICES)
    order = ["exact fp32", "exact fp16", "K8V8", "K4V4", "K4V3", "K3V3", "K2V2"]
    for d in p["devices"]:
        for fmt, row in d["formats"].items():
            tokens = [row["configs"][c]["tokens"] for c in order]
            fit = [t for t in tokens if t]  # 0: the cache cannot be built in that room
            assert fit == sorted(fit), (d["memory"], fmt, tokens)
            compressed = tokens[2:]  # one minimum (sinks + window + a few codes): lighter ones fit once one does
            assert all(b for a_, b in zip(compressed, compressed[1:]) if a_), (d["memory"], fmt, tokens)
            for c in row["configs"].values():
                assert c["tokens"] <= SMOL.max_position_embeddings
                if c["capped"]:
                    assert c["tokens"] == SMOL.max_position_embeddings
        lighter = [d["formats"][f]["configs"]["K4V3"]["tokens"] for f in ("fp32", "int8", "int4")]
        assert lighter == sorted(lighter)
    for c in order:  # more memory never gives fewer tokens
        seq = [d["formats"]["int8"]["configs"][c]["tokens"] for d in p["devices"]]
        assert seq == sorted(seq)
    # 8 GiB holds SmolLM2's whole 8192-token context even uncompressed
    big = p["devices"][-1]["formats"]["fp32"]["configs"]["exact fp32"]
    assert big["capped"] and big["tokens"] == 8192


def test_memory_budget_adds_up():
    m = manifest()
    mem = 1 * GiB
    d = plan.plan(m, mem, os_reserve=0)["devices"][0]
    # measured figures: the runtime's working set of a prefill chunk, a margin, and per format
    # the resident weights plus the overhead measured beyond them
    room = mem - memory.working_set_bytes(SMOL, footprint.PREFILL_CHUNK) - footprint.MARGIN
    assert d["room"] == room
    row = d["formats"]["int8"]
    assert row["kv_room"] == room - footprint.weight_bytes(SMOL, "int8") - footprint.RUNTIME_OVERHEAD["int8"]
    t = footprint.kv_tokens(row["kv_room"], SMOL, m.kv, "K4V3")
    assert row["configs"]["K4V3"]["tokens"] == min(t, 8192)


def test_recommendation_fits_and_says_when_capped():
    m = manifest()
    for mem in plan.DEVICES:
        rec = plan.recommend(m, mem)
        room = mem - plan.OS_RESERVE - memory.working_set_bytes(SMOL, footprint.PREFILL_CHUNK) - footprint.MARGIN
        assert footprint.fixed_bytes(SMOL, rec["weights"]) + rec["kv_budget"] <= room
        assert rec["tokens"] == min(footprint.kv_tokens(rec["kv_budget"], SMOL, m.kv, "K4V3"), 8192)
        assert ("model's max" in rec["line"]) == rec["capped"]
        assert rec["kv_budget_arg"] in rec["line"]
        # the first recommended format that leaves room for the whole (8192-token) context
        need = footprint.kv_budget_for(8192, SMOL, m.kv, "K4V3")
        fits = [f for f in plan.FORMAT_ORDER if footprint.fixed_bytes(SMOL, f) + need <= room]
        assert rec["weights"] == fits[0]
    assert plan.FORMAT_ORDER == ("int8", "int4")  # int8 decodes faster than fp32 at half the memory
    tiny = plan.recommend(m, 400 * MiB)
    assert tiny["weights"] is None and "does not fit" in tiny["line"]


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-1GB"])
def test_cli_refuses_bad_memory_with_one_line(bad, tmp_path):
    from tqedge.bundle import write_manifest

    m = manifest()
    m.graphs = {}
    (tmp_path / "tokenizer.json").write_text("{}")
    write_manifest(tmp_path, m)
    out = subprocess.run([sys.executable, "-m", "tqedge.cli", "plan", "--model", str(tmp_path),
                          "--memory", bad], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "byte size" in lines[0]


def test_cli_json_on_a_bundle(smollm2_bundle):
    out = subprocess.run([sys.executable, "-m", "tqedge.cli", "plan", "--model", str(smollm2_bundle),
                          "--memory", "1GiB", "--json"], capture_output=True, text=True, timeout=60, check=True)
    p = json.loads(out.stdout)
    md = p["model"]
    # the estimate for the bundle's own format is its real weights file, within 1%
    assert md["bundle_weight_files"] == pytest.approx(p["weights"][md["format"]]["disk"], rel=0.01)


def _initializer_bytes(bundle) -> int:
    """Bytes of every initializer model.onnx reads (inline or external, a shared offset once)
    plus an nf4-dq side file's codes and constants: the weights as the exporter wrote them."""
    import numpy as np
    import onnx

    from tqedge.bundle import read_manifest
    from tqedge.runtime import dq_scales

    g = onnx.load(str(bundle / "onnx" / "model.onnx"), load_external_data=False).graph
    seen, total = set(), 0
    for t in g.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if ext.get("location") == dq_scales.PLACEHOLDER:  # nf4-dq: expanded at load from the side file
            continue
        if ext:
            if (ext["location"], ext.get("offset")) not in seen:
                seen.add((ext["location"], ext.get("offset")))
                total += int(ext["length"])
        else:
            total += onnx.numpy_helper.to_array(t).nbytes
    scales = read_manifest(bundle, verify="size").weights.scales
    if scales:
        with np.load(bundle / scales) as z:
            total += z["codes"].nbytes + z["scales"].nbytes
    return total


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4", "nf4", "nf4-dq"])
@pytest.mark.parametrize("tied", [False, True])
def test_planner_sizes_each_format_as_the_exporter_writes_it(tmp_path, fmt, tied):
    """The planner's bytes on disk equal the weights a real export writes (a tiny model with the
    exporter's own quantization), tied and untied: the LM head in its own format, the embedding
    as a float table or as int8 rows shared with a tied head."""
    pytest.importorskip("transformers")
    from test_export import build_tiny_hf

    import tqedge
    from tqedge.bundle import read_manifest

    src = build_tiny_hf(tmp_path / "hf", "llama", tie_word_embeddings=tied)
    tqedge.export(src, tmp_path / "b.tqe", weights=fmt)
    m = read_manifest(tmp_path / "b.tqe", verify="size")
    assert m.architecture.tie_word_embeddings == tied
    want = footprint.weight_bytes(m.architecture, fmt, resident=False)
    assert _initializer_bytes(tmp_path / "b.tqe") == pytest.approx(want, rel=0.01)
