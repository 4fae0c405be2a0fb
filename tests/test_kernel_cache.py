"""Every Numba kernel of tqedge caches its machine code in the user's cache directory, never next
to its source (in site-packages, stale cache files outlive ``pip uninstall`` and turn ``tqedge/``
into a namespace package: issue 12). Numba binds a kernel's cache location when it is decorated,
so each kernel is checked where it was defined."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

numba = pytest.importorskip("numba")

from numba.core.ccallback import CFunc  # noqa: E402
from numba.core.dispatcher import Dispatcher  # noqa: E402

MODULES = ("tqedge.codec.kernels_numba", "tqedge.codec.kernels_blocks", "tqedge.codec.kernels_fused", "tqedge.runtime.fp16_kernels",
           "tqedge.runtime.ort_numba", "tqedge.runtime.native_turboquant", "tqedge.runtime.native_prefill", "tqedge.runtime.native_op",
           "tqedge.runtime.coop_pool", "tqedge.runtime.native_sliding", "tqedge.runtime.backends.onnx_native")


def _kernels():
    for name in MODULES:
        for attr, obj in vars(importlib.import_module(name)).items():
            if isinstance(obj, (Dispatcher, CFunc)) and obj.__module__ == name:
                yield f"{name}.{attr}", obj


def test_every_kernel_caches_in_the_user_cache_dir():
    from tqedge.codec.numba_runtime import cache_dir

    want = Path(cache_dir()).resolve()
    seen = {}
    for name, k in _kernels():
        assert k._cache is not None and k._cache._cache_path, f"{name} is not cached"
        seen[name] = Path(k._cache._cache_path).resolve()
    assert len(seen) > 20  # the oracle: the modules' kernels were found
    wrong = {n: str(p) for n, p in seen.items() if want not in (p, *p.parents)}
    assert not wrong, f"cached outside {want}: {wrong}"
