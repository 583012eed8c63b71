"""Bounded JSON reading and the clean-up of temporary files a killed writer leaves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import atomic_write, read_json, remove_stale_temporaries

_WRITER = """
import sys, time
from rtfq_deploy.fileio import atomic_write
with atomic_write(sys.argv[1], overwrite=True) as f:
    f.write(b"x" * (1 << 20))
    f.flush()
    print("writing", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.parametrize("content,needle", [
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 64 levels"),
    (b"[" * 65 + b"]" * 65, "nested deeper than 64 levels"),
    (b'{"a": 1e999999}', "not a finite number"),
    (b'{"a": -1e400}', "not a finite number"),
    (b"[" + b"7" * 100_000 + b"]", "an integer of 100000 digits"),
    (b"[NaN]", "NaN, not a finite number"),
    (b'{"a": Infinity}', "Infinity, not a finite number"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b'{"a": ', "not JSON"),
    (b"", "not JSON"),
    (b"[1, 2]", "must be a JSON object, not an array"),
    (b'"text"', "must be a JSON object, not a string"),
])
def test_hostile_json_is_one_error(tmp_path, content, needle):
    (tmp_path / "f.json").write_bytes(content)
    with pytest.raises(RtfqError, match=needle) as info:
        read_json(tmp_path / "f.json", "table", expect=dict)
    assert "\n" not in str(info.value)


def test_size_cap_and_honest_files(tmp_path):
    (tmp_path / "f.json").write_bytes(b'{"a": [1, 2.5, "x", null, true], "b": {"c": -3}}')
    assert read_json(tmp_path / "f.json", "table") == {"a": [1, 2.5, "x", None, True], "b": {"c": -3}}
    with pytest.raises(RtfqError, match="larger than"):
        read_json(tmp_path / "f.json", "table", max_bytes=10)
    with pytest.raises(RtfqError, match="cannot read table"):
        read_json(tmp_path / "missing.json", "table")
    with pytest.raises(RtfqError, match="cannot read table"):
        read_json(tmp_path, "table")


def test_a_fifo_does_not_hang_the_reader(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    t0 = time.monotonic()
    with pytest.raises(RtfqError, match="not a regular file"):
        read_json(tmp_path / "pipe", "table")
    assert time.monotonic() - t0 < 5


def _start_writer(dest: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(dest), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _temporaries(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}.*.tmp"))


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    dest = tmp_path / "model.onnx"
    proc = _start_writer(dest, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _temporaries(dest)
    assert len(left) == 1 and left[0].stat().st_size == 1 << 20 and f".{proc.pid}." in left[0].name
    assert not dest.exists()
    with atomic_write(dest) as f:
        f.write(b"new")
    assert dest.read_bytes() == b"new" and _temporaries(dest) == []


def test_a_live_writers_temporary_is_kept(tmp_path):
    dest = tmp_path / "results.json"
    proc = _start_writer(dest, 1)
    try:
        with atomic_write(dest, overwrite=True) as f:  # a concurrent writer of the same file
            f.write(b"first")
        assert len(_temporaries(dest)) == 1  # the other writer's, untouched
    finally:
        assert proc.wait(timeout=30) == 0  # and it still publishes its file
    assert dest.read_bytes() == b"x" * (1 << 20) and _temporaries(dest) == []


def test_old_temporaries_without_a_pid_are_removed_and_others_left(tmp_path):
    dest = tmp_path / "a.bin"
    legacy = tmp_path / ".a.bin.k2j3h4.tmp"  # the name older versions gave (no pid)
    fresh_legacy = tmp_path / ".a.bin.zzzzzz.tmp"
    other = tmp_path / ".b.bin.1.x.tmp"  # another destination's: never touched
    for p in (legacy, fresh_legacy, other):
        p.write_bytes(b"old")
    old = time.time() - 7 * 3600
    os.utime(legacy, (old, old))
    assert remove_stale_temporaries(dest) == [legacy]
    assert fresh_legacy.exists() and other.exists()


def test_select_sweeps_what_a_killed_select_left(tmp_path):
    """A killed copy of a subnet the next run does not choose is still removed."""
    from tests.test_bench_select import _select, make_results

    results = make_results(tmp_path)
    dest = tmp_path / "dist" / "dev" / "r96-w1.00-q8.onnx"
    proc = _start_writer(dest, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_temporaries(dest)) == 1
    assert _select(results, tmp_path / "dist", "3ms", extra=["--device", "dev", "--no-report"]).returncode == 0
    assert not dest.exists() and _temporaries(dest) == []  # 3ms chose r64-w0.50-q4, and the leftover is gone
