"""Where tqedge keeps per-user state on a device: one home for the cache directory.

``user_cache_dir()`` is ``$TQEDGE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/tqedge``, else
``~/.cache/tqedge`` (``%LOCALAPPDATA%\\tqedge`` on Windows). Never inside site-packages: a
reinstall must not find stale files there. Sub-directories: ``numba/`` (compiled kernels),
``verified.json`` (bundles whose checksums were checked on this device).
"""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """The per-user cache directory (not created)."""
    env = os.environ.get("TQEDGE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "tqedge"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tqedge"


def numba_cache_dir() -> Path:
    """Where tqedge's compiled kernels are cached: ``$NUMBA_CACHE_DIR`` if the user set it, else
    ``user_cache_dir() / "numba"`` (see :mod:`tqedge.codec.numba_runtime`)."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    return Path(env).expanduser() if env else user_cache_dir() / "numba"
