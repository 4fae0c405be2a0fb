import pytest
from hypothesis import given, strategies as st

from tqedge.errors import TqedgeError
from tqedge.units import format_bytes, parse_bytes


@pytest.mark.parametrize("text,expected", [
    ("32MiB", 32 * 2**20), ("32 MiB", 32 * 2**20), ("64MB", 64_000_000), ("1GiB", 2**30),
    ("1.5GiB", 3 * 2**29), ("512k", 512 * 1024), ("512KB", 512_000), ("4096", 4096),
    (4096, 4096), ("2g", 2 * 2**30), ("7B", 7),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "MiB", "12 parsecs", "-5MiB", -1, "1..2MB", True])
def test_parse_bytes_rejects(bad):
    with pytest.raises(TqedgeError) as e:
        parse_bytes(bad)
    assert "\n" not in str(e.value)


@given(st.integers(min_value=0, max_value=2**40))
def test_format_parse_roundtrip_within_rounding(n):
    text = format_bytes(n)
    back = parse_bytes(text.replace(" ", ""))
    assert abs(back - n) <= max(1, n * 0.05)  # one decimal of the unit
