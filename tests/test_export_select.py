from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtfq_deploy.costs import Costs
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.budget import parse_count as parse_budget
from rtfq_deploy.export.select import bucket_budgets, choose, read_accuracy
from rtfq_deploy.space import SubnetConfig


def _costs(table: dict[str, int]) -> dict[SubnetConfig, Costs]:
    return {SubnetConfig.parse(k): Costs(macs=v, bitops=v * 16, params=1, weight_bytes=1) for k, v in table.items()}


COSTS = _costs({"r128-w0.60-q4": 100, "r128-w0.60-q8": 100, "r160-w0.73-q4": 200, "r160-w0.73-q8": 200,
                "r224-w1.00-q4": 400, "r224-w1.00-q8": 400})


@pytest.mark.parametrize("text,value", [("0.8G", 8e8), ("800M", 8e8), ("150k", 1.5e5), ("2e9", 2e9), ("1.5T", 1.5e12),
                                        (" 12 ", 12.0), (".5G", 5e8), ("3 G", 3e9)])
def test_parse_budget(text, value):
    assert parse_budget(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "G", "0.8X", "-1G", "0", "1..2G", "abc", "0.8GG", "1e400G", "1e999999999",
                                  "9" * 5000, "1e19", "nan", "inf", "0.8G,1G"])
def test_malformed_budgets(text):
    with pytest.raises(RtfqError):
        parse_budget(text)


@given(st.floats(min_value=0.001, max_value=999.0), st.sampled_from(["", "K", "M", "G", "T"]))
def test_budget_round_trip(number, suffix):
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[suffix]
    assert parse_budget(f"{number!r}{suffix}") == pytest.approx(number * scale, rel=1e-12)


def test_without_accuracy_the_costliest_within_budget():
    chosen, why = choose(COSTS, 250, "macs", bits=4)
    assert chosen == SubnetConfig(160, 0.73, 4) and "no accuracy table" in why
    assert choose(COSTS, 400, "macs")[0] == SubnetConfig(224, 1.0, 8)


def test_with_accuracy_the_most_accurate_and_ties_go_to_the_cheaper():
    acc = {"r128-w0.60-q4": 0.70, "r160-w0.73-q4": 0.80, "r224-w1.00-q4": 0.80, "r224-w1.00-q8": 0.95}
    assert choose(COSTS, 400, "macs", bits=4, accuracy=acc)[0] == SubnetConfig(160, 0.73, 4)
    assert choose(COSTS, 400, "macs", accuracy=acc)[0] == SubnetConfig(224, 1.0, 8)
    assert choose(COSTS, 150, "macs", accuracy=acc)[0] == SubnetConfig(128, 0.6, 4)
    with pytest.raises(RtfqError, match="no subnet within the budget"):
        choose(COSTS, 150, "macs", bits=8, accuracy=acc)


def test_unmeetable_budget_and_unknown_bits():
    with pytest.raises(RtfqError, match=r"below the cheapest subnet \(r128-w0.60-q4"):
        choose(COSTS, 50, "macs")
    with pytest.raises(RtfqError, match=r"bit-width 6 is not in the space \(valid: 8, 4\)"):
        choose(COSTS, 500, "macs", bits=6)
    assert choose(COSTS, 100 * 16, "bitops")[0] == SubnetConfig(128, 0.6, 8)


def test_bucket_edges_span_the_cost_range():
    assert bucket_budgets(COSTS, 3) == pytest.approx([200, 300, 400])
    assert bucket_budgets(COSTS, 1, bits=4) == [400]


def test_accuracy_table_shapes(tmp_path):
    rows = [{"subnet": "r128-w0.60-q4", "top1": 0.5}]
    for name, data in (("a.json", {"subnets": rows}), ("b.json", rows), ("c.json", {"r128-w0.60-q4": 0.5}),
                       ("d.json", {"r128-w0.60-q4": {"top1": 0.5}})):
        (tmp_path / name).write_text(json.dumps(data))
        assert read_accuracy(tmp_path / name) == {"r128-w0.60-q4": 0.5}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(RtfqError, match="not JSON"):
        read_accuracy(tmp_path / "bad.json")
    (tmp_path / "wrong.json").write_text(json.dumps([{"name": 1}]))
    with pytest.raises(RtfqError, match="not an accuracy table"):
        read_accuracy(tmp_path / "wrong.json")
