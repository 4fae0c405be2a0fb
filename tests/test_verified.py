"""verify="auto" (tqedge/verified.py): a full SHA-256 check the first time a bundle is loaded on
this device and after a file's size or mtime changes, nothing but sizes otherwise; the record
(verified.json in the user cache dir) is written atomically. Hash calls are counted through
``tqedge.files.sha256_file``; corruption is made by flipping real bytes in a copied bundle."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from test_export import build_tiny_gguf

import tqedge
from tqedge import files
from tqedge.bundle import read_manifest
from tqedge.cli import cli
from tqedge.errors import TqedgeError
from tqedge.verified import record_path

WEIGHTS = "onnx/weights.bin"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("verified")
    out = root / "tiny.tqe"
    tqedge.export(build_tiny_gguf(root / "tiny.gguf"), out)
    return out


@pytest.fixture
def bundle(exported, tmp_path, monkeypatch):
    """A fresh copy of the tiny bundle (never loaded on "this device": an empty cache dir)."""
    monkeypatch.setenv("TQEDGE_CACHE_DIR", str(tmp_path / "cache"))
    return shutil.copytree(exported, tmp_path / "copy.tqe")


@pytest.fixture
def hashed(monkeypatch):
    """The relative paths hashed since the last clear()."""
    seen: list[str] = []
    real = files.sha256_file

    def counting(path, *a, **k):
        seen.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(files, "sha256_file", counting)
    return seen


def _flip(path, offset: int = 100, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _names(seen, bundle) -> list[str]:
    return sorted(os.path.relpath(p, bundle).replace(os.sep, "/") for p in seen)


def test_first_load_hashes_everything_then_nothing_until_a_file_changes(bundle, hashed):
    all_files = sorted(read_manifest(bundle, verify="none").files)
    tqedge.load(bundle)  # the default is "auto"
    assert _names(hashed, bundle) == all_files
    rec = json.loads(record_path().read_text())["bundles"][str(bundle.resolve())]
    for rel in all_files:
        st = (bundle / rel).stat()
        assert rec["files"][rel] == [st.st_size, st.st_mtime_ns]
    hashed.clear()
    tqedge.load(bundle)
    read_manifest(bundle, verify="auto")
    assert hashed == []  # unchanged: sizes only
    st = (bundle / WEIGHTS).stat()
    os.utime(bundle / WEIGHTS, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touch
    tqedge.load(bundle)
    assert _names(hashed, bundle) == [WEIGHTS]  # only the touched file, then it is recorded again
    hashed.clear()
    tqedge.load(bundle)
    assert hashed == []
    tqedge.load(bundle, verify="full")
    assert _names(hashed, bundle) == all_files  # full always hashes


def test_a_flipped_byte_is_refused_naming_the_file(bundle, hashed):
    _flip(bundle / WEIGHTS)  # a copied bundle, corrupted before its first load here
    with pytest.raises(TqedgeError) as e:
        tqedge.load(bundle)
    assert "\n" not in str(e.value) and f"bundle file {WEIGHTS} fails its SHA-256 check" in str(e.value)
    assert not record_path().exists()  # nothing is recorded for a bundle that failed
    for cmd in (["generate", str(bundle), "-p", "a"], ["chat", str(bundle)],
                ["eval", "ppl", str(bundle), "--text", str(bundle / "tokenizer.json")]):
        r = CliRunner().invoke(cli, cmd, input="a\n")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, (cmd, r.output)
        assert r.stderr.startswith(f"error: bundle file {WEIGHTS} fails its SHA-256 check"), r.stderr
    r = CliRunner().invoke(cli, ["generate", str(bundle), "-p", "a", "--verify", "size", "--max-tokens", "1"])
    assert r.exit_code == 0, r.output  # the old default: sizes only, the flip goes unseen


def test_corruption_after_verification_is_caught_when_mtime_moves(bundle, hashed):
    tqedge.load(bundle)
    _flip(bundle / WEIGHTS)  # an ordinary write: the mtime changes
    os.utime(bundle / WEIGHTS, ns=(0, (bundle / WEIGHTS).stat().st_mtime_ns + 1))
    with pytest.raises(TqedgeError, match="weights.bin fails its SHA-256"):
        tqedge.load(bundle)


def test_what_auto_does_not_catch_and_full_does(bundle, hashed):
    """Documented limitation (docs/FORMAT.md): bit rot that keeps size and mtime."""
    tqedge.load(bundle)
    _flip(bundle / WEIGHTS, keep_mtime=True)
    hashed.clear()
    tqedge.load(bundle)
    assert hashed == []
    with pytest.raises(TqedgeError, match="weights.bin fails its SHA-256"):
        tqedge.load(bundle, verify="full")
    r = CliRunner().invoke(cli, ["inspect", str(bundle), "--verify"])
    assert r.exit_code == 2 and "weights.bin fails its SHA-256" in r.stderr


def test_a_new_manifest_at_the_same_path_is_verified_afresh(bundle, hashed):
    tqedge.load(bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["name"] = "renamed"
    (bundle / "manifest.json").write_text(json.dumps(m))
    hashed.clear()
    tqedge.load(bundle)
    assert len(hashed) == len(m["files"])


def test_the_record_survives_a_crash_mid_write(bundle, hashed, monkeypatch):
    tqedge.load(bundle)
    good = record_path().read_bytes()
    other = shutil.copytree(bundle, bundle.parent / "other.tqe")

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the temp file and the rename

    with monkeypatch.context() as m:
        m.setattr(files.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            tqedge.load(other)
    assert record_path().read_bytes() == good  # the old record, whole
    assert [p.name for p in record_path().parent.iterdir()] == ["verified.json"]  # no temp file left
    record_path().write_bytes(good[: len(good) // 2])  # a torn file from elsewhere: treated as empty
    hashed.clear()
    tqedge.load(bundle)
    assert len(hashed) == len(read_manifest(bundle, verify="none").files)
    assert json.loads(record_path().read_text())["version"] == 1


def test_an_unwritable_cache_dir_still_verifies(bundle, hashed, monkeypatch, tmp_path, caplog):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("TQEDGE_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    tqedge.load(bundle)
    assert "cannot record verified bundle" in caplog.text
    _flip(bundle / WEIGHTS)
    with pytest.raises(TqedgeError, match="weights.bin fails its SHA-256"):
        tqedge.load(bundle)


def test_serve_has_verify_and_refuses_a_corrupt_bundle(bundle):
    pytest.importorskip("uvicorn")
    r = CliRunner().invoke(cli, ["serve", "--help"])
    assert "--verify [auto|full|size|none]" in r.output
    _flip(bundle / WEIGHTS)
    r = CliRunner().invoke(cli, ["serve", str(bundle), "--port", "0"])
    assert r.exit_code == 2 and r.stderr.startswith(f"error: bundle file {WEIGHTS} fails its SHA-256"), r.output
