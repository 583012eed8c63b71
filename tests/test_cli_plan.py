"""rtfq plan, rtfq calibrate, rtfq eval --plans and rtfq-export --plan: a mixed-precision
subnet named, calibrated, evaluated and exported like a uniform one."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from rtfq_deploy.checkpoint import load_checkpoint, save_checkpoint
from rtfq_deploy.cli.export import export
from rtfq_deploy.cli.main import rtfq
from rtfq_deploy.data.synth import SynthConfig, generate
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.space import SearchSpace

SPACE = SearchSpace(resolutions=(48, 32), widths=(1.0, 0.5), bits=(8, 4))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plans")
    generate(root / "data", SynthConfig(classes=3, per_class=6, test_per_class=4, size=48, seed=0))
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE))
    save_checkpoint(root / "c.pt", model, meta={"class_names": ["circle", "square", "triangle"]})
    return root


def _invoke(command, *args: str):
    return CliRunner().invoke(command, [str(a) for a in args])


def _error(result, needle: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output


@pytest.fixture(scope="module")
def plan(setup) -> Path:
    path = setup / "p.json"
    result = _invoke(rtfq, "plan", "--checkpoint", setup / "c.pt", "--subnet", "r32-w0.50-q8",
                     "--set", "layer3.*=4", "--set", "layer4.*.weight_quant=4", "-o", path)
    assert result.exit_code == 0, result.output
    return path


def test_plan_writes_a_mixed_plan_with_costs(setup, plan):
    doc = json.loads(plan.read_text())
    assert doc["subnet"].startswith("r32-w0.50-m") and doc["subnet"] in _invoke(
        rtfq, "plan", "--checkpoint", setup / "c.pt", "--subnet", "r32-w0.50-q8", "--from-plan", plan).output
    bits = doc["bits"]
    assert bits["layer3.0.q1"] == bits["layer4.0.conv2.weight_quant"] == 4 and bits["layer4.0.q1"] == 8
    assert bits["layer3.0.q_res"] == 8 and bits["fc.weight_quant"] == 8  # the policy's fixed roles keep 8
    model = load_checkpoint(setup / "c.pt").model
    assert set(bits) == {n for n, _ in model.quantizers()}
    listed = json.loads(_invoke(rtfq, "subnets", "--checkpoint", setup / "c.pt", "--json").output)
    q8, q4 = ({r["subnet"]: r for r in listed}[f"r32-w0.50-q{q}"] for q in (8, 4))
    assert q4["bitops"] < doc["costs"]["bitops"] < q8["bitops"] and doc["costs"]["macs"] == q8["macs"]


def test_a_plan_of_uniform_bits_keeps_the_uniform_id(setup):
    result = _invoke(rtfq, "plan", "--checkpoint", setup / "c.pt", "--subnet", "r48-w1.00-q8", "--set", "*=4")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["subnet"] == "r48-w1.00-q4"


def test_calibrate_eval_and_export_a_mixed_plan(setup, plan, tmp_path):
    doc = json.loads(plan.read_text())
    mixed = doc["subnet"]
    data = setup / "data"
    # Without stored statistics a mixed plan needs --calib, and an unknown mixed id is refused.
    _error(_invoke(export, "--checkpoint", setup / "c.pt", "--plan", plan, "-o", tmp_path / "x.onnx"),
           f"no BatchNorm statistics for {mixed}: pass --calib")
    _error(_invoke(export, "--checkpoint", setup / "c.pt", "--subnet", mixed, "-o", tmp_path / "x.onnx"),
           "is not stored in this checkpoint")
    # Calibrate and store: the plan travels inside the checkpoint from now on.
    stored = tmp_path / "c2.pt"
    result = _invoke(rtfq, "calibrate", "--checkpoint", setup / "c.pt", "--data", data / "target", "--plans", plan,
                     "--subnets", "r32-w0.50-q8", "-o", stored)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(stored)
    assert sorted(ckpt.bn_stats) == sorted([mixed, "r32-w0.50-q8"]) and list(ckpt.plans) == [mixed]
    # Evaluate by id (stored) and by plan file: the same row, with the BatchNorm source said.
    rows = json.loads(_invoke(rtfq, "eval", "--checkpoint", stored, "--data", data / "target_test", "--subnets",
                              f"{mixed},r32-w0.50-q8", "--json").output)
    assert [r["subnet"] for r in rows] == [mixed, "r32-w0.50-q8"]
    assert rows[0]["bits"] is None and rows[0]["precision"] == "mixed" and rows[1]["precision"] == "q8"
    assert rows[0]["bn"] == "checkpoint" and rows[0]["bitops"] == doc["costs"]["bitops"]
    by_file = json.loads(_invoke(rtfq, "eval", "--checkpoint", stored, "--data", data / "target_test", "--plans",
                                 plan, "--json").output)
    assert by_file == rows[:1]
    # Export by stored id, and by plan file calibrating on the same images now: the same integer graph.
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    result = _invoke(export, "--checkpoint", stored, "--subnet", mixed, "-o", a, "--json")
    assert result.exit_code == 0, result.output
    result = _invoke(export, "--checkpoint", setup / "c.pt", "--plan", plan, "--calib", data / "target", "-o", b)
    assert result.exit_code == 0, result.output
    assert "integer kernels only" in result.output
    ma, mb = onnx.load(a), onnx.load(b)
    onnx.checker.check_model(ma, full_check=True)
    meta = {p.key: p.value for p in ma.metadata_props}
    assert meta["rtfq.subnet"] == mixed and json.loads(meta["rtfq.bits"]) == doc["bits"]
    assert meta["rtfq.bn_statistics"] == "calibrated" and meta["rtfq.bitops"] == str(doc["costs"]["bitops"])
    assert {i.name: numpy_helper.to_array(i).tobytes() for i in ma.graph.initializer} == \
        {i.name: numpy_helper.to_array(i).tobytes() for i in mb.graph.initializer}
    clips = sum(n.op_type == "Clip" for n in ma.graph.node)
    assert clips > 0  # the 4-bit tensors keep their exact integer range
    # A stored plan competes in --budget choices like the space's subnets.
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"subnets": [{"subnet": mixed, "top1": 0.9}, {"subnet": "r48-w1.00-q8", "top1": 0.5}]}))
    result = _invoke(export, "--checkpoint", stored, "--budget", "1G", "--accuracy", acc, "--no-verify",
                     "-o", tmp_path / "best.onnx")
    assert result.exit_code == 0 and f"chose {mixed}: most accurate" in result.output, result.output


def test_uniform_exports_carry_every_quantizers_bits(setup, tmp_path):
    out = tmp_path / "u.onnx"
    result = _invoke(export, "--checkpoint", setup / "c.pt", "--subnet", "r32-w0.50-q4", "--no-verify", "-o", out)
    assert result.exit_code == 0, result.output
    bits = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["rtfq.bits"])
    assert set(bits.values()) == {8, 4} and bits["conv1.weight_quant"] == 8 and bits["layer2.0.q1"] == 4


@pytest.mark.parametrize("args,needle", [
    (["plan", "--set", "layer3.*=9"], "expected PATTERN=BITS with BITS from 2 to 8"),
    (["plan", "--set", "layer3.*"], "expected PATTERN=BITS"),
    (["plan", "--set", "nothing*=4"], "the pattern matches no quantizer"),
    (["plan", "--set", "fc.*=4"], "only quantizers the bit policy fixes"),
    (["plan", "--subnet", "r32-w0.50-q6"], "bit-width 6 (valid: 8, 4)"),
    (["plan", "--subnet", "r32-w0.50-mdeadbeef"], "is not stored in this checkpoint"),
    (["calibrate", "--data", "{data}/target", "--subnets", "", "-o", "{tmp}/o.pt"], "no subnets to calibrate"),
    (["calibrate", "--data", "{data}/target", "--plans", "{tmp}/missing.json", "-o", "{tmp}/o.pt"], "does not exist"),
    (["calibrate", "--data", "{tmp}", "-o", "{ckpt}"], "exists (use --force"),
    (["eval", "--data", "{data}/target_test", "--plans", "{tmp}"], "no plan files (*.json) in this folder"),
    (["eval", "--data", "{data}/target_test", "--plans", "{tmp}/bad.json"], "not an rtfq plan file"),
])
def test_bad_plans_and_options_are_one_line(setup, tmp_path, args, needle):
    if any("bad.json" in a for a in args):
        (tmp_path / "bad.json").write_text(json.dumps({"format": "nope"}))
    subs = {"{data}": str(setup / "data"), "{tmp}": str(tmp_path), "{ckpt}": str(setup / "c.pt")}
    for key, value in subs.items():
        args = [a.replace(key, value) for a in args]
    if args[0] == "plan" and "--subnet" not in args:
        args += ["--subnet", "r32-w0.50-q8"]
    _error(_invoke(rtfq, args[0], "--checkpoint", setup / "c.pt", *args[1:]), needle)
    assert not (tmp_path / "o.pt").exists()


def test_every_new_command_answers_help():
    for args in (["plan"], ["calibrate"]):
        result = CliRunner().invoke(rtfq, [*args, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["bits"].update({"layer9.q1": 4}), "names layer9.q1, which tiny_resnet does not have"),
    (lambda d: d["bits"].pop("layer2.0.q1"), "has no entry for layer2.0.q1"),
    (lambda d: d["bits"].update({"layer2.0.q1": 6}), "keep step sizes for 8, 4 bits"),
    (lambda d: d["bits"].update({"layer2.0.q1": 9}), "expected an integer from 2 to 8"),
    (lambda d: d.update(resolution=40), "resolution 40 (valid: 48, 32)"),
    (lambda d: d.update(width=0.75), "width 0.75 (valid: 1.00, 0.50)"),
    (lambda d: d.update(version="1"), "version '1' is not supported"),
    (lambda d: d.update(bits=[1, 2]), "\"bits\" must map"),
])
def test_export_refuses_a_plan_that_does_not_fit_and_writes_nothing(setup, plan, tmp_path, edit, needle):
    doc = json.loads(plan.read_text())
    doc.pop("subnet")
    edit(doc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    out = tmp_path / "m.onnx"
    _error(_invoke(export, "--checkpoint", setup / "c.pt", "--plan", bad, "--calib", setup / "data" / "target",
                   "-o", out), needle)
    assert list(tmp_path.iterdir()) == [bad]


def test_a_mixed_export_is_benchmarked_selected_and_listed_like_a_uniform_one(setup, plan, tmp_path):
    from rtfq_deploy.cli.bench import bench
    from rtfq_deploy.manifest import read_manifest

    doc = json.loads(plan.read_text())
    models = tmp_path / "models"
    models.mkdir()
    for args in (["--plan", plan, "--calib", setup / "data" / "target"], ["--subnet", "r32-w0.50-q4"]):
        result = _invoke(export, "--checkpoint", setup / "c.pt", *args, "--no-verify", "-o",
                         models / f"{doc['subnet'] if '--plan' in args else 'r32-w0.50-q4'}.onnx")
        assert result.exit_code == 0, result.output
    results = tmp_path / "results.json"
    result = _invoke(bench, "run", models, "-o", results, "--min-runs", "5", "--max-runs", "20", "--min-time", "0.05",
                     "--warmup", "1")
    assert result.exit_code == 0, result.output
    rows = json.loads(results.read_text())["models"]
    assert {r["subnet"] for r in rows} == {doc["subnet"], "r32-w0.50-q4"}
    assert next(r for r in rows if r["subnet"] == doc["subnet"])["bitops"] == doc["costs"]["bitops"]
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"subnets": [{"subnet": doc["subnet"], "top1": 0.9}, {"subnet": "r32-w0.50-q4",
                                                                                     "top1": 0.8}]}))
    dist = tmp_path / "dist"
    result = _invoke(bench, "select", "--results", results, "--accuracy", acc, "--budget", "bitops=1T", "-o", dist,
                     "--device", "edge", "--no-report")
    assert result.exit_code == 0, result.output
    entries = read_manifest(dist).devices["edge"].files
    assert [e.subnet for e in entries] == [doc["subnet"]]
    assert (dist / entries[0].path).is_file()


def test_plan_refuses_an_output_that_is_a_fifo_even_with_force(setup, tmp_path):
    import os

    os.mkfifo(tmp_path / "p.json")
    result = _invoke(rtfq, "plan", "--checkpoint", setup / "c.pt", "--subnet", "r32-w0.50-q8", "-o",
                     tmp_path / "p.json", "--force")
    _error(result, "is a FIFO, not a regular file; refusing to replace it")
    assert (tmp_path / "p.json").is_fifo()


def test_export_refuses_an_accuracy_table_of_another_checkpoint_unless_forced(setup, tmp_path):
    from rtfq_deploy.fileio import sha256_file

    rows = [{"subnet": s, "top1": 0.5} for s in ("r48-w1.00-q8", "r48-w0.50-q4", "r32-w0.50-q4")]
    (tmp_path / "acc.json").write_text(json.dumps({"checkpoint_sha256": "0" * 64, "subnets": rows}))
    args = ["--checkpoint", setup / "c.pt", "--budget", "1T", "--accuracy", tmp_path / "acc.json", "--no-verify",
            "-o", tmp_path / "m.onnx"]
    _error(_invoke(export, *args), "the accuracy table was measured on checkpoint 000000000000...")
    assert not (tmp_path / "m.onnx").exists()
    assert _invoke(export, *args, "--force").exit_code == 0
    (tmp_path / "acc.json").write_text(json.dumps({"checkpoint_sha256": sha256_file(setup / "c.pt"), "subnets": rows}))
    assert _invoke(export, *args[:-1], tmp_path / "m2.onnx").exit_code == 0
