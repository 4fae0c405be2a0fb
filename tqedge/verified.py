"""Which bundles were fully verified on this device: ``verify="auto"`` without re-hashing.

Hashing a 200 MB bundle on every start costs seconds on a Raspberry Pi; checking only sizes
misses a flipped byte. ``auto`` does both, at the right times: the first time a bundle is
loaded on a device, every file's SHA-256 is checked against the manifest and the file's
``(size, mtime_ns)`` is recorded in ``user_cache_dir() / "verified.json"``. Later loads check
sizes and compare each file's ``(size, mtime_ns)`` with the record; only files that changed
(or were never recorded) are hashed again. A record holds for one bundle path *and* one
manifest (its SHA-256): a re-export at the same path is verified afresh.

What this does not catch: a file whose bytes change while its size and mtime stay the same
(bit rot on the storage, or a tool that restores mtimes). ``tqedge inspect BUNDLE --verify``
(or ``verify="full"``) hashes every file regardless of the record.

The record is a small JSON file written atomically (temp file + rename, see tqedge/files.py);
an unreadable record counts as empty and an unwritable cache directory only costs re-hashing
next time. Layout::

    {"version": 1, "bundles": {"<resolved bundle path>": {"manifest_sha256": "...",
        "files": {"<relative path>": [bytes, mtime_ns], ...}, "checked": <unix time>}}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from tqedge import files
from tqedge.bundle import verify_files
from tqedge.errors import TqedgeError
from tqedge.paths import user_cache_dir

log = logging.getLogger(__name__)

RECORD = "verified.json"
VERSION = 1
MAX_BUNDLES = 64  # oldest records beyond this are dropped


def record_path() -> Path:
    """``user_cache_dir() / "verified.json"``."""
    return user_cache_dir() / RECORD


def _read_record() -> dict:
    try:
        data = json.loads(record_path().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("bundles"), dict):
        return {}
    return data["bundles"]


def _write_record(bundles: dict) -> None:
    keep = sorted(bundles.items(), key=lambda kv: kv[1].get("checked", 0))[-MAX_BUNDLES:]
    text = json.dumps({"version": VERSION, "bundles": dict(keep)}, indent=1, sort_keys=True)
    path = record_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as e:  # a read-only home: verification still happened, it is just not remembered
        log.warning("cannot record verified bundle in %s (%s); it will be hashed again next time", path, e)


def _stat(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def verify_auto(bundle_dir: str | os.PathLike, manifest, manifest_bytes: bytes, full: bool = False) -> int:
    """Verify a bundle's files, hashing only those not recorded as verified with their current
    size and mtime (all of them when ``full``), then record them.

    Args:
        bundle_dir: the bundle directory.
        manifest: its parsed :class:`~tqedge.bundle.Manifest` (sizes and SHA-256 per file).
        manifest_bytes: the raw ``manifest.json`` (its hash keys the record).
        full: hash every file regardless of the record.

    Returns:
        How many files were hashed.

    Raises:
        TqedgeError: a file is missing, of the wrong size, or fails its SHA-256 check.
    """
    bundle_dir = Path(bundle_dir)
    verify_files(bundle_dir, manifest, full=False)  # presence and sizes, always
    key = str(bundle_dir.resolve())
    msha = hashlib.sha256(manifest_bytes).hexdigest()
    bundles = _read_record()
    entry = bundles.get(key)
    known = entry.get("files", {}) if isinstance(entry, dict) and entry.get("manifest_sha256") == msha else {}
    stats = {rel: _stat(bundle_dir / rel) for rel in manifest.files}
    todo = [rel for rel in manifest.files if full or known.get(rel) != stats[rel]]
    for rel in todo:
        if files.sha256_file(bundle_dir / rel) != manifest.files[rel].sha256:
            raise TqedgeError(f"bundle file {rel} fails its SHA-256 check (corrupt or modified): "
                              f"re-copy or re-export {bundle_dir}")
    if todo:
        log.info("verified %d file(s) of %s by SHA-256", len(todo), bundle_dir)
        after = {rel: _stat(bundle_dir / rel) for rel in todo}
        ok = {rel: stats[rel] for rel in manifest.files if rel not in todo or after[rel] == stats[rel]}
        bundles = _read_record()  # re-read: another process may have recorded meanwhile
        bundles[key] = {"manifest_sha256": msha, "files": ok, "checked": time.time()}
        _write_record(bundles)
    return len(todo)
