from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rtfq_deploy.calibrate import calibrate_bn
from rtfq_deploy.checkpoint import (
    FORMAT,
    load_checkpoint,
    load_pretrained,
    read_state_dict,
    safe_torch_load,
    save_checkpoint,
)
from rtfq_deploy.errors import CheckpointError
from rtfq_deploy.fileio import atomic_write
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.space import SearchSpace, SubnetConfig
from tests.fixtures.torchvision_ref import synth_state_dict


def _saved(tmp_path: Path, model, name: str = "sn.pt", **kwargs) -> Path:
    path = tmp_path / name
    save_checkpoint(path, model, **kwargs)
    return path


def test_round_trip_keeps_everything(tmp_path):
    space = SearchSpace(resolutions=(64, 48), widths=(1.0, 0.5), bits=(6, 3))
    model = build_supernet(SupernetConfig("tiny_resnet", num_classes=7, space=space))
    with torch.no_grad():
        model.layer1[0].q1.step.mul_(1.7)  # non-default step sizes survive
    stats = calibrate_bn(model, model.active(SubnetConfig(64, 0.5, 3)), [torch.randn(2, 3, 64, 64)])
    path = _saved(tmp_path, model, bn_stats={"r64-w0.50-q3": stats}, meta={"class_names": list("abcdefg")})
    ckpt = load_checkpoint(path)
    assert ckpt.model.config == model.config
    assert ckpt.meta == {"class_names": list("abcdefg")}
    assert torch.equal(ckpt.bn_stats["r64-w0.50-q3"]["bn1"][0], stats["bn1"][0])
    own, back = model.state_dict(), ckpt.model.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    x = torch.randn(2, 3, 48, 48)
    cfg = SubnetConfig(48, 0.5, 3)
    model.eval(), ckpt.model.eval()
    assert torch.equal(model(x, model.active(cfg)), ckpt.model(x, ckpt.model.active(cfg)))


def test_no_overwrite_without_permission(tmp_path, tiny):
    path = _saved(tmp_path, tiny)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_checkpoint(path, build_supernet(SupernetConfig("tiny_resnet", num_classes=3)))
    assert path.read_bytes() == before
    save_checkpoint(path, build_supernet(SupernetConfig("tiny_resnet", num_classes=3)), overwrite=True)
    assert load_checkpoint(path).model.config.num_classes == 3


@pytest.mark.parametrize("overwrite", [True, False])
def test_failed_write_leaves_destination_and_no_temp_file(tmp_path, overwrite):
    dest = tmp_path / "out.bin"
    if overwrite:
        dest.write_bytes(b"old and good")
    with pytest.raises(RuntimeError):
        with atomic_write(dest, overwrite=overwrite) as f:
            f.write(b"half a file")
            raise RuntimeError("disk full")
    assert (dest.read_bytes() == b"old and good") if overwrite else not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out.bin"] if overwrite else [])


_WRITER = """
import sys, torch
from rtfq_deploy.checkpoint import save_checkpoint
from rtfq_deploy.models import SupernetConfig, build_supernet
model = build_supernet(SupernetConfig("resnet18"))
while True:
    print("saving", flush=True)
    save_checkpoint(sys.argv[1], model, overwrite=True)
"""


def test_sigkill_during_writes_never_leaves_a_broken_checkpoint(tmp_path):
    dest = tmp_path / "sn.pt"
    for delay in (0.0, 0.05, 0.15):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(dest)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "saving\n"
            assert proc.stdout.readline() == "saving\n"  # one complete write is in place
            time.sleep(delay)  # ... and the next one is under way
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert load_checkpoint(dest).model.config.arch == "resnet18"
        # Only temp files of killed writers are left beside it, never under the real name.
        assert all(p == dest or p.name.startswith(".sn.pt.") for p in tmp_path.iterdir())


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_file_with_pickled_code_is_refused_without_running_it(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "state_dict": _Exploit(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_state_dict(path)
    assert not marker.exists()


def test_truncated_corrupt_and_empty_files(tmp_path, tiny):
    good = _saved(tmp_path, tiny).read_bytes()
    for name, data in (("trunc.pt", good[: len(good) // 2]), ("empty.pt", b""), ("noise.pt", os.urandom(4096)),
                       ("text.pt", b"hello, world\n")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"not a regular file \(a directory\)"):
        load_checkpoint(tmp_path)


def test_foreign_and_wrong_architecture_files(tmp_path, tiny):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an rtfq supernet checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    payload = safe_torch_load(_saved(tmp_path, tiny))
    config = json.loads(payload["config"])
    config["arch"] = "resnet18"
    torch.save({**payload, "config": json.dumps(config)}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="do not match architecture 'resnet18'.*wrong shape"):
        load_checkpoint(tmp_path / "wrong.pt")
    config["arch"] = "vgg16"
    torch.save({**payload, "config": json.dumps(config)}, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="unknown architecture 'vgg16'"):
        load_checkpoint(tmp_path / "unknown.pt")
    torch.save({**payload, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({k: v for k, v in payload.items() if k != "bn_stats"}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="malformed checkpoint"):
        load_checkpoint(tmp_path / "partial.pt")


def _torchvision_keys(model) -> list[tuple[str, list[int]]]:
    quant = {f"{n}.{k}" for n, q in model.quantizers() for k in q.state_dict()}
    return [(k, list(v.shape)) for k, v in model.state_dict().items() if k not in quant]


def test_torchvision_weights_file_loads_and_reinitialises_the_classifier(tmp_path):
    keys = _torchvision_keys(build_supernet(SupernetConfig("resnet50")))
    sd = synth_state_dict(keys)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "tv.pth")
    model = build_supernet(SupernetConfig("resnet50", num_classes=31))
    fc_before = model.fc.weight.clone()
    notes = load_pretrained(model, read_state_dict(tmp_path / "tv.pth"))
    assert notes[0] == "classifier re-initialised: weights have 1000 classes, supernet 31"
    assert torch.equal(model.layer3[4].conv2.weight, sd["layer3.4.conv2.weight"])
    assert torch.equal(model.layer2[0].downsample[1].running_var, sd["layer2.0.downsample.1.running_var"])
    assert torch.equal(model.fc.weight, fc_before)
    # Weight step sizes follow the loaded weights (LSQ init), not the random init.
    w = sd["layer1.0.conv1.weight"]
    expected = 2 * w.abs().flatten(1).mean(dim=1) / (2 ** 3 - 1) ** 0.5
    assert torch.allclose(model.layer1[0].conv1.weight_quant.scale(4), expected)


def test_weights_of_another_architecture_are_refused(tmp_path):
    sd = synth_state_dict(_torchvision_keys(build_supernet(SupernetConfig("resnet18"))))
    with pytest.raises(CheckpointError, match="weights do not fit 'resnet50'.*missing"):
        load_pretrained(build_supernet(SupernetConfig("resnet50")), sd)
    tiny = build_supernet(SupernetConfig("tiny_resnet"))
    save_checkpoint(tmp_path / "sn.pt", tiny)
    with pytest.raises(CheckpointError, match="rtfq supernet checkpoint, not a pretrained weights file"):
        read_state_dict(tmp_path / "sn.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_atomic_write_gives_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new.bin") as f:
            f.write(b"x")
        assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o644
        (tmp_path / "kept.bin").write_bytes(b"y")
        (tmp_path / "kept.bin").chmod(0o600)
        with atomic_write(tmp_path / "kept.bin", overwrite=True) as f:
            f.write(b"z")
        assert (tmp_path / "kept.bin").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_cached_bn_statistics_are_validated_on_load(tmp_path, tiny):
    cfg = SubnetConfig(128, 0.6, 4)
    stats = calibrate_bn(tiny, tiny.active(cfg), [torch.randn(2, 3, 128, 128)])
    good = _saved(tmp_path, tiny, name="good.pt", bn_stats={str(cfg): stats})
    assert load_checkpoint(good).bn_stats[str(cfg)]["bn1"][0].shape == (8,)
    bad_cases = {
        "key.pt": ({"nonsense": stats}, "key 'nonsense'"),
        "outside.pt": ({"r64-w0.60-q4": stats}, "not in the space"),
        "width.pt": ({"r224-w1.00-q4": stats}, r"expected \(16,\)"),
        "missing.pt": ({str(cfg): {k: v for k, v in stats.items() if k != "bn1"}}, "statistics for"),
    }
    for name, (bn_stats, needle) in bad_cases.items():
        path = _saved(tmp_path, tiny, name=name, bn_stats=bn_stats)
        with pytest.raises(CheckpointError, match=needle):
            load_checkpoint(path)


def test_malformed_config_values_and_dtypes_are_refused(tmp_path, tiny):
    payload = safe_torch_load(_saved(tmp_path, tiny))
    config = json.loads(payload["config"])
    torch.save({**payload, "config": json.dumps({**config, "num_classes": -1})}, tmp_path / "neg.pt")
    with pytest.raises(CheckpointError, match="number of classes must be >= 1"):
        load_checkpoint(tmp_path / "neg.pt")
    torch.save({**payload, "config": json.dumps({**config, "policy": {"edge_bits": 12, "residual_bits": 8}})},
               tmp_path / "bits.pt")
    with pytest.raises(CheckpointError, match="between 2 and 8"):
        load_checkpoint(tmp_path / "bits.pt")
    sd = dict(payload["state_dict"])
    sd["conv1.weight"] = sd["conv1.weight"].to(torch.complex64)
    torch.save({**payload, "state_dict": sd}, tmp_path / "complex.pt")
    with pytest.raises(CheckpointError, match="conv1.weight .* complex64 vs .* float32"):
        load_checkpoint(tmp_path / "complex.pt")


def test_old_torchvision_files_without_batchnorm_counters_load():
    model = build_supernet(SupernetConfig("resnet18"))
    sd = {k: v for k, v in synth_state_dict(_torchvision_keys(model)).items() if "num_batches_tracked" not in k}
    load_pretrained(model, sd)
    assert torch.equal(model.layer1[0].bn1.running_var, sd["layer1.0.bn1.running_var"])


def test_unwritable_destination_is_named_in_the_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError, match=f"cannot write {blocker}/x.pt"):
        with atomic_write(blocker / "x.pt"):
            pass
