"""Every command under hostile input: NaN, infinities, huge, negative, empty and non-numeric
option values, non-UTF-8 and garbage files, deep, huge-numbered or wrongly typed JSON.

The property, for every case: exit code 2, exactly one stderr line starting with
``Error:``, no traceback, nothing on stdout and nothing written (the example's folder is
byte-for-byte what it was). Numeric options are found on the commands themselves, so an
option added later is driven too. Cases tried and failed per command are printed at the
end (``pytest -s``) and written to $RTFQ_HOSTILE_COUNTS when set.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import click
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rtfq_deploy import manifest as mf
from rtfq_deploy.accuracy import read_accuracy
from rtfq_deploy.bench.run import read_results
from rtfq_deploy.budget import parse_budget, parse_count
from rtfq_deploy.checkpoint import save_checkpoint
from rtfq_deploy.cli.bench import bench
from rtfq_deploy.cli.common import BoundedInt, FiniteFloat
from rtfq_deploy.cli.export import export
from rtfq_deploy.cli.main import rtfq
from rtfq_deploy.cli.serve import serve
from rtfq_deploy.cli.train import train
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.space import SearchSpace
from rtfq_deploy.train.config import TrainConfig
from tests.test_bench_select import make_results

SPACE = SearchSpace(resolutions=(32, 24), widths=(1.0, 0.5), bits=(8, 4))
FAST = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
TRIED: Counter = Counter()
FAILED: Counter = Counter()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint, an empty data folder and valid select inputs, made once."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    save_checkpoint(root / "tiny.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE)))
    (root / "empty").mkdir()
    (root / "sel").mkdir()
    results = make_results(root / "sel")
    yield {"root": root, "ckpt": root / "tiny.pt", "empty": root / "empty", "results": results,
           "acc": results.parent / "acc.json"}
    lines = [f"{name}: {TRIED[name]} hostile cases, {FAILED[name]} failed" for name in sorted(TRIED)]
    lines.append(f"total: {sum(TRIED.values())} hostile cases, {sum(FAILED.values())} failed")
    print("\n" + "\n".join(lines))
    if os.environ.get("RTFQ_HOSTILE_COUNTS"):
        Path(os.environ["RTFQ_HOSTILE_COUNTS"]).write_text(json.dumps(
            {name: {"tried": TRIED[name], "failed": FAILED[name]} for name in sorted(TRIED)}, indent=2) + "\n")


_example = itertools.count()


def _workdir(env: dict[str, Path]) -> Path:
    work = env["root"] / f"case{next(_example)}"
    work.mkdir()
    return work


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in folder.rglob("*")}


def _expect_one_line_error(name: str, command: click.Command, args: list[str], work: Path) -> str:
    """Run ``command`` in-process and assert the hostile-input property; count the case.
    Returns the error line."""
    before = _snapshot(work)
    root_handlers = logging.getLogger().handlers[:]
    try:
        result = CliRunner().invoke(command, [str(a) for a in args])
    finally:
        logging.getLogger().handlers[:] = root_handlers  # basicConfig must not keep a closed runner stream
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    ok = (result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: ")
          and "Traceback" not in result.stderr and result.stdout == ""
          and (result.exception is None or isinstance(result.exception, SystemExit)) and _snapshot(work) == before)
    TRIED[name] += 1
    FAILED[name] += not ok
    shutil.rmtree(work, ignore_errors=True)
    assert ok, (args, result.exit_code, result.stdout[-500:], result.stderr[-2000:], repr(result.exception))
    return lines[0]


# -- hostile option values -----------------------------------------------------------------

_SPECIAL = ["nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "1e999", "-1e999", "1e309", "", " ", "0x10",
            "1_0", "\u0661", "\u00bd", "--1", "1e", "e5", "9" * 50, "-" + "9" * 50, "9" * 5000, "1" + "0" * 400,
            "\x00", "1\n2", "true", "1,2", "[1]", "2.5e-400", "-0.0", "\ud800"]


def _rejects(kind: click.ParamType, text: str) -> bool:
    try:
        kind.convert(text, None, None)
    except click.BadParameter:
        return True
    return False


def hostile_numbers(kind: click.ParamType) -> st.SearchStrategy[str]:
    """Text that ``kind`` (a BoundedInt or FiniteFloat) must refuse: special values, values
    just and far beyond either bound, fractions for integers, arbitrary text."""
    if isinstance(kind, BoundedInt):
        low, high = kind.low, kind.high
        beyond = st.one_of(st.integers(high + 1, high + 10**30), st.integers(low - 10**30, low - 1),
                           st.sampled_from([high + 1, low - 1])).map(str)
        fractions = st.floats(low, high, allow_nan=False).map(lambda v: f"{v}").filter(lambda t: "." in t or "e" in t)
    else:
        low = -1e308 if kind.low is None else kind.low
        high = 1e308 if kind.high is None else kind.high
        beyond = st.one_of(st.floats(min_value=high, exclude_min=not kind.high_open, allow_infinity=False),
                           st.floats(max_value=low, exclude_max=not kind.low_open, allow_infinity=False),
                           st.sampled_from([f"{high!r}0", f"-{abs(low)!r}1"])).map(str)
        fractions = st.nothing()
    return st.one_of(st.sampled_from(_SPECIAL), beyond, fractions, st.text(max_size=8)).filter(
        lambda t: _rejects(kind, t))


def numeric_options(command: click.Command) -> list[tuple[str, click.ParamType]]:
    """Every option of ``command`` whose type is one of the bounded numeric types."""
    return [(p.opts[-1] if p.opts[-1].startswith("--") else p.opts[0], p.type) for p in command.params
            if isinstance(p, click.Option) and isinstance(p.type, (BoundedInt, FiniteFloat))]


def _subcommand(group: click.Group, *path: str) -> click.Command:
    cmd: click.Command = group
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


# (name, entry point, leading args, sub-command path, the rest of a valid command line)
COMMANDS: list[tuple[str, click.Command, tuple[str, ...], Callable[[dict, Path], list]]] = [
    ("rtfq init", rtfq, ("init",), lambda e, w: ["--arch", "tiny_resnet", "--num-classes", "3", "-o", w / "o.pt"]),
    ("rtfq eval", rtfq, ("eval",), lambda e, w: ["--checkpoint", e["ckpt"], "--data", e["empty"], "-o", w / "a.json"]),
    ("rtfq data synth", rtfq, ("data", "synth"), lambda e, w: [w / "synth"]),
    ("rtfq fetch", rtfq, ("fetch",), lambda e, w: ["--server", "http://127.0.0.1:9", "--device", "d", "--budget", "1G",
                                                   "-o", w / "m.onnx"]),
    ("rtfq-train", train, (), lambda e, w: ["--checkpoint", e["ckpt"], "--source", e["empty"], "--target", e["empty"],
                                            "--out", w / "run"]),
    ("rtfq-export", export, (), lambda e, w: ["--checkpoint", e["ckpt"], "--budget", "1G", "-o", w / "m.onnx"]),
    ("rtfq-bench run", bench, ("run",), lambda e, w: [w / "m.onnx", "-o", w / "r.json"]),
    ("rtfq-serve", serve, (), lambda e, w: [w / "dist"]),
]


def test_every_numeric_option_is_bounded():
    """No command keeps a plain int/float option (click's FloatRange lets NaN through)."""
    for name, command, path, _ in COMMANDS:
        cmd = _subcommand(command, *path) if path else command
        loose = [p.name for p in cmd.params if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))]
        assert not loose, f"{name}: unbounded numeric options {loose}"
        assert numeric_options(cmd), name


@pytest.mark.parametrize("name,command,path,base", COMMANDS, ids=[c[0] for c in COMMANDS])
@FAST
@given(data=st.data())
def test_hostile_numeric_options(env, name, command, path, base, data):
    cmd = _subcommand(command, *path) if path else command
    option, kind = data.draw(st.sampled_from(numeric_options(cmd)), label="option")
    value = data.draw(hostile_numbers(kind), label="value")
    work = _workdir(env)
    _expect_one_line_error(name, command, [*path, *base(env, work), option, value], work)


INIT_LISTS = {"--resolutions": BoundedInt(1, 1024), "--widths": FiniteFloat(0.0, 1.0, low_open=True),
              "--bits": BoundedInt(2, 8)}


@FAST
@given(option=st.sampled_from(sorted(INIT_LISTS)), data=st.data())
def test_init_hostile_lists(env, option, data):
    bad = data.draw(hostile_numbers(INIT_LISTS[option]).filter(lambda t: "," not in t and t.strip()))
    good = {"--resolutions": "32", "--widths": "1.0", "--bits": "8"}[option]
    value = data.draw(st.sampled_from([f"{good},{bad}", f"{bad}", ",".join([good] * 17), ",,", f"{good},{bad},{good}"]))
    work = _workdir(env)
    _expect_one_line_error("rtfq init", rtfq, ["init", "--arch", "tiny_resnet", "-o", work / "o.pt", option, value], work)


def _refused_by(parse: Callable[[str], Any]) -> Callable[[str], bool]:
    def refused(text: str) -> bool:
        try:
            parse(text)
        except RtfqError:
            return True
        return False
    return refused


HOSTILE_BUDGETS = ["1e400G", "1e999999999", "-1G", "0", "nan", "inf", "1e19", "9" * 5000, "1e" + "9" * 100, "0.8X",
                   "", ",", "1e-999G", "1e400ms", "latency=1e400ms", "memory=64MB,memory=1GB", "64MB", "x" * 2000]


@FAST
@given(value=st.one_of(st.sampled_from(HOSTILE_BUDGETS), st.text(max_size=12)).filter(_refused_by(parse_count)))
def test_export_hostile_budget(env, value):
    work = _workdir(env)
    _expect_one_line_error("rtfq-export", export, ["--checkpoint", env["ckpt"], "--budget", value, "-o", work / "m.onnx"],
                           work)


@FAST
@given(value=st.one_of(st.sampled_from(["r32-w1.00-q9", "r99999999999999999999-w1.00-q8", "r32-w0.30-q8", "",
                                        "r32-w1.00-q8\n", "r0-w1-q8", "r32-wnan-q8"]),
                       st.text(max_size=16)).filter(lambda t: t.strip() not in {str(c) for c in SPACE}))
def test_export_hostile_subnet(env, value):
    work = _workdir(env)
    _expect_one_line_error("rtfq-export", export, ["--checkpoint", env["ckpt"], "--subnet", value, "-o", work / "m.onnx"],
                           work)


@FAST
@given(value=st.one_of(st.sampled_from(HOSTILE_BUDGETS), st.text(max_size=16)).filter(_refused_by(parse_budget)))
def test_bench_select_hostile_budget(env, value):
    work = _workdir(env)
    _expect_one_line_error("rtfq-bench select", bench, ["select", "--results", env["results"], "--accuracy", env["acc"],
                                                        "--budget", value, "-o", work / "dist", "--no-report"], work)


# -- hostile files -----------------------------------------------------------------------------

FIXED_FILES = [
    b"", b"\x00" * 64, b"\xff\xfe\x00{", "{\"a\": 1}".encode("utf-16"), b"\xef\xbb\xbf{}", b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 3000 + b"1" + b"}" * 3000, b"[" * 65 + b"]" * 65, b'{"subnets": 1e999999}', b"[" + b"1" * 100_000 + b"]",
    b"NaN", b"[Infinity]", b'{"subnets": [{"subnet": "r32-w1.00-q8", "top1": -Infinity}]}', b'{"x": 1',
    b"\x80abc", b"PK\x03\x04" + bytes(range(256)), b"null", b"true", b"12", b'"text"', b"[]", b"{}",
]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
json_values = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                             max_size=3), max_leaves=8)
hostile_leaf = st.one_of(st.sampled_from([None, True, False, "", "x" * 300, "1e999", -1, -1e308, 1e308, 2**63, 10**39,
                                          [], {}, [1, 2], {"a": None}, 0.5, "../../etc/passwd", "a/b"]), json_leaf)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``doc``."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _mutated(doc: Any, path: tuple, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def hostile_documents(valid: Any) -> st.SearchStrategy[bytes]:
    """Bytes of a hostile JSON file: fixed nasties, random JSON, or ``valid`` with one value
    (anywhere in it) replaced by a wrong type or an out-of-range number."""
    paths = _paths(valid)
    mutated = st.builds(lambda p, v: json.dumps(_mutated(valid, p, v)).encode(), st.sampled_from(paths), hostile_leaf)
    dropped = st.sampled_from(paths).map(lambda p: json.dumps(_without(valid, p)).encode())
    return st.one_of(st.sampled_from(FIXED_FILES), json_values.map(lambda v: json.dumps(v).encode()), mutated, dropped)


def _without(doc: Any, path: tuple) -> Any:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


def _refuses_file(read: Callable[[Path], Any], content: bytes, work: Path, name: str) -> bool:
    probe = work.parent / f"probe-{name}"
    probe.write_bytes(content)
    try:
        read(probe)
    except RtfqError:
        return True
    finally:
        probe.unlink()
    return False


# Subnets of another space: a mutation that leaves the table valid still ends in "no subnet
# of the table within the budget", so every case must be refused.
VALID_ACCURACY = {"format": "rtfq-accuracy", "version": 1, "subnets": [
    {"subnet": s, "top1": 0.5, "macs": 10, "bn": "checkpoint"} for s in ("r96-w1.00-q8", "r96-w0.60-q4")]}


@FAST
@given(content=hostile_documents(VALID_ACCURACY))
def test_export_hostile_accuracy_file(env, content):
    work = _workdir(env)
    (work / "acc.json").write_bytes(content)
    _expect_one_line_error("rtfq-export", export, ["--checkpoint", env["ckpt"], "--budget", "1G", "--accuracy",
                                                   work / "acc.json", "-o", work / "m.onnx"], work)


def _runtime_inputs(env: dict[str, Path]) -> Path:
    """Valid version 2 results (onnxruntime and OpenVINO rows), made once."""
    from tests.test_select_runtimes import make_results as make_runtime_results

    folder = env["root"] / "runtimes"
    if not (folder / "r.json").exists():
        folder.mkdir(exist_ok=True)
        make_runtime_results(folder)
    return folder / "r.json"


@FAST
@given(which=st.sampled_from(["results", "manifest"]), data=st.data())
def test_bench_select_hostile_runtime_files(env, which, data):
    """Version 2 results and manifests (two runtimes): any refused mutation is one line, nothing written."""
    results = _runtime_inputs(env)
    entry = {"subnet": "r32-w1.00-q8", "runtime": "openvino", "path": "other/r32-w1.00-q8.onnx", "sha256": "0" * 64,
             "size_bytes": 1, "latency_p50_ms": 1.0, "latency_p90_ms": 1.0, "stable": False, "peak_memory_bytes": 1,
             "macs": 1, "bitops": 1, "accuracy": 0.5, "accuracy_source": "measured", "agreement": 0.9, "budgets": ["1ms"]}
    valid = {"results": json.loads(results.read_text()),
             "manifest": {"format": "rtfq-manifest", "version": 2, "devices": {"other": {
                 "fingerprint": {"cpu_model": "x"}, "updated": "2026-01-01T00:00:00Z",
                 "files": [entry, entry | {"runtime": "onnxruntime", "accuracy_source": "table"}]}}}}[which]
    content = data.draw(hostile_documents(valid))
    work = _workdir(env)
    reader = {"results": read_results, "manifest": lambda p: mf.parse_manifest(
        mf.read_json(p, "manifest", expect=dict), str(p))}[which]
    assume(_refuses_file(reader, content, work, which))
    if which == "results":
        results = work / "results.json"
        results.write_bytes(content)
    else:
        (work / "dist").mkdir()
        (work / "dist" / "manifest.json").write_bytes(content)
    _expect_one_line_error("rtfq-bench select", bench, ["select", "--results", results, "--accuracy",
                                                        results.parent / "acc.json" if which == "manifest" else
                                                        _runtime_inputs(env).parent / "acc.json", "--budget", "10ms",
                                                        "-o", work / "dist", "--no-report"], work)


@FAST
@given(which=st.sampled_from(["results", "accuracy", "manifest"]), data=st.data())
def test_bench_select_hostile_files(env, which, data):
    valid = {"results": json.loads(env["results"].read_text()), "accuracy": json.loads(env["acc"].read_text()),
             "manifest": {"format": "rtfq-manifest", "version": 1, "devices": {"other": {
                 "fingerprint": {"cpu_model": "x"}, "updated": "2026-01-01T00:00:00Z",
                 "files": [{"subnet": "r32-w1.00-q8", "path": "other/r32-w1.00-q8.onnx", "sha256": "0" * 64,
                            "size_bytes": 1, "latency_p50_ms": 1.0, "latency_p90_ms": 1.0, "peak_memory_bytes": 1,
                            "macs": 1, "bitops": 1, "accuracy": 0.5, "budgets": ["1ms"]}]}}}}[which]
    content = data.draw(hostile_documents(valid))
    work = _workdir(env)
    reader = {"results": read_results, "accuracy": read_accuracy, "manifest": lambda p: mf.parse_manifest(
        mf.read_json(p, "manifest", expect=dict), str(p))}[which]
    assume(_refuses_file(reader, content, work, which))  # a harmless change (e.g. to a note) is a valid file
    results, acc = env["results"], env["acc"]
    if which == "results":
        results = work / "results.json"
        results.write_bytes(content)
    elif which == "accuracy":
        acc = work / "acc.json"
        acc.write_bytes(content)
    else:
        (work / "dist").mkdir()
        (work / "dist" / "manifest.json").write_bytes(content)
    _expect_one_line_error("rtfq-bench select", bench, ["select", "--results", results, "--accuracy", acc, "--budget",
                                                        "10ms", "-o", work / "dist", "--no-report"], work)


@FAST
@given(data=st.data())
def test_train_hostile_recipe(env, data):
    """A recipe that passes is stopped by the empty data folder; either way one line and no run directory."""
    content = data.draw(hostile_documents({**TrainConfig(steps=1).to_dict(), "_note": "x"}))
    work = _workdir(env)
    (work / "r.json").write_bytes(content)
    _expect_one_line_error("rtfq-train", train, ["--checkpoint", env["ckpt"], "--source", env["empty"], "--target",
                                                 env["empty"], "--out", work / "run", "--recipe", work / "r.json"], work)


@FAST
@given(data=st.data())
def test_train_resume_hostile_run_json(env, data):
    record = {"checkpoint": str(env["ckpt"]), "source": str(env["empty"]), "target": str(env["empty"]),
              "config": TrainConfig(steps=1).to_dict()}
    content = data.draw(hostile_documents(record))
    work = _workdir(env)
    (work / "run").mkdir()
    (work / "run" / "run.json").write_bytes(content)
    _expect_one_line_error("rtfq-train", train, ["--resume", work / "run"], work)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # random bytes claim any protocol
@FAST
@given(content=st.one_of(st.sampled_from(FIXED_FILES), st.binary(max_size=256)),
       command=st.sampled_from(["subnets", "eval", "export", "init --pretrained"]))
def test_hostile_checkpoint_files(env, content, command):
    work = _workdir(env)
    (work / "c.pt").write_bytes(content)
    if command == "subnets":
        _expect_one_line_error("rtfq subnets", rtfq, ["subnets", "--checkpoint", work / "c.pt"], work)
    elif command == "eval":
        _expect_one_line_error("rtfq eval", rtfq, ["eval", "--checkpoint", work / "c.pt", "--data", env["empty"], "-o",
                                                   work / "a.json"], work)
    elif command == "export":
        _expect_one_line_error("rtfq-export", export, ["--checkpoint", work / "c.pt", "--all", "-o", work / "out"], work)
    else:
        _expect_one_line_error("rtfq init", rtfq, ["init", "--arch", "tiny_resnet", "--pretrained", work / "c.pt", "-o",
                                                   work / "o.pt"], work)


@FAST
@given(value=st.text(max_size=12).filter(lambda t: t not in ("macs", "bitops", "params", "weight_bytes", "subnet")))
def test_subnets_hostile_sort(env, value):
    work = _workdir(env)
    _expect_one_line_error("rtfq subnets", rtfq, ["subnets", "--checkpoint", env["ckpt"], "--sort", value], work)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this build has CUDA")
def test_device_cuda_on_a_cpu_build_is_one_line(env):
    for name, command, args in [
        ("rtfq eval", rtfq, ["eval", "--checkpoint", env["ckpt"], "--data", env["empty"], "--device", "cuda"]),
        ("rtfq-train", train, ["--checkpoint", env["ckpt"], "--source", env["empty"], "--target", env["empty"],
                               "--device", "cuda"]),
    ]:
        work = _workdir(env)
        out = ["-o", work / "a.json"] if name == "rtfq eval" else ["--out", work / "run"]
        _expect_one_line_error(name, command, [*args, *out], work)


# -- hostile images, tiny folders, deep metadata, degenerate search settings (issue 26) ------

def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels: Pillow's DecompressionBombError."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def images(env) -> dict[str, Any]:
    """Class folders (circle, square, triangle) with hostile files among good images
    (a decompression bomb, a truncated JPEG, junk), of hostile files only, a folder of one
    image and one with a single readable image; a 2-step finished run; an export."""
    import numpy as np
    from PIL import Image

    from rtfq_deploy.costs import subnet_costs
    from rtfq_deploy.data.synth import SynthConfig, generate
    from rtfq_deploy.space import SubnetConfig

    root = env["root"] / "images"
    generate(root / "data", SynthConfig(classes=3, per_class=3, test_per_class=2, size=32, seed=0))
    good = root / "data" / "target_test"
    bomb = png_claiming(100_000, 100_000)
    mix = root / "mix"
    shutil.copytree(good, mix)
    (mix / "circle" / "zz_bomb.png").write_bytes(bomb)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "whole.jpg", quality=95)
    whole = (root / "whole.jpg").read_bytes()
    (mix / "square" / "zz_cut.jpg").write_bytes(whole[: len(whole) // 2])  # passes a header check, not a decode
    (mix / "triangle" / "zz_junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    bombs, one_readable, one = root / "bombs", root / "one_readable", root / "one" / "x"
    for c in ("circle", "square", "triangle"):
        for folder in (bombs, one_readable):
            (folder / c).mkdir(parents=True)
            (folder / c / "b.png").write_bytes(bomb)
    one.mkdir(parents=True)
    for folder in (one_readable / "circle", one):
        shutil.copy(good / "circle" / "00000.png", folder / "0.png")
    model = __import__("rtfq_deploy.checkpoint", fromlist=["load_checkpoint"]).load_checkpoint(env["ckpt"]).model
    q8 = subnet_costs(model, SubnetConfig(32, 1.0, 8)).bitops
    result = CliRunner().invoke(export, ["--checkpoint", str(env["ckpt"]), "--subnet", "r24-w0.50-q4", "--no-verify",
                                         "-o", str(root / "m.onnx")])
    assert result.exit_code == 0, result.output
    import onnx

    exported = onnx.load(root / "m.onnx")  # the tiny checkpoint has no class names; the folders do
    next(p for p in exported.metadata_props if p.key == "rtfq.class_names").value = '["circle", "square", "triangle"]'
    onnx.save(exported, root / "m.onnx")
    run = root / "run"
    result = _invoke(train, [*_TRAIN, "--checkpoint", env["ckpt"], "--source", good, "--target", good, "--out", run])
    assert result.exit_code == 0, result.stderr
    result = _invoke(rtfq, ["calibrate", "--checkpoint", env["ckpt"], "--data", good, "--subnets", "r24-w0.50-q4",
                            "-o", root / "calibrated.pt"])  # exported without the warning of stored statistics
    assert result.exit_code == 0, result.stderr
    return {"calibrated": root / "calibrated.pt", "root": root, "good": good, "mix": mix, "bombs": bombs, "one_readable": one_readable,
            "one": one.parent, "source": root / "data" / "source", "budget": f"bitops={q8 - 1}",  # one search step
            "onnx": root / "m.onnx", "run": run}


_TRAIN = ["--steps", "2", "--batch-size", "4", "--calib-images", "4", "--log-every", "1", "--workers", "0"]
_BENCH = ["--warmup", "1", "--min-runs", "5", "--max-runs", "20", "--min-time", "0", "--max-time", "0.1"]


def _invoke(command: click.Command, args: list) -> Any:
    handlers = logging.getLogger().handlers[:]
    try:
        return CliRunner().invoke(command, [str(a) for a in args])
    finally:
        logging.getLogger().handlers[:] = handlers


def _image_cases(env: dict, im: dict, folder: Path, w: Path) -> list[tuple[str, click.Command, list]]:
    """Every command that reads images, given ``folder`` where it reads them."""
    ck, budget = env["ckpt"], im["budget"]
    train_args = [*_TRAIN[:-1]]
    return [
        ("rtfq eval", rtfq, ["eval", "--checkpoint", ck, "--data", folder, "--subnets", "r24-w0.50-q4", "-o", w / "a.json"]),
        ("rtfq eval", rtfq, ["eval", "--checkpoint", ck, "--data", im["good"], "--calib", folder, "--subnets",
                             "r24-w0.50-q4", "-o", w / "a.json"]),
        ("rtfq calibrate", rtfq, ["calibrate", "--checkpoint", ck, "--data", folder, "--subnets", "r24-w0.50-q4",
                                  "-o", w / "c.pt"]),
        ("rtfq search", rtfq, ["search", "--checkpoint", ck, "--budget", budget, "--data", folder, "--search-images",
                               "12", "-o", w / "p.json"]),
        ("rtfq search", rtfq, ["search", "--checkpoint", ck, "--budget", budget, "--data", folder, "--labeled",
                               "--search-images", "12", "-o", w / "p.json"]),
        ("rtfq-export", export, ["--checkpoint", ck, "--subnet", "r24-w0.50-q4", "--calib", folder, "--no-verify",
                                 "-o", w / "m.onnx"]),
        ("rtfq-export", export, ["--checkpoint", im["calibrated"], "--subnet", "r24-w0.50-q4", "--verify-images",
                                 folder, "-o", w / "m.onnx"]),
        ("rtfq-export", export, ["--checkpoint", ck, "--budget", budget, "--mixed", "--data", folder, "--search-images",
                                 "12", "--no-verify", "-o", w / "m.onnx"]),
        ("rtfq-train", train, [*train_args, "0", "--checkpoint", ck, "--source", folder, "--target", im["good"],
                               "--out", w / "run"]),
        ("rtfq-train", train, [*train_args, "2", "--checkpoint", ck, "--source", im["good"], "--target", folder,
                               "--out", w / "run"]),
        ("rtfq-bench run", bench, ["run", im["onnx"], "--images", folder, *_BENCH, "-o", w / "r.json"]),
    ]


@pytest.mark.parametrize("case", range(11))
def test_a_hostile_image_among_good_ones_is_skipped_with_a_warning_naming_it(env, images, case, caplog):
    """Decided: a decompression bomb, a truncated or an undecodable file is skipped, named
    in one warning line (with why), and the command goes on with the readable images."""
    work = _workdir(env)
    name, command, args = _image_cases(env, images, images["mix"], work)[case]
    result = _invoke(command, args)
    assert result.exit_code == 0 and "Traceback" not in result.stderr, (name, result.stderr[-2000:])
    # one line each time the folder is read (eval: to calibrate, then to evaluate); in-process
    # the log lines reach caplog rather than the runner's stderr
    warnings = [r.getMessage() for r in caplog.records if "unreadable image file(s)" in r.getMessage()]
    assert warnings and all("skipped 3 unreadable image file(s) of 9" in w and "zz_bomb.png" in w and "zz_cut.jpg" in w
                            and "zz_junk.png" in w and "decompression bomb" in w for w in warnings), result.stderr


@pytest.mark.parametrize("case", range(11))
def test_a_folder_of_hostile_images_is_one_line_naming_a_file(env, images, case):
    work = _workdir(env)
    name, command, args = _image_cases(env, images, images["bombs"], work)[case]
    if name == "rtfq-bench run":  # the folder's images are read per model: that row's accuracy_error
        result = _invoke(command, args)
        row = json.loads((work / "r.json").read_text())["models"][0]
        assert result.exit_code == 0 and "Traceback" not in result.stderr
        assert "no readable images" in row["accuracy_error"] and "b.png" in row["accuracy_error"], row
        return
    line = _expect_one_line_error(name, command, args, work)
    assert "no readable images" in line and "b.png" in line and "decompression bomb" in line, line


def test_training_streams_only_images_it_decoded_up_front(env, images, caplog):
    """Without the decoded cache (cache_mb 0), every image is still decoded once at the
    start: a truncated JPEG that passes a header check does not end the run at step N."""
    work = _workdir(env)
    (work / "r.json").write_text('{"cache_mb": 0}')
    result = _invoke(train, [*_TRAIN[2:], "--steps", "1", "--recipe", work / "r.json", "--checkpoint", env["ckpt"],
                             "--source", images["mix"], "--target", images["mix"], "--out", work / "run"])
    assert result.exit_code == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "zz_cut.jpg" in caplog.text and (work / "run" / "supernet.pt").exists()


def _resumable(images: dict, work: Path, edit: Callable[[Path], None]) -> Path:
    run = work / "run"
    shutil.copytree(images["run"], run)
    edit(run)
    return run


def test_resume_after_a_hostile_image_reached_the_target_skips_it(env, images, caplog):
    """A bomb added to the target folder after the run started: checked again at resume, skipped."""
    work = _workdir(env)
    target = work / "target"
    shutil.copytree(images["good"], target)

    def edit(run: Path) -> None:
        record = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**record, "target": str(target)}))
        (target / "circle" / "zz_bomb.png").write_bytes(png_claiming(100_000, 100_000))

    result = _invoke(train, ["--resume", _resumable(images, work, edit)])
    assert result.exit_code == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "zz_bomb.png" in caplog.text and "decompression bomb" in caplog.text


def _record_edit(**config: Any) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        record = json.loads((run / "run.json").read_text())
        record["config"].update(config)
        (run / "run.json").write_text(json.dumps(record))
    return edit


@pytest.mark.parametrize("case", ["calibrate --images 1", "calibrate one image", "eval --calib one image",
                                  "eval --calib-images 1", "eval one readable", "export --calib one image",
                                  "export --calib-images 1", "export --mixed --data one image", "search one image",
                                  "search --labeled one readable", "train --calib-images 1",
                                  "train one readable target", "resume calib_images 1"])
def test_batchnorm_statistics_need_two_images(env, images, case):
    """One image cannot give BatchNorm statistics in training mode: the options, the folders
    (after skipping unreadable files) and run.json are refused with one line."""
    ck, one, one_readable, budget = env["ckpt"], images["one"], images["one_readable"], images["budget"]
    work = _workdir(env)
    sub = ["--subnets", "r24-w0.50-q4"]
    name, command, args = {
        "calibrate --images 1": ("rtfq calibrate", rtfq, ["calibrate", "--checkpoint", ck, "--data", images["good"],
                                                         "--images", "1", *sub, "-o", work / "c.pt"]),
        "calibrate one image": ("rtfq calibrate", rtfq, ["calibrate", "--checkpoint", ck, "--data", one, *sub,
                                                        "-o", work / "c.pt"]),
        "eval --calib one image": ("rtfq eval", rtfq, ["eval", "--checkpoint", ck, "--data", images["good"], "--calib",
                                                      one, *sub]),
        "eval --calib-images 1": ("rtfq eval", rtfq, ["eval", "--checkpoint", ck, "--data", images["good"],
                                                     "--calib-images", "1", *sub]),
        "eval one readable": ("rtfq eval", rtfq, ["eval", "--checkpoint", ck, "--data", one_readable, *sub]),
        "export --calib one image": ("rtfq-export", export, ["--checkpoint", ck, "--subnet", "r24-w0.50-q4", "--calib",
                                                            one, "-o", work / "m.onnx"]),
        "export --calib-images 1": ("rtfq-export", export, ["--checkpoint", ck, "--subnet", "r24-w0.50-q4", "--calib",
                                                           images["good"], "--calib-images", "1", "-o", work / "m.onnx"]),
        "export --mixed --data one image": ("rtfq-export", export, ["--checkpoint", ck, "--budget", budget, "--mixed",
                                                                   "--data", one, "-o", work / "m.onnx"]),
        "search one image": ("rtfq search", rtfq, ["search", "--checkpoint", ck, "--budget", budget, "--data", one,
                                                  "-o", work / "p.json"]),
        "search --labeled one readable": ("rtfq search", rtfq, ["search", "--checkpoint", ck, "--budget", budget,
                                                               "--data", one_readable, "--labeled", "-o", work / "p.json"]),
        "train --calib-images 1": ("rtfq-train", train, ["--checkpoint", ck, "--source", images["good"], "--target",
                                                        images["good"], "--calib-images", "1", "--out", work / "new"]),
        "train one readable target": ("rtfq-train", train, [*_TRAIN, "--checkpoint", ck, "--source", images["good"],
                                                           "--target", one_readable, "--out", work / "new"]),
        "resume calib_images 1": ("rtfq-train", train, ["--resume", _resumable(images, work,
                                                                              _record_edit(calib_images=1))]),
    }[case]
    line = _expect_one_line_error(name, command, args, work)
    assert "at least 2" in line or "between 2 and" in line or "from 2 to" in line, line


@pytest.mark.parametrize("bits", ["2", "6", "5"])
def test_single_rule_bits_outside_the_space_is_one_line(env, images, bits):
    """The space's bit-widths are 8 and 4: refused before any image is read, on start and resume."""
    work = _workdir(env)
    line = _expect_one_line_error("rtfq-train", train, [*_TRAIN, "--rule", "single", "--single-bits", bits,
                                                        "--checkpoint", env["ckpt"], "--source", images["good"],
                                                        "--target", images["good"], "--out", work / "run"], work)
    assert f"--single-bits {bits}" in line and "(8, 4)" in line, line
    work = _workdir(env)
    run = _resumable(images, work, _record_edit(rule="single", single_bits=int(bits)))
    line = _expect_one_line_error("rtfq-train", train, ["--resume", run], work)
    assert f"--single-bits {bits}" in line and "(8, 4)" in line, line


_DEEP = "[" * 10_000 + "]" * 10_000


@pytest.mark.parametrize("key,value,needle", [
    ("rtfq.class_names", _DEEP, "nested deeper"), ("rtfq.class_names", "7", "must be a JSON array"),
    ("rtfq.class_names", "null", "must be a JSON array"), ("rtfq.class_names", '[{"a": 1}, 2, 3]', "array of names"),
    ("rtfq.class_names", '["a", "b", 1' + "0" * 5000 + "]", "digits"), ("rtfq.class_names", "[NaN]", "finite"),
], ids=["deep", "number", "null", "types", "digits", "nan"])
def test_deep_or_wrongly_typed_class_names_metadata_is_one_line(env, images, key, value, needle):
    import onnx

    work = _workdir(env)
    model = onnx.load(images["onnx"])
    next(p for p in model.metadata_props if p.key == key).value = value
    onnx.save(model, work / "m.onnx")
    line = _expect_one_line_error("rtfq-bench run", bench, ["run", work / "m.onnx", "--images", images["good"],
                                                            *_BENCH, "-o", work / "r.json"], work)
    assert needle in line and "rtfq.class_names" in line, line


@pytest.mark.parametrize("value", [_DEEP, "7", "null", '{"shape": {"a": 1}, "mean": 1, "std": null}',
                                   '{"shape": ["N", 3, 1' + "0" * 5000 + ', 24], "mean": [0, 0, 0], "std": [1, 1, 1]}',
                                   '{"shape": ["N", 3, 24, 24], "mean": [0, 0, 0], "std": [1, 1, true]}'],
                         ids=["deep", "number", "null", "types", "digits", "bool"])
def test_deep_or_wrongly_typed_input_metadata_is_the_rows_accuracy_error(env, images, value):
    """A model whose rtfq.input cannot be used is still timed; its row says why accuracy is missing."""
    import onnx

    work = _workdir(env)
    model = onnx.load(images["onnx"])
    next(p for p in model.metadata_props if p.key == "rtfq.input").value = value
    onnx.save(model, work / "m.onnx")
    result = _invoke(bench, ["run", work / "m.onnx", "--images", images["good"], *_BENCH, "-o", work / "r.json"])
    assert result.exit_code == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    row = json.loads((work / "r.json").read_text())["models"][0]
    assert row["ok"] and "no usable rtfq.input metadata" in row["accuracy_error"], row


def _metrics(content: bytes | None) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        (run / "metrics.jsonl").unlink()
        if content is None:
            (run / "metrics.jsonl").symlink_to("/dev/zero")
        else:
            (run / "metrics.jsonl").write_bytes(content)
    return edit


_DEEP_LINE = b'{"step": ' + _DEEP.encode() + b"}\n"


@pytest.mark.parametrize("content,needle", [
    (_DEEP_LINE + b'{"step": 0}\n', "nested deeper"), (b'{"step": 1' + b"0" * 5000 + b'}\n{"step": 0}\n', "digits"),
    (b'{"step": NaN}\n{"step": 0}\n', "finite"), (b"[" + b"1," * 600_000 + b"1]\n{}\n", "longer than"),
    (None, "not a regular file"),
], ids=["deep", "digits", "nan", "long", "dev-zero"])
def test_resume_reads_metrics_jsonl_through_the_bounded_reader(env, images, content, needle):
    work = _workdir(env)
    run = _resumable(images, work, _metrics(content))
    line = _expect_one_line_error("rtfq-train", train, ["--resume", run], work)
    assert "metrics.jsonl" in line and needle in line, line


def test_resume_drops_a_deep_last_metrics_line_as_cut(env, images, caplog):
    work = _workdir(env)
    run = _resumable(images, work, _metrics(b'{"step": 0}\n' + _DEEP_LINE))
    result = _invoke(train, ["--resume", run])
    assert result.exit_code == 0 and "dropped a cut last line" in caplog.text, result.stderr[-2000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]


@pytest.mark.parametrize("value", ["9" * 5000, "\u00b2", "\u0661", "4" * 41, "1_0", "+4", " 4", "4 ", "", "0x4",
                                   "\u0664", "\uff14", "1e1"],
                         ids=["5000-digits", "superscript", "arabic-1", "41-digits", "underscore", "plus", "blank-before",
                              "blank-after", "empty", "hex", "arabic-4", "fullwidth-4", "exponent"])
def test_plan_set_bits_are_ascii_digits(env, value):
    work = _workdir(env)
    line = _expect_one_line_error("rtfq plan", rtfq, ["plan", "--checkpoint", env["ckpt"], "--subnet", "r32-w1.00-q8",
                                                      "--set", f"layer1.*={value}", "-o", work / "p.json"], work)
    assert "expected PATTERN=BITS" in line and len(line) < 300, line


@pytest.mark.parametrize("value", ["\u0661\u0666", "1_6", "\uff11\uff16", "16\u00b2"])
def test_integer_options_take_ascii_digits_only(env, value):
    """int() reads '\u0661\u0666' and '1_6' as 16: every BoundedInt option refuses them."""
    work = _workdir(env)
    _expect_one_line_error("rtfq-export", export, ["--checkpoint", env["ckpt"], "--budget", "1G", "--verify-samples",
                                                   value, "-o", work / "m.onnx"], work)


@pytest.mark.parametrize("command,args", [
    ("rtfq search", ["--lambda", "0"]), ("rtfq search", ["--lambda", "1e-320"]), ("rtfq search", ["--lambda", "0.001"]),
    ("rtfq search", ["--rescore", "100000"]), ("rtfq search", ["--rescore", "1025"]),
    ("rtfq search", ["--search-images", "100000"]), ("rtfq search", ["--search-images", "1"]),
    ("rtfq-export", ["--lambda", "0"]), ("rtfq-export", ["--rescore", "100000"]),
    ("rtfq-export", ["--search-images", "100000"]),
])
def test_degenerate_search_settings_are_refused(env, images, command, args):
    """A search normally takes a second; these never returned (or scored 100,000 images per plan)."""
    work = _workdir(env)
    common = ["--checkpoint", env["ckpt"], "--budget", images["budget"], "--data", images["good"], *args]
    if command == "rtfq search":
        line = _expect_one_line_error(command, rtfq, ["search", *common, "-o", work / "p.json"], work)
    else:
        line = _expect_one_line_error(command, export, [*common, "--mixed", "-o", work / "m.onnx"], work)
    assert args[0] in line, line


@pytest.mark.parametrize("field,value", [("meta", _DEEP), ("config", _DEEP), ("plans", _DEEP), ("meta", "[1]"),
                                         ("meta", '{"a": NaN}'), ("config", "1" * 5000)],
                         ids=["deep-meta", "deep-config", "deep-plans", "meta-array", "meta-nan", "config-digits"])
def test_json_strings_inside_a_checkpoint_go_through_the_bounded_reader(env, field, value):
    work = _workdir(env)
    obj = torch.load(env["ckpt"], weights_only=True)
    obj[field] = value
    torch.save(obj, work / "c.pt")
    line = _expect_one_line_error("rtfq subnets", rtfq, ["subnets", "--checkpoint", work / "c.pt"], work)
    assert f"its '{field}'" in line, line
