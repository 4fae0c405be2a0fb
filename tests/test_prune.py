"""``--drop-layers``: block influence and calibration perplexity against transformers (hooks on a
tiny random HF model), pruned exports against transformers with the same blocks removed from
its ModuleList, renumbering of per-layer KV bits and per-layer ArchSpec lists, the manifest
record, the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tqedge  # noqa: E402
from tqedge.errors import TqedgeError  # noqa: E402

from test_export import WORDS, _prompt, build_tiny_hf  # noqa: E402

LAYERS = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    src = build_tiny_hf(root / "hf", "llama", num_hidden_layers=LAYERS, seed=3)
    cal = root / "cal.txt"
    rng = np.random.default_rng(5)
    cal.write_text(" ".join(rng.choice(WORDS, 120)))
    return root, src, cal


def _hf(src, keep=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    if keep is not None:
        model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
        model.config.num_hidden_layers = len(keep)
    return model


def _hf_influence(model, ids) -> list[float]:
    """1 - cos(block input, block output), token mean, from forward hooks on each decoder layer."""
    got = []

    def hook(mod, args, kwargs, out):
        h_in = (args[0] if args else kwargs["hidden_states"])[0]
        h_out = (out[0] if isinstance(out, tuple) else out)[0]
        got.append(float(1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean()))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([ids]), use_cache=False)
    for h in handles:
        h.remove()
    return got


def _hf_ppl(model, ids) -> float:
    with torch.no_grad():
        return float(torch.exp(model(torch.tensor([ids]), labels=torch.tensor([ids]), use_cache=False).loss))


def test_auto_drops_the_least_influential_blocks_as_transformers_measures_them(tiny):
    root, src, cal = tiny
    m = tqedge.export(src, root / "auto.tqe", drop_layers="auto:2", calibration=cal)
    p = m.pruning
    from tqedge.exporters.prune import calibration_ids
    from tqedge.exporters.sources import load_source

    ids, name = calibration_ids(load_source(src), cal)
    assert (name, p.calibration_tokens) == ("cal.txt", len(ids)) and ids[0] == 1  # BOS, as the tokenizer says
    ref = _hf_influence(_hf(src), ids)
    np.testing.assert_allclose(p.influence, ref, rtol=1e-3, atol=1e-5)
    assert p.dropped == sorted(np.argsort(ref)[:2].tolist()) and p.method == "auto"
    keep = [i for i in range(LAYERS) if i not in p.dropped]
    assert p.calibration_ppl == pytest.approx(_hf_ppl(_hf(src), ids), rel=1e-3)
    assert p.calibration_ppl_pruned == pytest.approx(_hf_ppl(_hf(src, keep), ids), rel=1e-3)
    assert m.architecture.num_layers == LAYERS - 2


@pytest.mark.parametrize("drop", ["1,3", "0,4"])
def test_pruned_export_equals_transformers_without_those_blocks(tiny, drop):
    root, src, cal = tiny
    out = root / f"manual{drop.replace(',', '_')}.tqe"
    m = tqedge.export(src, out, drop_layers=drop, calibration=cal)
    dropped = [int(x) for x in drop.split(",")]
    keep = [i for i in range(LAYERS) if i not in dropped]
    assert m.pruning.dropped == dropped and m.pruning.method == "manual" and len(m.pruning.influence) == LAYERS
    ids = _prompt(40, seed=7)
    with torch.no_grad():
        want = _hf(src, keep)(torch.tensor([ids]), use_cache=False).logits[0].numpy()
        full = _hf(src)(torch.tensor([ids]), use_cache=False).logits[0].numpy()
    assert np.abs(want - full).max() > 0.1  # dropping really changed the model
    model = tqedge.load(out)
    cache = model.new_cache(kv_bits="exact", kv_budget="1MiB")
    got = model.forward(ids[:32], cache, logits="all")
    steps = [model.forward([t], cache) for t in ids[32:]]
    np.testing.assert_allclose(got, want[:32], atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.stack(steps), want[32:], atol=1e-3, rtol=0)


def test_per_layer_kv_bits_follow_the_renumbering(tiny):
    root, src, cal = tiny
    m = tqedge.export(src, root / "bits.tqe", drop_layers="1,3", kv_bits="K4V3+L4@K8V8+L0@K4V2", calibration=cal)
    assert m.kv.layer_bits == {"2": [8.0, 8.0], "0": [4.0, 2.0]}  # source block 4 is layer 2 now
    with pytest.raises(TqedgeError, match="layer 3, which --drop-layers removes"):
        tqedge.export(src, root / "bad.tqe", drop_layers="1,3", kv_bits="K4V3+L3@K8V8", calibration=cal)
    assert not (root / "bad.tqe").exists()


def test_keep_layers_maps_every_per_layer_list(tiny):
    """A per-layer ArchSpec list (e.g. Gemma's local/global pattern) follows the renumbering."""
    _, src, _ = tiny
    from tqedge.bundle import ArchSpec
    from tqedge.exporters.prune import keep_layers
    from tqedge.exporters.sources import load_source

    spec = load_source(src)
    kinds = ["sliding_attention", "full_attention"]
    types = [kinds[i % 3 == 2] for i in range(LAYERS)]  # ArchSpec.layer_types: Gemma's pattern
    spec.arch = dataclasses.replace(spec.arch, layer_types=types, sliding_window=8)
    pruned = keep_layers(spec, [0, 2, 4])
    assert pruned.arch.num_layers == 3 and pruned.arch.layer_types == [types[0], types[2], types[4]]
    np.testing.assert_array_equal(pruned.weights["model.layers.1.mlp.up_proj.weight"],
                                  spec.weights["model.layers.2.mlp.up_proj.weight"])
    assert not any(k.startswith("model.layers.3.") for k in pruned.weights)
    pruned.validate()
    assert spec.arch.num_layers == LAYERS  # the input is untouched


@pytest.mark.parametrize("text", ["auto:0", "auto:5", "auto:x", "1,1", "9", "0,1,2,3,4", "a,b"])
def test_bad_drop_layers_are_refused(text):
    from tqedge.exporters.prune import parse_drop_layers

    with pytest.raises(TqedgeError, match="--drop-layers"):
        parse_drop_layers(text, LAYERS)


def test_manifest_validates_the_pruning_record(tiny):
    root, src, cal = tiny
    from tqedge.bundle import Manifest

    m = tqedge.export(src, root / "val.tqe", drop_layers="2", calibration=cal)
    data = json.loads((root / "val.tqe" / "manifest.json").read_text())
    assert Manifest.from_dict(data).pruning.dropped == [2]
    for bad, msg in (({"dropped": [2, 2]}, "ascending distinct"), ({"original_num_layers": 7}, "drops 1 of 7"),
                     ({"influence": [0.1]}, "influence has 1 values"), ({"method": "x"}, "pruning.method")):
        d = json.loads(json.dumps(data))
        d["pruning"].update(bad)
        with pytest.raises(TqedgeError, match=msg):
            Manifest.from_dict(d)
    from tqedge.exporters.sources import load_source

    full = load_source(src)
    block = sum(w.size for k, w in full.weights.items() if k.startswith("model.layers.2."))
    assert m.source["parameters"] == full.num_parameters - block


def test_cli_export_drop_layers_and_inspect(tiny):
    from click.testing import CliRunner

    from tqedge.cli import cli

    root, src, cal = tiny
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(root / "cli.tqe"), "--drop-layers", "auto:1",
                                  "--calibration", str(cal)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["inspect", str(root / "cli.tqe")])
    assert r.exit_code == 0 and "1 of 5 blocks dropped (auto)" in r.output and "calibration PPL" in r.output
    r = CliRunner().invoke(cli, ["plan", "--model", str(root / "cli.tqe"), "--memory", "1GiB", "--json"])
    md = json.loads(r.output)["model"]
    assert r.exit_code == 0 and md["num_layers"] == 4 and len(md["dropped_layers"]) == 1
    assert md["pruning_ppl"][0] > 0 and md["pruning_ppl"][1] > 0
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(root / "x.tqe"), "--drop-layers", "7,8"])
    assert r.exit_code == 2 and "--drop-layers" in r.output and "Traceback" not in r.output
