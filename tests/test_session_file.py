"""Session files: bit-exact round trip of TurboQuant and exact caches (checked array by array and
by continuing the conversation: the restored chat must produce the same tokens as the original
one continuing in memory), the on-disk layout parsed independently of the reader, and refusal
of truncated / corrupt / foreign / mismatched files with a one-line error."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import numpy as np
import pytest
from _bundles import TinyLM

from tqedge.errors import TqedgeError
from tqedge.runtime import session_file as SF
from tqedge.runtime.model import Model

GREEDY = dict(temperature=0, max_tokens=10)


@pytest.fixture
def lm():
    return TinyLM()


def _chat(lm, kv_bits="4,3"):
    chat = lm.chat(system="Be brief.", kv_bits=kv_bits, kv_budget="64KiB", **GREEDY)
    chat.send("Hello there, how are you today?")
    chat.send("What is the capital of France?")
    return chat


def _live(cache, name, arr):
    """The slots that hold tokens, computed here from the cache layout (module docstrings)."""
    if name in ("keys", "values"):  # exact: (L, Hkv, C, D), slots [0, length)
        return arr[:, :, : cache.length]
    if name.split(".")[0] in ("k_codes", "k_scales", "v_codes", "v_scales"):  # (Hkv, R, B)
        return arr[:, : max(0, cache.length - cache.sinks)]
    if name in ("fp_k", "fp_v"):  # (L, Hkv, S+W, D): sinks, then token p at S + p % W
        return arr[:, :, : cache.sinks + cache.offset]
    raise AssertionError(f"unexpected state array {name}")


def _assert_same_live_state(c1, c2):
    a, b = c1.state(), c2.state()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            assert _live(c1, k, a[k]).tobytes() == _live(c2, k, b[k]).tobytes(), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("kv_bits", ["4,3", "2.5,2", "exact"])
def test_round_trip_is_bit_exact_and_continues_identically(lm, tmp_path, kv_bits):
    chat = _chat(lm, kv_bits)
    path = tmp_path / "c.tqs"
    n = chat.save(path)
    assert path.stat().st_size == n
    restored = Model.chat_from(lm, path, kv_bits="saved")  # TinyLM borrows Model's methods
    assert type(restored.cache) is type(chat.cache)
    _assert_same_live_state(chat.cache, restored.cache)
    assert restored.messages == chat.messages and restored.cached_ids == chat.cached_ids
    assert restored.sampling == chat.sampling
    # the oracle for the next turn: the original chat, never saved, continuing in memory
    lm.calls.clear()
    got = restored.send("And Spain?")
    prefill_restored = lm.calls[0]
    assert got == chat.send("And Spain?")
    assert lm.calls[0] == prefill_restored < 30  # the restored cache was reused, not re-prefilled


def test_layout_matches_the_documented_format(lm, tmp_path):
    chat = _chat(lm)
    path = tmp_path / "c.tqs"
    chat.save(path)
    data = path.read_bytes()
    magic, version, hlen = struct.unpack_from("<8sIQ", data)
    assert magic == b"TQESESS\0" and version == SF.FORMAT_VERSION
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    p = struct.calcsize("<8sIQ")
    header = json.loads(data[p:p + hlen])
    payload = data[p + hlen:-32]
    state = chat.cache.state()
    names = [e["name"] for e in header["arrays"]]
    assert sorted(names) == sorted(k for k, v in state.items() if isinstance(v, np.ndarray))
    for e in header["arrays"]:
        arr = state[e["name"]]
        assert e["offset"] % 64 == 0 and e["dtype"][0] in "<|" and e["shape"] == list(arr.shape)
        live = _live(chat.cache, e["name"], arr)
        assert e["rows"] == live.shape[-2]
        assert payload[e["offset"]:e["offset"] + e["nbytes"]] == live.astype(arr.dtype.newbyteorder("<")).tobytes()
    # the compressed codes are stored as codes: far smaller than the fp32 K/V they stand for
    kc = [e for e in header["arrays"] if e["name"].startswith("k_codes")]
    assert kc and all(e["dtype"] == "|u1" for e in kc)
    assert header["meta"]["chat"]["ids"] == [int(i) for i in chat._ids]
    assert b"pickle" not in data[p:p + hlen]


def _one_line_error(fn) -> str:
    with pytest.raises(TqedgeError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_damaged_files_are_refused_with_one_line(lm, tmp_path):
    chat = _chat(lm)
    path = tmp_path / "c.tqs"
    chat.save(path)
    good = path.read_bytes()
    load = lambda: Model.chat_from(lm, path)  # noqa: E731
    path.write_bytes(good[: len(good) // 2])
    assert "checksum" in _one_line_error(load)
    path.write_bytes(good[:20])
    assert "truncated" in _one_line_error(load)
    bad = bytearray(good)
    bad[len(good) // 2] ^= 0x01  # one bit in the payload
    path.write_bytes(bytes(bad))
    assert "checksum" in _one_line_error(load)
    path.write_bytes(b"NOTASESS" + good[8:])
    assert "magic" in _one_line_error(load)
    v2 = good[:8] + struct.pack("<I", 99) + good[12:-32]
    path.write_bytes(v2 + hashlib.sha256(v2).digest())
    assert "version 99" in _one_line_error(load)
    assert "cannot read" in _one_line_error(lambda: Model.chat_from(lm, tmp_path / "missing.tqs"))


def test_mismatched_fingerprint_is_refused(lm, tmp_path):
    chat = _chat(lm)
    path = tmp_path / "c.tqs"
    chat.save(path)
    session = SF.read_session(path)
    other_bits = lm.new_cache(kv_bits="3,3", kv_budget="64KiB")
    assert "different bundle or cache" in _one_line_error(
        lambda: SF.restore_cache(other_bits, session, lm.manifest))
    other_bundle = dataclasses.replace(lm.manifest, name="another-model")
    same_cfg = lm.new_cache(kv_bits="4,3", kv_budget="64KiB")
    assert "different bundle or cache" in _one_line_error(
        lambda: SF.restore_cache(same_cfg, session, other_bundle))
    SF.restore_cache(same_cfg, session, lm.manifest)  # the matching one loads
    assert same_cfg.offset == chat.cache.offset


def test_a_file_without_a_chat_is_refused_by_chat_from(lm, tmp_path):
    cache = lm.new_cache(kv_bits="4,3", kv_budget="64KiB")
    path = tmp_path / "s.tqs"
    SF.save_session(path, lm.manifest, cache, {"server": {"ids": []}})
    assert "holds no chat" in _one_line_error(lambda: Model.chat_from(lm, path))


@pytest.mark.parametrize("trim", [3, 129, 250])
def test_dead_slots_are_not_saved_and_not_needed(lm, tmp_path, trim):
    """A cache trimmed (even past its fp16 window) keeps stale codes in dead slots; the file
    drops them, and the restored cache still continues exactly like the original."""
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(5, 400, 300)]
    cache = lm.new_cache(kv_bits="4,3", kv_budget="64KiB")
    for i in range(0, 300, 100):
        lm.forward(ids[i:i + 100], cache)
    cache.trim(trim)
    SF.save_session(tmp_path / "t.tqs", lm.manifest, cache)
    size = (tmp_path / "t.tqs").stat().st_size
    other = lm.new_cache(kv_bits="4,3", kv_budget="64KiB")
    SF.restore_cache(other, SF.read_session(tmp_path / "t.tqs"), lm.manifest)
    _assert_same_live_state(cache, other)
    assert size < cache.nbytes  # only the live part of the ring is on disk
    nxt = ids[:40]
    a = [lm.forward([t], cache) for t in nxt[:5]] + [lm.forward(nxt[5:], cache)]
    b = [lm.forward([t], other) for t in nxt[:5]] + [lm.forward(nxt[5:], other)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_chat_from_refuses_another_cache_configuration_naming_both(lm, tmp_path):
    """A file saved with K4V3 / 64 KiB is refused by a model whose cache is exact / 256 KiB
    (TinyLM's defaults), the message naming both; kv_bits="saved" restores it as saved, and
    the same explicit configuration restores it too."""
    chat = _chat(lm, "4,3")
    path = tmp_path / "c.tqs"
    chat.save(path)
    msg = _one_line_error(lambda: Model.chat_from(lm, path))
    assert "kv_bits=4,3 kv_budget=65536" in msg and "kv_bits=exact kv_budget=262144" in msg
    assert "kv_bits='saved'" in msg
    # another exact-vs-compressed mismatch the other way round, and a budget-only mismatch
    exact = _chat(lm, "exact")
    exact.save(tmp_path / "e.tqs")
    assert "kv_bits=exact kv_budget=65536" in _one_line_error(
        lambda: Model.chat_from(lm, tmp_path / "e.tqs", kv_bits="4,3", kv_budget="64KiB"))
    assert "kv_budget=65536" in _one_line_error(lambda: Model.chat_from(lm, path, kv_bits="4,3"))
    assert "drop kv_budget" in _one_line_error(
        lambda: Model.chat_from(lm, path, kv_bits="saved", kv_budget="64KiB"))
    # the oracle for what follows: the original chat, continuing in memory
    for restored in (Model.chat_from(lm, path, kv_bits="saved"),
                     Model.chat_from(lm, path, kv_bits="4,3", kv_budget="64KiB")):
        assert type(restored.cache) is type(chat.cache) and restored.cache.nbytes == chat.cache.nbytes
        _assert_same_live_state(chat.cache, restored.cache)
        assert restored.send("And Spain?") == _continued(lm, "4,3")
    # a file saved with the model's own default configuration needs no argument
    default = lm.chat(system="Be brief.", **GREEDY)
    default.send("Hello there, how are you today?")
    default.save(tmp_path / "d.tqs")
    assert Model.chat_from(lm, tmp_path / "d.tqs").cached_ids == default.cached_ids


def _continued(lm, kv_bits) -> str:
    return _chat(lm, kv_bits).send("And Spain?")
