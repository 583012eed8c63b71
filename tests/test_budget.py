from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtfq_deploy.budget import METRIC_KEYS, Budget, Limit, choose, format_value, parse_budget, parse_limit, pareto_front
from rtfq_deploy.errors import RtfqError

UNITS = {
    "latency": {"us": 1e-3, "ms": 1.0, "s": 1e3},
    "latency-p90": {"us": 1e-3, "ms": 1.0, "s": 1e3},
    "memory": {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024, "MiB": 2**20, "GiB": 2**30},
    "size": {"B": 1, "kb": 1e3, "mb": 1e6, "Gb": 1e9, "kib": 1024, "MIB": 2**20, "gib": 2**30},
    "macs": {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12},
    "bitops": {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12},
}
numbers = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(kind=st.sampled_from(sorted(UNITS)), value=numbers, data=st.data())
def test_value_and_unit_parse_to_the_scaled_value(kind, value, data):
    unit = data.draw(st.sampled_from(sorted(UNITS[kind])))
    text = f"{value!r}{unit}"
    limit = parse_limit(f"{kind}={text}")
    assert limit.kind == kind
    assert limit.value == pytest.approx(value * UNITS[kind][unit], rel=1e-12)


@given(kind=st.sampled_from(sorted(UNITS)), value=st.floats(min_value=1e-6, max_value=1e15))
def test_canonical_text_round_trips(kind, value):
    limit = Limit(kind, value)
    again = parse_limit(str(limit))
    assert again.kind == kind and again.value == pytest.approx(value, rel=1e-11)
    assert str(again) == str(limit)  # canonical form is a fixed point


@given(limits=st.lists(st.tuples(st.sampled_from(sorted(UNITS)), numbers), min_size=1, max_size=6,
                       unique_by=lambda t: t[0]))
def test_several_limits_round_trip_through_the_budget_text(limits):
    budget = Budget(tuple(Limit(k, v) for k, v in limits), "")
    again = parse_budget(str(budget))
    assert [lim.kind for lim in again.limits] == [k for k, _ in limits]
    assert [lim.value for lim in again.limits] == pytest.approx([v for _, v in limits], rel=1e-11)


@settings(max_examples=300)
@given(st.text(max_size=30))
def test_any_text_parses_or_fails_with_rtfq_error(text):
    try:
        budget = parse_budget(text)
    except RtfqError as e:
        assert str(e)
        return
    assert budget.limits and all(math.isfinite(lim.value) and lim.value > 0 for lim in budget.limits)


@given(st.from_regex(r"[a-z0-9=.,eE+-]{0,20}(ms|MB|G|us|s|KiB)?", fullmatch=True))
def test_budget_like_text_parses_or_fails_with_rtfq_error(text):
    try:
        parse_budget(text)
    except RtfqError:
        pass


def test_unit_implies_kind_and_errors_say_what_to_write():
    assert parse_budget("20ms").limits == (Limit("latency", 20.0),)
    assert parse_budget("0.8G").limits == (Limit("macs", 0.8e9),)
    assert parse_budget("p90=5ms").limits == (Limit("latency-p90", 5.0),)
    assert parse_budget(" latency=20ms , memory=64MiB ").limits == (Limit("latency", 20.0), Limit("memory", 2**26))
    for text, needle in [("64MB", "write memory=64MB or size=64MB"), ("", "empty budget"), ("fast", "malformed"),
                         ("speed=3ms", "unknown budget kind 'speed'"), ("latency=3MB", "unit 'MB' is not one of"),
                         ("0ms", "positive"), ("-3ms", "malformed"), ("1e400ms", "finite"),
                         ("1e999999999ms", "finite"), ("memory=1e307GB", "out of range"),
                         ("20ms,latency=30ms", "the same quantity twice"), ("3parsecs", "unknown unit")]:
        with pytest.raises(RtfqError, match=needle):
            parse_budget(text)


def _e(name, acc, **costs):
    return {"subnet": name, "accuracy": acc, **costs}


def test_choose_most_accurate_within_budget_ties_and_unmeetable():
    entries = [_e("a", 0.70, latency_p50_ms=5.0, size_bytes=100), _e("b", 0.80, latency_p50_ms=9.0, size_bytes=300),
               _e("c", 0.80, latency_p50_ms=8.0, size_bytes=400), _e("d", 0.90, latency_p50_ms=20.0, size_bytes=50)]
    assert choose(entries, parse_budget("10ms")).entry["subnet"] == "c"  # tie on accuracy: the faster
    assert choose(entries, parse_budget("latency=10ms,size=350B")).entry["subnet"] == "b"
    assert choose(entries, parse_budget("30ms")).entry["subnet"] == "d"
    unmet = choose(entries, parse_budget("1ms"))
    assert not unmet.met and unmet.entry["subnet"] == "a" and "cheapest option is a" in unmet.reason
    assert choose(entries, parse_budget("latency=1ms,size=1GB")).entry["subnet"] == "a"  # cheapest on the first
    no_metric = choose(entries, parse_budget("memory=1GB"))  # nobody measured memory: nothing meets it
    assert not no_metric.met
    with pytest.raises(RtfqError, match="nothing to choose from"):
        choose([], parse_budget("1ms"))


def test_pareto_front_keeps_only_undominated():
    entries = [_e("a", 0.7, size_bytes=1), _e("b", 0.6, size_bytes=2), _e("c", 0.9, size_bytes=3),
               _e("d", 0.9, size_bytes=4), _e("e", None, size_bytes=0)]
    assert [e["subnet"] for e in pareto_front(entries, "size_bytes")] == ["a", "c"]


def test_every_kind_limits_a_manifest_key():
    assert set(METRIC_KEYS.values()) == {"latency_p50_ms", "latency_p90_ms", "peak_memory_bytes", "size_bytes", "macs",
                                         "bitops"}
    assert format_value("memory", 64e6) == "64MB" and format_value("macs", 8e8) == "0.8G"


def test_a_previous_choice_is_kept_only_while_the_measurement_is_in_doubt():
    def e(name, acc, p50, low, high, size=1e6):
        return {"subnet": name, "accuracy": acc, "latency_p50_ms": p50, "latency_p50_ci_ms": [low, high],
                "size_bytes": size}

    budget = parse_budget("latency=10ms")
    rows = [e("big", 0.7, 9.9, 9.5, 10.4), e("mid", 0.6, 8.0, 7.8, 8.2)]
    assert choose(rows, budget).entry["subnet"] == "big"
    kept = choose(rows, budget, previous="mid")
    assert kept.kept and kept.met and kept.entry["subnet"] == "mid" and "kept mid" in kept.reason
    assert choose(rows, budget, previous="gone").entry["subnet"] == "big"  # no longer measured: chosen afresh
    assert not choose(rows, budget, previous="big").kept  # the same choice is simply chosen
    clear = [e("big", 0.7, 9.0, 8.8, 9.2), e("mid", 0.6, 8.0, 7.8, 8.2)]
    assert choose(clear, budget, previous="mid").entry["subnet"] == "big"
    over = [e("big", 0.7, 11.0, 10.8, 11.3), e("mid", 0.6, 8.0, 7.8, 8.2)]
    assert choose(over, budget, previous="big").entry["subnet"] == "mid"
    # a limit other than latency is not measured noise: a previous choice over it is replaced
    sized = parse_budget("latency=10ms,size=0.5MB")
    small = [e("big", 0.7, 9.9, 9.5, 10.4, size=0.4e6), e("mid", 0.6, 9.95, 9.6, 10.3, size=0.6e6)]
    assert choose(small, sized, previous="mid").entry["subnet"] == "big"
    # rows without an interval (rtfq-bench run without --interleave) are never in doubt
    plain = [{k: v for k, v in r.items() if k != "latency_p50_ci_ms"} for r in rows]
    assert choose(plain, budget, previous="mid").entry["subnet"] == "big"


def test_a_host_that_got_slower_keeps_its_choice_within_the_drift():
    from rtfq_deploy.bench.confidence import MAX_DRIFT, drift

    budget = parse_budget("latency=10ms")
    # every model 8% slower than last time, each interval narrow: just over the budget now
    rows = [{"subnet": "big", "accuracy": 0.7, "latency_p50_ms": 10.3, "latency_p50_ci_ms": [10.25, 10.35]},
            {"subnet": "mid", "accuracy": 0.6, "latency_p50_ms": 8.64, "latency_p50_ci_ms": [8.6, 8.7]}]
    moved = drift({"big": 9.5, "mid": 8.0}, {"big": 10.3, "mid": 8.64})
    assert moved == pytest.approx(0.0821, abs=1e-3)  # the median of 1.084 and 1.080
    assert choose(rows, budget, previous="big").entry["subnet"] == "mid"  # on the intervals alone: replaced
    kept = choose(rows, budget, previous="big", drift=moved)
    assert kept.kept and kept.entry["subnet"] == "big" and "8.2%" in kept.reason
    far = [dict(rows[0], latency_p50_ms=12.0, latency_p50_ci_ms=[11.9, 12.1]), rows[1]]
    assert choose(far, budget, previous="big", drift=moved).entry["subnet"] == "mid"  # beyond the drift
    assert drift({"a": 1.0}, {"a": 3.0}) == MAX_DRIFT and drift({"a": 1.0}, {"b": 2.0}) == 0.0
    assert drift({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1.02, "b": 0.99, "c": 1.5}) == pytest.approx(0.02)
