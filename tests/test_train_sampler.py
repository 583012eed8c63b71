from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from rtfq_deploy.space import SearchSpace, SubnetConfig
from rtfq_deploy.train.sampler import make_rule

SPACE = SearchSpace()  # the paper's 48 subnets


@given(seed=st.integers(0, 2**31), step=st.integers(0, 10**6), n=st.integers(0, 5))
def test_sandwichq_always_trains_maxnet_first_and_minnet_last(seed, step, n):
    nets = make_rule("sandwichq", SPACE, n)(seed, step)
    assert nets[0] == SubnetConfig(224, 1.0, 8) and nets[-1] == SubnetConfig(128, 0.6, 4)
    assert len(nets) == n + 2 and all(c in SPACE for c in nets)


def test_sandwichq_random_subnets_use_every_bit_width_and_are_deterministic():
    rule = make_rule("sandwichq", SPACE, 2)
    middle = [c for step in range(200) for c in rule(0, step)[1:-1]]
    assert {c.bits for c in middle} == {8, 6, 4}
    assert {c.resolution for c in middle} == set(SPACE.resolutions)
    assert rule(3, 17) == rule(3, 17)
    assert any(rule(3, s) != rule(3, 17) for s in range(18, 30))


def test_standard_sandwich_applies_the_rule_per_bit_width():
    nets = make_rule("sandwich", SPACE, 2)(0, 5)
    assert len(nets) == 3 * 4 and nets[0] == SPACE.maxnet
    for q in (8, 6, 4):
        group = [c for c in nets if c.bits == q]
        assert group[0] == SubnetConfig(224, 1.0, q) and group[-1] == SubnetConfig(128, 0.6, q) and len(group) == 4


def test_max6min_and_single():
    nets = make_rule("max6min", SPACE)(0, 1)
    assert len(nets) == 8 and nets[0] == SPACE.maxnet and nets[-1] == SPACE.minnet
    single = make_rule("single", SPACE, 2, single_bits=6)
    for step in range(20):
        nets = single(0, step)
        assert {c.bits for c in nets} == {6}
        assert nets[0] == SubnetConfig(224, 1.0, 6) and nets[-1] == SubnetConfig(128, 0.6, 6)
    with pytest.raises(ValueError, match="bit-width of the space"):
        make_rule("single", SPACE, 2, single_bits=5)
