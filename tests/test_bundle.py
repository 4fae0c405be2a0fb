"""The manifest contract: round trip, validation, version refusal, checksums, atomic dirs."""

import json

import pytest

from tqedge.bundle import (ArchSpec, AttentionNode, GraphSpec, Manifest, TokenizerSpec, WeightSpec,
                           read_manifest, write_manifest)
from tqedge.errors import TqedgeError
from tqedge.files import atomic_directory


def _manifest(layers=2) -> Manifest:
    arch = ArchSpec(name="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=layers,
                    num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                    max_position_embeddings=256, tie_word_embeddings=True)
    g = GraphSpec(segments=[f"segments/{i:02d}.onnx" for i in range(layers + 1)],
                  attention=[AttentionNode(i, f"l{i}.q", f"l{i}.k", f"l{i}.v", f"l{i}.o") for i in range(layers)],
                  file=None, data=["weights.bin"])
    return Manifest(name="t", architecture=arch, tokenizer=TokenizerSpec(eos_token_ids=[2]),
                    weights=WeightSpec(format="fp32"), graphs={"onnx": g})


def _bundle(tmp_path, m=None):
    m = m or _manifest()
    (tmp_path / "segments").mkdir()
    for s in m.graphs["onnx"].segments:
        (tmp_path / s).write_bytes(b"graph " + s.encode())
    (tmp_path / "weights.bin").write_bytes(b"\0" * 1000)
    (tmp_path / "tokenizer.json").write_text("{}")
    write_manifest(tmp_path, m)
    return tmp_path


def test_roundtrip(tmp_path):
    m = _manifest()
    _bundle(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back.to_dict() == m.to_dict()
    assert back.files["weights.bin"].bytes == 1000
    assert len(back.files["weights.bin"].sha256) == 64


def test_refuses_other_version(tmp_path):
    _bundle(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(TqedgeError, match="format version 99 is not supported"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("path,value,match", [
    (("architecture", "num_heads"), "4", "architecture.num_heads must be an integer"),
    (("architecture", "num_kv_heads"), 3, "multiple of num_kv_heads"),
    (("weights", "format"), "int3", "unknown weight format"),
    (("kv", "rotation"), "fourier", "unknown kv.rotation"),
])
def test_rejects_bad_fields(tmp_path, path, value, match):
    _bundle(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data.setdefault(path[0], {})[path[1]] = value
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(TqedgeError, match=match):
        read_manifest(tmp_path)


def test_missing_field_named(tmp_path):
    _bundle(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    del data["architecture"]["hidden_size"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(TqedgeError, match="missing field manifest.architecture.hidden_size"):
        read_manifest(tmp_path)


def test_detects_corruption_and_truncation(tmp_path):
    _bundle(tmp_path)
    w = tmp_path / "weights.bin"
    w.write_bytes(b"\1" + b"\0" * 999)
    with pytest.raises(TqedgeError, match="fails its SHA-256"):
        read_manifest(tmp_path)
    read_manifest(tmp_path, verify="size")  # same size: only a full check notices
    w.write_bytes(b"\0" * 10)
    with pytest.raises(TqedgeError, match="truncated"):
        read_manifest(tmp_path, verify="size")
    w.unlink()
    with pytest.raises(TqedgeError, match="missing: weights.bin"):
        read_manifest(tmp_path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(TqedgeError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(TqedgeError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_segment_count_must_match_layers(tmp_path):
    m = _manifest()
    m.graphs["onnx"].segments.pop()
    with pytest.raises(TqedgeError, match="expected one more segment"):
        m.validate()


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "b.tqe"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(out) as tmp:
        (tmp / "x").write_text("done")
    assert (out / "x").read_text() == "done"
    with pytest.raises(TqedgeError, match="output exists"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "y").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tqe"]
