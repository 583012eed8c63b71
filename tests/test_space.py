from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtfq_deploy.space import MAX_RESOLUTION, SearchSpace, SpaceError, SubnetConfig, format_width, slim_channels


def test_default_space_is_the_papers_48_subnets():
    space = SearchSpace()
    configs = list(space)
    assert len(configs) == len(space) == 48 == len(set(configs))
    assert space.maxnet == SubnetConfig(224, 1.0, 8)
    assert space.minnet == SubnetConfig(128, 0.6, 4)
    assert all(c in space for c in configs)


def test_canonical_string():
    assert str(SubnetConfig(160, 0.73, 4)) == "r160-w0.73-q4"
    assert str(SubnetConfig(224, 1.0, 8)) == "r224-w1.00-q8"
    assert str(SubnetConfig(96, 0.875, 6)) == "r96-w0.875-q6"
    assert SubnetConfig.parse("r160-w0.73-q4") == SubnetConfig(160, 0.73, 4)
    assert hash(SubnetConfig.parse("r160-w0.73-q4")) == hash(SubnetConfig(160, 0.73, 4))


@given(
    st.integers(min_value=1, max_value=MAX_RESOLUTION),
    st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, exclude_min=True),
    st.integers(min_value=2, max_value=8),
)
def test_string_round_trip_is_exact(resolution, width, bits):
    config = SubnetConfig(resolution, width, bits)
    text = str(config)
    parsed = SubnetConfig.parse(text)
    assert parsed == config and parsed.width == width
    assert str(parsed) == text


@given(st.text(max_size=30))
def test_arbitrary_text_parses_or_raises_space_error(text):
    try:
        config = SubnetConfig.parse(text)
    except SpaceError:
        return
    assert SubnetConfig.parse(str(config)) == config


@pytest.mark.parametrize("text", ["", "r160", "r160-w0.73", "160-0.73-4", "r160-w0.73-q4x", "r-1-w0.5-q4",
                                  "r160-w1.5-q4", "r160-w0.73-q1", "r160-w0.73-q16", "r0-w0.5-q4"])
def test_malformed_strings_raise(text):
    with pytest.raises(SpaceError):
        SubnetConfig.parse(text)


def test_values_outside_space_name_the_valid_values():
    space = SearchSpace()
    with pytest.raises(SpaceError) as e:
        space.parse("r150-w0.70-q5")
    msg = str(e.value)
    assert "resolution 150 (valid: 224, 192, 160, 128)" in msg
    assert "width 0.70 (valid: 1.00, 0.86, 0.73, 0.60)" in msg
    assert "bit-width 5 (valid: 8, 6, 4)" in msg
    assert space.parse("r192-w0.86-q6") == SubnetConfig(192, 0.86, 6)
    with pytest.raises(SpaceError, match=r"expected r<resolution>.*this space: R=224, 192, 160, 128; W=1.00"):
        space.parse("160-0.73")


def test_space_serialises_and_is_canonically_ordered():
    space = SearchSpace(resolutions=(64, 96), widths=(0.5, 1.0), bits=(4, 8), channel_divisor=4)
    assert space.resolutions == (96, 64) and space.widths == (1.0, 0.5) and space.bits == (8, 4)
    assert SearchSpace.from_dict(space.to_dict()) == space
    with pytest.raises(SpaceError):
        SearchSpace(resolutions=(), widths=(1.0,), bits=(8,))


@pytest.mark.parametrize("full,width,expected", [
    (64, 1.0, 64), (64, 0.86, 56), (64, 0.73, 48), (64, 0.6, 40),  # 55.04, 46.72, 38.4
    (256, 0.73, 184),  # 186.88 -> nearest multiple of 8
    (100, 0.6, 64),  # exactly 60 = 7.5 x 8: ties round up, no float error
    (16, 0.3, 8),  # never below the divisor
    (2048, 0.6, 1232),
])
def test_slim_channels_rule(full, width, expected):
    assert slim_channels(full, width, 8) == expected


@given(st.integers(min_value=8, max_value=4096).map(lambda c: c - c % 8),
       st.floats(min_value=0.05, max_value=1.0))
def test_slim_channels_is_a_multiple_of_the_divisor_within_half_a_step(full, width):
    c = slim_channels(full, width, 8)
    assert c % 8 == 0 and 8 <= c <= full
    assert c == 8 or abs(c - full * width) <= 4 + 1e-9


def test_format_width():
    assert format_width(1.0) == "1.00" and format_width(0.6) == "0.60" and format_width(0.875) == "0.875"
