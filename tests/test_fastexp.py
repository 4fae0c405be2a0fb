"""The softmax exponential (``tqedge.codec.fastexp.exp_sub``) against float64 ``np.exp``:
relative error, exact zeros below the float32 normal range and for -inf, the returned sum,
slices, and that it does what the old scalar loop did inside the op's decode."""

from __future__ import annotations

import numpy as np
import pytest

from tqedge.codec.fastexp import EXP_MIN, exp_sub


def test_matches_float64_exp_to_float32_accuracy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-100, 0, 200_000), [0.0, -1e-8, -86.99, -87.0, -87.01, -np.inf]])
    x = x.astype(np.float32)
    y = x.copy()
    total = exp_sub(y, np.float32(0.0), np.empty(len(x), np.int32))
    ref = np.exp(x.astype(np.float64))
    normal = x >= EXP_MIN
    rel = np.abs(y[normal] - ref[normal]) / ref[normal]
    assert rel.max() < 4e-7  # NumPy's own float32 exp: 1.8e-7 on these inputs
    assert np.all(y[~normal] == 0.0)  # below float32's normal range, -inf included: exactly 0
    assert y[x == 0.0][0] == 1.0
    assert total == pytest.approx(ref[normal].sum(), rel=1e-6)


def test_shift_and_slices_leave_the_rest_untouched():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(1000) * 10).astype(np.float32)
    m = x[100:600].max()
    y = x.copy()
    total = exp_sub(y[100:600], m, np.empty(700, np.int32))  # scratch larger than needed
    assert np.array_equal(y[:100], x[:100]) and np.array_equal(y[600:], x[600:])
    want = np.exp((x[100:600] - m).astype(np.float64))  # the float32 difference, as the kernel takes it
    np.testing.assert_allclose(y[100:600], want, rtol=4e-7, atol=0)
    assert total == pytest.approx(want.sum(), rel=1e-6)
    assert y[100:600].max() == 1.0  # the maximum maps to exactly 1


def test_empty_row():
    y = np.zeros(0, np.float32)
    assert exp_sub(y, np.float32(0.0), np.empty(0, np.int32)) == 0.0
