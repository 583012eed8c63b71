from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtfq_deploy.serve import conditional as cond

ETAG = cond.etag_for("ab" * 32)


@pytest.mark.parametrize("header,size,expected", [
    ("bytes=0-99", 1000, (0, 99)),
    ("bytes=100-", 1000, (100, 999)),
    ("bytes=-10", 1000, (990, 999)),
    ("bytes=-5000", 1000, (0, 999)),  # a suffix longer than the file is the whole file
    ("bytes=990-5000", 1000, (990, 999)),  # the end is clipped
    ("bytes = 5 - 9", 1000, (5, 9)),
    ("bytes=999-999", 1000, (999, 999)),
    ("bytes=0-" + "9" * 30, 1000, (0, 999)),  # RFC 9110: a last position past the end is clipped (206)
    ("bytes=0-18446744073709551616", 1000, (0, 999)),
    ("bytes=-" + "9" * 40, 1000, (0, 999)),
    ("bytes=" + "0" * 30 + "5-" + "0" * 30 + "9", 1000, (5, 9)),
    ("BYTES=0-9", 1000, (0, 9)),
])
def test_single_ranges(header, size, expected):
    assert cond.byte_range(header, size) == expected


@pytest.mark.parametrize("header", [
    None, "bytes=0-1,5-9", "bytes=9-5", "bytes=-", "items=0-5", "bytes=a-b", "bytes=0-1;x",
    "bytes=" + "9" * 30 + "-" + "1" * 25,  # last before first: invalid, ignored
    "bytes=0-" + "9" * 2000,  # a header over 1024 characters is not parsed
])
def test_ranges_that_are_ignored_send_the_whole_file(header):
    assert cond.byte_range(header, 1000) is None


@pytest.mark.parametrize("header,size", [("bytes=1000-", 1000), ("bytes=5000-6000", 1000), ("bytes=-0", 1000),
                                         ("bytes=0-", 0), ("bytes=-5", 0),
                                         ("bytes=" + "9" * 30 + "-", 1000),  # RFC 9110: 416, not the whole file
                                         ("bytes=" + "9" * 500 + "-" + "9" * 501, 1000),
                                         ("bytes=18446744073709551616-", 1000), ("bytes=-" + "0" * 40, 1000)])
def test_unsatisfiable_ranges(header, size):
    with pytest.raises(cond.Unsatisfiable):
        cond.byte_range(header, size)


@given(size=st.integers(1, 10**12), first=st.integers(0, 10**12), last=st.integers(0, 10**12))
def test_a_served_range_always_lies_inside_the_file(size, first, last):
    try:
        span = cond.byte_range(f"bytes={first}-{last}", size)
    except cond.Unsatisfiable:
        assert first >= size
        return
    if span is not None:
        a, b = span
        assert 0 <= a <= b < size and a == first


@pytest.mark.parametrize("header,matches", [
    (ETAG, True), (f"W/{ETAG}", True), (f'"x", {ETAG}', True), ("*", True),
    ('"' + "cd" * 32 + '"', False), (ETAG.strip('"'), False), ("", False), (None, False),
])
def test_if_none_match(header, matches):
    assert cond.none_match(header, ETAG) is matches


def test_if_range_needs_the_exact_strong_etag():
    assert cond.range_applies(None, ETAG) and cond.range_applies(ETAG, ETAG)
    assert not cond.range_applies(f"W/{ETAG}", ETAG)
    assert not cond.range_applies("Wed, 21 Oct 2015 07:28:00 GMT", ETAG)
    assert not cond.range_applies('"' + "cd" * 32 + '"', ETAG)
