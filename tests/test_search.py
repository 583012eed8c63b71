"""Bidirectional greedy search, rtfq search and rtfq-export --mixed."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from rtfq_deploy.budget import parse_budget
from rtfq_deploy.checkpoint import save_checkpoint
from rtfq_deploy.cli.export import export
from rtfq_deploy.cli.main import rtfq
from rtfq_deploy.costs import subnet_costs, walk
from rtfq_deploy.data.synth import SynthConfig, generate
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.planfile import free_quantizers
from rtfq_deploy.search import PlanScorer, SearchOptions, choose_shape, greedy_search, over, start_plan
from rtfq_deploy.space import MixedBits, SearchSpace, SubnetConfig

SPACE = SearchSpace(resolutions=(32, 24), widths=(1.0, 0.5), bits=(6, 4, 2))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE))


def _bitops(model, r, w, q) -> int:
    return subnet_costs(model, SubnetConfig(r, w, q)).bitops


def test_greedy_search_spends_bits_where_the_loss_needs_them(model):
    """A known loss: each free quantizer costs (6 - bits) x its sensitivity. The search
    must meet the budget and keep the most sensitive quantizers at the most bits."""
    free = free_quantizers(model)
    sensitivity = {n: (10.0 if i % 3 == 0 else 0.1) for i, n in enumerate(free)}
    calls = []

    def scorer(cfg: SubnetConfig) -> float:
        calls.append(cfg)
        bits = model.plan(cfg).as_dict()
        return sum(sensitivity[n] * (6 - bits[n]) for n in free)

    budget = parse_budget(f"bitops={(_bitops(model, 32, 1.0, 4) + _bitops(model, 32, 1.0, 2)) / 2}")
    result = greedy_search(model, 32, 1.0, budget, scorer)
    assert not result.subnet.uniform and over(result.costs, budget) <= 1.0
    assert result.costs.bitops > _bitops(model, 32, 1.0, 2)
    assert result.evaluations == len(calls) and len(result.steps) >= 1
    bits = model.plan(result.subnet).as_dict()
    sensitive = [bits[n] for n in free if sensitivity[n] > 1]
    insensitive = [bits[n] for n in free if sensitivity[n] < 1]
    assert min(sensitive) >= 4 and sum(sensitive) / len(sensitive) > sum(insensitive) / len(insensitive)
    # the search starts at uniform 4 bits, so its first step scores both moves of every free quantizer
    assert result.steps[0].candidates == 2 * len(free)


def test_lazy_greedy_finds_the_exact_plan_of_a_separable_loss_with_fewer_scores(model):
    """When every move's loss change does not depend on the other quantizers (a separable
    loss), the lazily estimated changes are exact, so the lazy search picks what the exact
    search picks while scoring a fraction of the plans."""
    free = free_quantizers(model)
    weight = {n: 1.0 + (i * 7919 % 13) for i, n in enumerate(free)}

    def scorer(cfg: SubnetConfig) -> float:
        bits = model.plan(cfg).as_dict()
        return sum(weight[n] * 2.0 ** -bits[n] for n in free)

    budget = parse_budget(f"bitops={(_bitops(model, 32, 1.0, 4) + _bitops(model, 32, 1.0, 2)) / 2}")
    exact = greedy_search(model, 32, 1.0, budget, scorer)
    lazy = greedy_search(model, 32, 1.0, budget, scorer, SearchOptions(rescore=3))
    assert lazy.subnet == exact.subnet and len(lazy.steps) == len(exact.steps) > 2
    assert lazy.evaluations < exact.evaluations / 2
    assert all(step.candidates <= 3 + 2 for step in lazy.steps[1:])  # M, plus the moved quantizer's two


def test_the_start_plan_and_shape_follow_the_budget(model):
    shape = walk(model, 32, 1.0)
    q6, q4, q2 = (_bitops(model, 32, 1.0, q) for q in (6, 4, 2))
    assert start_plan(model, shape, 32, 1.0, parse_budget(f"bitops={q6}")) == SubnetConfig(32, 1.0, 6)  # fits
    assert start_plan(model, shape, 32, 1.0, parse_budget(f"bitops={q4 - 1}")) == SubnetConfig(32, 1.0, 4)
    assert choose_shape(model, parse_budget(f"bitops={q2}"), None, None) == (32, 1.0)
    small = _bitops(model, 24, 0.5, 2)
    assert choose_shape(model, parse_budget(f"bitops={small}"), None, None) == (24, 0.5)
    macs = subnet_costs(model, SubnetConfig(24, 1.0, 6)).macs
    assert choose_shape(model, parse_budget(f"macs={macs},bitops=1T"), None, None) == (24, 1.0)
    with pytest.raises(RtfqError, match="unreachable"):
        choose_shape(model, parse_budget(f"bitops={small - 1}"), None, None)
    result = greedy_search(model, 32, 1.0, parse_budget(f"bitops={q6}"), lambda cfg: 0.0)
    assert result.subnet == SubnetConfig(32, 1.0, 6) and result.steps == []


def test_scorers_rank_by_labels_or_by_distance_from_the_maxnet(model):
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 3, (16,))
    model.eval()
    labeled = PlanScorer(model, x, y)
    assert labeled(SubnetConfig(32, 1.0, 6)) > 0
    model.train()
    with torch.no_grad():
        reference = torch.softmax(model(x, model.active(SPACE.maxnet)), 1)
    model.eval()
    free = PlanScorer(model, x, reference_probs=reference)
    assert free(SPACE.maxnet) == pytest.approx(0.0, abs=1e-6)  # the reference itself
    assert free(SubnetConfig(32, 1.0, 2)) > free(SubnetConfig(32, 1.0, 4)) > 0
    with pytest.raises(ValueError):
        PlanScorer(model, x, y, reference)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search")
    generate(root / "data", SynthConfig(classes=3, per_class=6, test_per_class=4, size=32, seed=0))
    torch.manual_seed(0)
    save_checkpoint(root / "c.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE)),
                    meta={"class_names": ["circle", "square", "triangle"]})
    return root


def test_rtfq_search_writes_a_plan_within_budget(setup, model, tmp_path):
    q4, q2 = _bitops(model, 32, 1.0, 4), _bitops(model, 32, 1.0, 2)
    budget = f"bitops={(q4 + q2) // 2}"
    out = tmp_path / "p.json"
    result = CliRunner().invoke(rtfq, ["search", "--checkpoint", str(setup / "c.pt"), "--budget", budget, "--data",
                                       str(setup / "data" / "target"), "--search-images", "12", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "[100%] step" in result.output and "KL divergence from r32-w1.00-q6" in result.output
    doc = json.loads(out.read_text())
    assert doc["costs"]["bitops"] <= (q4 + q2) // 2 and doc["subnet"].startswith("r32-w1.00-m")
    assert doc["search"]["plans_scored"] > 0 and doc["search"]["budget"].startswith("bitops=")
    labeled = CliRunner().invoke(rtfq, ["search", "--checkpoint", str(setup / "c.pt"), "--budget", budget, "--data",
                                        str(setup / "data" / "target_test"), "--labeled", "--search-images", "12",
                                        "-o", str(tmp_path / "l.json"), "--json"])
    assert labeled.exit_code == 0, labeled.output
    assert "cross-entropy on labeled images" in labeled.output


def test_export_mixed_searches_calibrates_and_exports(setup, model, tmp_path):
    q4, q2 = _bitops(model, 24, 1.0, 4), _bitops(model, 24, 1.0, 2)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(export, ["--checkpoint", str(setup / "c.pt"), "--budget", f"bitops={(q4 + q2) // 2}",
                                         "--mixed", "--resolution", "24", "--data", str(setup / "data" / "target"),
                                         "--search-images", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "chose r24-w1.00-m" in result.output and "integer kernels only" in result.output
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert int(meta["rtfq.bitops"]) <= (q4 + q2) // 2 and meta["rtfq.bn_statistics"] == "calibrated"
    assert len(set(json.loads(meta["rtfq.bits"]).values())) >= 2


@pytest.mark.parametrize("args,needle", [
    (["--budget", "latency=20ms"], "a search budget limits bitops, size, macs"),
    (["--budget", "bitops=1"], "unreachable"),
    (["--budget", "bitops=lots"], "malformed"),
    (["--budget", "bitops=1G", "--resolution", "40"], "resolution 40 (valid: 32, 24)"),
    (["--budget", "bitops=1G", "--lambda", "nan"], "--lambda"),
])
def test_bad_search_input_is_one_line(setup, tmp_path, args, needle):
    result = CliRunner().invoke(rtfq, ["search", "--checkpoint", str(setup / "c.pt"), "--data",
                                       str(setup / "data" / "target"), "-o", str(tmp_path / "p.json"), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "p.json").exists()


def test_search_and_mixed_export_answer_help():
    for command, args in ((rtfq, ["search", "--help"]), (export, ["--help"])):
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 0 and "Usage:" in result.output and "--search-images" in result.output


@pytest.mark.parametrize("rescore", [0, 1])
def test_a_search_pulled_up_by_its_loss_still_ends_within_its_step_bound(model, rescore):
    """A loss that rewards every extra bit far more than lambda = MIN_LAMBDA penalises its
    cost walks plans up again at every step; the search still meets the budget within
    2 L (C - 1) steps and 1 + 3 L^2 (C - 1) scored plans (moving down only after L (C - 1))."""
    from rtfq_deploy.search import MIN_LAMBDA, step_bound

    free = free_quantizers(model)
    weight = {n: 1.0 + i for i, n in enumerate(free)}

    def scorer(cfg: SubnetConfig) -> float:
        bits = model.plan(cfg).as_dict()
        return -sum(weight[n] * bits[n] for n in free)

    budget = parse_budget(f"bitops={(_bitops(model, 32, 1.0, 4) + _bitops(model, 32, 1.0, 2)) / 2}")
    result = greedy_search(model, 32, 1.0, budget, scorer, SearchOptions(lam=MIN_LAMBDA, rescore=rescore))
    bidirectional, limit = step_bound(len(free), len(SPACE.bits))
    assert over(result.costs, budget) <= 1.0 and bidirectional < len(result.steps) <= limit
    assert result.evaluations <= 1 + 3 * len(free) ** 2 * (len(SPACE.bits) - 1)


def test_degenerate_search_options_are_refused_by_the_library():
    from rtfq_deploy.cli.search import MIN_LAMBDA as CLI_MIN_LAMBDA
    from rtfq_deploy.search import MIN_LAMBDA

    assert CLI_MIN_LAMBDA == MIN_LAMBDA
    for lam in (0.0, 1e-320, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="lambda"):
            SearchOptions(lam=lam)
    with pytest.raises(ValueError, match="rescore"):
        SearchOptions(rescore=-1)


def _plain_loss(model, x, labels, cfg) -> float:
    """A whole forward pass, no kept inputs, no weight cache: what a plan's score means."""
    from rtfq_deploy.layers import batch_statistics

    with torch.no_grad(), batch_statistics(model):
        return float(torch.nn.functional.cross_entropy(model(x, model.active(cfg)), labels))


@pytest.mark.parametrize("arch", ["tiny_resnet", "tiny_mobilenet"])
@pytest.mark.parametrize("keep_bytes", [0, 150_000, 1 << 30])
def test_scores_from_kept_stage_inputs_equal_whole_forward_passes(arch, keep_bytes):
    """A walk of one-quantizer moves with re-basing, as the search makes, scored from
    kept stage inputs (all, some, none) and cached weights: every score is the whole
    forward pass's (MobileNetV2's dropout stays off, so a score is a function of the plan)."""
    import random

    torch.manual_seed(0)
    net = build_supernet(SupernetConfig(arch, num_classes=3, space=SPACE))
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    scorer = PlanScorer(net, x, labels=labels, keep_bytes=keep_bytes)
    free, rng = free_quantizers(net), random.Random(0)
    bits = net.plan(SubnetConfig(32, 1.0, 4)).as_dict()
    first = SubnetConfig(32, 1.0, 4)
    assert scorer(first) == pytest.approx(_plain_loss(net, x, labels, first), rel=1e-6)
    assert scorer(first) == scorer(first)
    for _ in range(12):
        cfg = SubnetConfig(32, 1.0, MixedBits.of({**bits, rng.choice(free): rng.choice(SPACE.bits)}))
        assert scorer(cfg) == pytest.approx(_plain_loss(net, x, labels, cfg), rel=1e-6)
        if rng.random() < 0.4:
            scorer.rebase(cfg)
            bits = cfg.bits.as_dict()
    other_width = SubnetConfig(32, 0.5, 4)
    assert scorer(other_width) == pytest.approx(_plain_loss(net, x, labels, other_width), rel=1e-6)


def test_a_move_late_in_the_network_runs_only_the_stages_after_it(model):
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    scorer = PlanScorer(model, x, labels=labels)
    calls = []
    handle = model.conv1.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        start = SubnetConfig(32, 1.0, 4)
        scorer(start)
        runs = len(calls)
        bits = model.plan(start).as_dict()
        last = [n for n in free_quantizers(model) if n.startswith("layer4.")][-1]
        scorer(SubnetConfig(32, 1.0, MixedBits.of({**bits, last: 2})))
        assert len(calls) == runs  # the stem did not run again
        scorer(SubnetConfig(32, 1.0, MixedBits.of({**bits, "q_stem": 2})))
        assert len(calls) == runs + 1
    finally:
        handle.remove()


def test_progress_says_how_long_the_search_has_left(model):
    """Every step's record carries an estimate of the seconds left; it ends at zero."""
    from rtfq_deploy.search import _eta

    assert _eta([0.3, 0.2, 0.2, 0.1], 0.45, (10.0, 5), 4) == 2 * 4 * 2.0  # two steps of 4 plans at 2 s
    assert _eta([0.1, 0.2, 0.3, 0.2], 0.55, (10.0, 5), 4) == 3 * 4 * 2.0
    assert _eta([0.3], 0.0, (10.0, 5), 4) == 0.0
    records = []
    budget = parse_budget(f"bitops={(_bitops(model, 32, 1.0, 4) + _bitops(model, 32, 1.0, 2)) / 2}")
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    greedy_search(model, 32, 1.0, budget, PlanScorer(model, x, labels=labels), SearchOptions(rescore=4),
                  progress=records.append)
    assert all(r.eta >= 0 for r in records) and records[-1].eta == 0.0
    assert len(records) == 1 or records[0].eta > 0


def test_the_search_takes_the_same_path_with_kept_stage_inputs_as_with_whole_passes(model):
    """What issue 24 promised: the faster scorer changes the time of a search, not its plan."""
    x, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    budget = parse_budget(f"bitops={(_bitops(model, 32, 1.0, 4) + _bitops(model, 32, 1.0, 2)) / 2}")
    options = SearchOptions(rescore=3)
    fast = greedy_search(model, 32, 1.0, budget, PlanScorer(model, x, labels=labels), options)
    whole = greedy_search(model, 32, 1.0, budget, lambda cfg: _plain_loss(model, x, labels, cfg), options)
    assert fast.subnet == whole.subnet and fast.evaluations == whole.evaluations
    assert [s.subnet for s in fast.steps] == [s.subnet for s in whole.steps]
