"""rtfq-train under damage: a diverging run writes no NaN checkpoint, a failed start leaves
nothing behind, and --resume checks what it reads (tolerating a cut last metrics line)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rtfq_deploy.checkpoint import save_checkpoint
from rtfq_deploy.cli.train import train
from rtfq_deploy.data.synth import SynthConfig, generate
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.space import SearchSpace
from rtfq_deploy.train.state import STATE_FORMAT

SPACE = SearchSpace(resolutions=(32,), widths=(1.0, 0.5), bits=(8,))  # two subnets: fast steps
FAST = ["--batch-size", "4", "--log-every", "1", "--calib-images", "4", "--workers", "0", "--steps", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    generate(root / "data", SynthConfig(classes=3, per_class=4, test_per_class=1, size=32, seed=0))
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE))
    save_checkpoint(root / "init.pt", model)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))  # what a diverged run would have left
    save_checkpoint(root / "nan.pt", model)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([3e38, -3e38, -3e38]))  # finite, but the loss overflows at the first step
    save_checkpoint(root / "huge.pt", model)
    return root


def _train(*args) -> tuple[int, str]:
    handlers = logging.getLogger().handlers[:]
    try:
        result = CliRunner().invoke(train, [str(a) for a in args])
    finally:
        logging.getLogger().handlers[:] = handlers
    assert "Traceback" not in result.stderr and (result.exception is None or isinstance(result.exception, SystemExit))
    return result.exit_code, result.stderr


def _one_line(code_err: tuple[int, str], needle: str) -> None:
    code, err = code_err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("step ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], err


def _fresh(setup: Path, out: Path, checkpoint: str = "init.pt", source: str = "source") -> tuple[int, str]:
    return _train("--checkpoint", setup / checkpoint, "--source", setup / "data" / source, "--target",
                  setup / "data" / "target", "--out", out, *FAST)


def test_a_diverging_run_stops_and_writes_no_nan_checkpoint(setup, tmp_path):
    out = tmp_path / "huge"
    _one_line(_fresh(setup, out, "huge.pt"), "training diverged at step 1")
    assert not (out / "supernet.pt").exists() and not (out / "state.pt").exists()


def test_a_nan_checkpoint_is_refused_before_training(setup, tmp_path):
    _one_line(_fresh(setup, tmp_path / "nan", "nan.pt"), "weight fc.weight holds NaN or infinity")
    assert not (tmp_path / "nan").exists()


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory) -> Path:
    """A failed start (a bad source folder), then a good one into the same --out."""
    out = tmp_path_factory.mktemp("finished") / "run"
    _one_line(_fresh(setup, out, source="no_such_folder"), "does not exist")
    assert not out.exists()
    code, err = _fresh(setup, out)
    assert code == 0, err
    return out


def test_a_failed_start_leaves_nothing_that_blocks_the_next(finished):
    assert (finished / "supernet.pt").exists() and (finished / "run.json").exists()


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


def test_resume_drops_a_cut_last_metrics_line(finished, tmp_path):
    run = _copy(finished, tmp_path)
    whole = (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 0, "lr": 0.0002, "lo')  # a kill in mid-line
    code, err = _train("--resume", run)
    assert code == 0, err
    assert (run / "metrics.jsonl").read_text() == whole


@pytest.mark.parametrize("damage,needle", [
    (lambda run: (run / "run.json").write_bytes(b"\x00\xff garbage"), "run.json: not JSON"),
    (lambda run: (run / "run.json").write_text('{"config": {"lr": "fast"}, "checkpoint": 1}'), "damaged run record"),
    (lambda run: (run / "run.json").write_text(json.dumps({**json.loads((run / "run.json").read_text()),
                                                           "config": {"lr": -1}})), "--lr must be"),
    (lambda run: (run / "state.pt").write_bytes((run / "state.pt").read_bytes()[:5000]), "not a readable checkpoint"),
    (lambda run: torch.save({"format": STATE_FORMAT, "version": 1, "step": 1, "student": {"w": torch.zeros(2)},
                             "teacher": {}, "optimizer": {}}, run / "state.pt"), "damaged training state"),
    (lambda run: torch.save({"format": STATE_FORMAT, "version": 1, "step": 10**9}, run / "state.pt"),
     "damaged training state"),
    (lambda run: (run / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 0}\n'), "line 2 is damaged"),
])
def test_resume_of_a_damaged_run_is_one_line(finished, tmp_path, damage, needle):
    run = _copy(finished, tmp_path)
    damage(run)
    before = (run / "supernet.pt").read_bytes()
    _one_line(_train("--resume", run), needle)
    assert (run / "supernet.pt").read_bytes() == before


# -- integrity of what --resume trusts: archive CRCs, the run's identity, special files ----------------------

def _flip_weight_bytes(path: Path, count: int = 8) -> None:
    """Flip ``count`` bytes inside the largest tensor of a torch.save archive (its data, not
    the zip structure): what a bad disk sector or a bit rot does."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 3
    for i in range(count):
        data[start + 4 * i] ^= 0x5A
    path.write_bytes(bytes(data))


def _edit_record(run: Path, **config) -> None:
    record = json.loads((run / "run.json").read_text())
    record["config"].update(config)
    (run / "run.json").write_text(json.dumps(record))


def test_flipped_bytes_in_state_pt_are_refused(finished, tmp_path):
    run = _copy(finished, tmp_path)
    _flip_weight_bytes(run / "state.pt")
    before = (run / "supernet.pt").read_bytes()
    _one_line(_train("--resume", run), "fails the checksum check")
    assert (run / "supernet.pt").read_bytes() == before


def test_flipped_bytes_in_the_checkpoint_are_refused(setup, tmp_path):
    shutil.copy(setup / "init.pt", tmp_path / "init.pt")
    _flip_weight_bytes(tmp_path / "init.pt")
    _one_line(_train("--checkpoint", tmp_path / "init.pt", "--source", setup / "data" / "source", "--target",
                     setup / "data" / "target", "--out", tmp_path / "run", *FAST), "fails the checksum check")


@pytest.mark.parametrize("edit,needle", [
    ({"seed": 1}, "its seed differs"),
    ({"rule": "max6min"}, "its sampling rule differs"),
])
def test_a_state_of_another_run_is_refused(finished, tmp_path, edit, needle):
    """run.json says one run, state.pt is another's (another seed, another rule)."""
    run = _copy(finished, tmp_path)
    _edit_record(run, **edit)
    before = (run / "supernet.pt").read_bytes()
    _one_line(_train("--resume", run), needle)
    assert (run / "supernet.pt").read_bytes() == before


def test_a_checkpoint_replaced_since_the_run_started_is_refused(setup, finished, tmp_path):
    run = _copy(finished, tmp_path)
    record = json.loads((run / "run.json").read_text())
    assert len(record["checkpoint_sha256"]) == 64
    shutil.copy(setup / "huge.pt", tmp_path / "other.pt")
    record["checkpoint"] = str(tmp_path / "other.pt")
    (run / "run.json").write_text(json.dumps(record))
    _one_line(_train("--resume", run), "the checkpoint changed since this run started")


def test_a_scheduler_state_naming_an_unknown_quantizer_is_refused(finished, tmp_path):
    run = _copy(finished, tmp_path)
    _edit_record(run, rule="mixed")
    state = torch.load(run / "state.pt", weights_only=True)
    state["identity"]["rule"] = "mixed"
    state["scheduler"] = {"frozen": ["layer9.no_such_quantizer"]}
    torch.save(state, run / "state.pt")
    _one_line(_train("--resume", run), "not a free quantizer")


def test_a_fifo_state_pt_is_named_as_such(finished, tmp_path):
    import os

    run = _copy(finished, tmp_path)
    (run / "state.pt").unlink()
    os.mkfifo(run / "state.pt")
    _one_line(_train("--resume", run), "not a regular file (a FIFO)")
