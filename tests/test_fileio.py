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


# -- writes never go through a special file or a link; reads only from regular files ---------------------------

@pytest.mark.parametrize("kind", ["fifo", "directory", "link-to-fifo", "link-to-char-device"])
def test_atomic_write_refuses_an_output_that_is_not_a_regular_file_even_with_overwrite(tmp_path, kind):
    from rtfq_deploy.fileio import atomic_write

    out = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "directory":
        out.mkdir()
    elif kind == "link-to-fifo":
        os.mkfifo(tmp_path / "pipe")
        out.symlink_to(tmp_path / "pipe")
    else:
        out.symlink_to("/dev/null")  # never replaced: the link stays a link to the device
    with pytest.raises(RtfqError, match="not a regular file; refusing to replace it"):
        with atomic_write(out, overwrite=True) as f:
            f.write(b"data")
    assert out.is_dir() if kind == "directory" else (out.is_fifo() or out.is_symlink())
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_replaces_a_link_to_a_regular_file_without_writing_through_it(tmp_path):
    from rtfq_deploy.fileio import atomic_write

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "out").symlink_to(victim)
    with atomic_write(tmp_path / "out", overwrite=True) as f:
        f.write(b"new")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out").read_bytes() == b"new"


def test_the_temporary_file_is_created_exclusively_and_never_through_a_link(tmp_path, monkeypatch):
    """Whatever sits at the temporary's name (here: a link planted at the name the writer
    will draw), the writer never opens it; with another name drawn it writes its own file."""
    import secrets

    from rtfq_deploy import fileio

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    names = iter(["deadbeef", "0badf00d"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))
    planted = tmp_path / f".out.{os.getpid()}.deadbeef.tmp"
    planted.symlink_to(victim)
    with pytest.raises(OSError, match="cannot write"):
        with fileio.atomic_write(tmp_path / "out", overwrite=True) as f:
            f.write(b"new")
    assert victim.read_bytes() == b"precious" and not (tmp_path / "out").exists()
    with fileio.atomic_write(tmp_path / "out", overwrite=True) as f:
        f.write(b"new")
    assert (tmp_path / "out").read_bytes() == b"new" and victim.read_bytes() == b"precious"


@pytest.mark.parametrize("target,needle", [
    ("fifo", r"not a regular file \(a FIFO\)"), ("/dev/zero", r"not a regular file \(a character device\)"),
    ("dir", r"not a regular file \(a directory\)"), ("missing", "no such file"),
])
def test_reads_open_only_regular_files_and_never_wait(tmp_path, target, needle):
    from rtfq_deploy.fileio import open_regular, read_bounded, sha256_file

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    path = target if target.startswith("/") else tmp_path / target
    start = time.monotonic()
    for read in (lambda: open_regular(path, "thing"), lambda: read_bounded(path, "thing", 100),
                 lambda: sha256_file(path), lambda: read_json(path, "thing")):
        with pytest.raises(RtfqError, match=needle):
            read()
    assert time.monotonic() - start < 5


def test_read_bounded_caps_the_size(tmp_path):
    from rtfq_deploy.fileio import read_bounded

    (tmp_path / "f").write_bytes(b"x" * 101)
    assert read_bounded(tmp_path / "f", "thing", 101) == b"x" * 101
    with pytest.raises(RtfqError, match="larger than 100 bytes"):
        read_bounded(tmp_path / "f", "thing", 100)


@pytest.mark.parametrize("content,needle", [
    (b'{"a": 1, "a": 2}', "has the key 'a' twice"),
    (b'{"x": [{"b": 1, "c": 2, "b": 3}]}', "has the key 'b' twice"),
])
def test_duplicate_keys_are_refused(tmp_path, content, needle):
    (tmp_path / "f.json").write_bytes(content)
    with pytest.raises(RtfqError, match=needle):
        read_json(tmp_path / "f.json", "table")
