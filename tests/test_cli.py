from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rtfq_deploy.checkpoint import load_checkpoint
from rtfq_deploy.cli.bench import bench
from rtfq_deploy.cli.export import export
from rtfq_deploy.cli.main import rtfq
from rtfq_deploy.cli.serve import serve
from rtfq_deploy.cli.train import train
from rtfq_deploy.costs import space_costs
from rtfq_deploy.models import SupernetConfig, build_supernet
from tests.fixtures.torchvision_ref import synth_state_dict

SCRIPTS = ["rtfq", "rtfq-export", "rtfq-bench", "rtfq-train", "rtfq-serve"]


def _run(*args: str) -> subprocess.CompletedProcess:
    """A console script as a user runs it (the installed entry point, a real process)."""
    exe = Path(sys.executable).parent / args[0]
    return subprocess.run([str(exe), *args[1:]], capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    err = result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert result.returncode == 2, err
    assert result.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("command,args", [
    (rtfq, []), (rtfq, ["init"]), (rtfq, ["subnets"]), (rtfq, ["fetch"]), (export, []), (bench, []), (bench, ["run"]),
    (bench, ["select"]), (train, []), (serve, []), (rtfq, ["data"]), (rtfq, ["data", "synth"]), (rtfq, ["eval"]),
    (rtfq, ["enroll"]),
])
def test_every_command_answers_help(command, args):
    result = CliRunner().invoke(command, [*args, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output, result.output


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_are_installed(script):
    result = _run(script, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_group_help_shows_whole_command_summaries():
    result = CliRunner().invoke(rtfq, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    assert "..." not in result.output.split("Commands:")[1]
    assert "torchvision ImageNet" in result.output and "weights)." in result.output and "budget." in result.output


def test_bare_group_prints_its_help():
    result = _run("rtfq")
    assert result.returncode == 0 and result.stdout.startswith("Usage: rtfq") and result.stderr == ""


def test_init_then_subnets_end_to_end(tmp_path):
    ckpt = tmp_path / "supernet.pt"
    result = _run("rtfq", "init", "--arch", "tiny_resnet", "--num-classes", "5", "-o", str(ckpt))
    assert result.returncode == 0, result.stderr
    assert "48 subnets" in result.stdout
    listed = _run("rtfq", "subnets", "--checkpoint", str(ckpt), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    model = load_checkpoint(ckpt).model
    costs = space_costs(model)
    assert len(rows) == 48 == len({r["subnet"] for r in rows})
    for row in rows:
        c = costs[model.config.space.parse(row["subnet"])]
        assert (row["macs"], row["bitops"], row["params"], row["weight_bytes"]) == (c.macs, c.bitops, c.params, c.weight_bytes)
    assert [r["macs"] for r in rows] == sorted(r["macs"] for r in rows)
    table = _run("rtfq", "subnets", "--checkpoint", str(ckpt), "--sort", "bitops")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["subnet", "GMACs", "GBitOPs"] and len(lines) == 2 + 48
    assert lines[2].split()[0] == "r128-w0.60-q4"  # the cheapest in BitOPs


def test_init_custom_space_and_policy(tmp_path):
    ckpt = tmp_path / "s.pt"
    result = CliRunner().invoke(rtfq, ["init", "--arch", "tiny_resnet", "--resolutions", "96,64", "--widths", "1,0.5",
                                       "--bits", "4,2", "--edge-bits", "q", "--residual-bits", "6", "-o", str(ckpt)])
    assert result.exit_code == 0, result.output
    config = load_checkpoint(ckpt).model.config
    assert config.space.resolutions == (96, 64) and config.space.bits == (4, 2)
    assert config.policy.edge_bits is None and config.policy.residual_bits == 6
    rows = json.loads(CliRunner().invoke(rtfq, ["subnets", "--checkpoint", str(ckpt), "--json"]).output)
    assert len(rows) == 8


def test_init_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a.pt", "1"), ("b.pt", "1"), ("c.pt", "2")):
        assert CliRunner().invoke(rtfq, ["init", "--arch", "tiny_resnet", "--seed", seed, "-o", str(tmp_path / name)]).exit_code == 0
    a, b, c = (load_checkpoint(tmp_path / n).model.state_dict() for n in ("a.pt", "b.pt", "c.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_init_from_torchvision_weights(tmp_path):
    model = build_supernet(SupernetConfig("resnet18"))
    quant = {f"{n}.{k}" for n, q in model.quantizers() for k in q.state_dict()}
    sd = synth_state_dict([(k, list(v.shape)) for k, v in model.state_dict().items() if k not in quant])
    torch.save(sd, tmp_path / "resnet18.pth")
    result = CliRunner().invoke(rtfq, ["init", "--arch", "resnet18", "--pretrained", str(tmp_path / "resnet18.pth"),
                                       "--num-classes", "31", "-o", str(tmp_path / "s.pt")])
    assert result.exit_code == 0, result.output
    assert "classifier re-initialised: weights have 1000 classes, supernet 31" in result.output
    loaded = load_checkpoint(tmp_path / "s.pt").model
    assert torch.equal(loaded.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    ckpt = tmp_path / "s.pt"
    assert _run("rtfq", "init", "--arch", "tiny_resnet", "-o", str(ckpt)).returncode == 0
    before = ckpt.read_bytes()
    _one_line_error(_run("rtfq", "init", "--arch", "tiny_resnet", "-o", str(ckpt)), "exists (use --force")
    assert ckpt.read_bytes() == before
    _one_line_error(_run("rtfq", "subnets", "--checkpoint", str(tmp_path / "nope.pt")), "no such file")
    (tmp_path / "bad.pt").write_bytes(before[:1000])
    _one_line_error(_run("rtfq", "subnets", "--checkpoint", str(tmp_path / "bad.pt")), "not a readable checkpoint")
    _one_line_error(_run("rtfq", "subnets"), "Missing option '--checkpoint'")
    _one_line_error(_run("rtfq", "init", "--bits", "x", "-o", str(tmp_path / "x.pt")), "comma-separated list")
    _one_line_error(_run("rtfq", "init", "--bits", "4,9", "-o", str(tmp_path / "x.pt")), "between 2 and 8")
    _one_line_error(_run("rtfq", "init", "--edge-bits", "twelve", "-o", str(tmp_path / "x.pt")), "bit-width or 'q'")
    _one_line_error(_run("rtfq", "init", "--arch", "vgg", "-o", str(tmp_path / "x.pt")), "'vgg' is not one of")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "w.pth")
    _one_line_error(_run("rtfq", "init", "--pretrained", str(tmp_path / "w.pth"), "-o", str(tmp_path / "x.pt")),
                    "weights do not fit 'resnet50'")
    _one_line_error(_run("rtfq", "frobnicate"), "No such command")
    assert not (tmp_path / "x.pt").exists()


def test_cli_import_does_not_load_torch():
    code = "import sys, rtfq_deploy.cli.main; assert 'torch' not in sys.modules, 'torch imported at CLI import'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
