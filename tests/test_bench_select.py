"""Selection and publishing on hand-made results: real files, real DIST_DIR, real processes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rtfq_deploy import manifest as mf
from rtfq_deploy.bench.run import FORMAT
from rtfq_deploy.bench.select import SelectOptions, plan, publish
from rtfq_deploy.budget import parse_budget
from rtfq_deploy.errors import RtfqError
from tests.test_cli import _one_line_error, _run

# subnet: (accuracy, p50 ms, p90 ms, memory, memory without arena, size, MACs)
TABLE = {
    "r64-w0.50-q4": (0.60, 2.0, 2.4, 30e6, 20e6, 1_000, 10_000_000),
    "r64-w1.00-q4": (0.70, 5.0, 5.5, 40e6, 30e6, 3_000, 30_000_000),
    "r96-w0.50-q8": (0.70, 4.0, 4.2, 45e6, 35e6, 2_000, 20_000_000),
    "r96-w1.00-q8": (0.80, 9.0, 9.9, 60e6, 50e6, 6_000, 60_000_000),
}


def make_results(tmp_path: Path, table=TABLE, cpu="Test CPU 9000", failed=True) -> Path:
    models_dir = tmp_path / "models"
    models_dir.mkdir(exist_ok=True)
    rows = []
    for subnet, (acc, p50, p90, mem, mem_na, size, macs) in table.items():
        path = models_dir / f"{subnet}.onnx"
        path.write_bytes((subnet.encode() * size)[:size])
        rows.append({"path": str(path), "ok": True, "error": None, "subnet": subnet, "macs": macs, "bitops": macs * 16,
                     "size_bytes": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                     "latency_p50_ms": p50, "latency_p90_ms": p90, "peak_memory_bytes": int(mem),
                     "peak_memory_no_arena_bytes": int(mem_na)})
    if failed:
        rows.append({"path": str(models_dir / "broken.onnx"), "ok": False, "error": "Protobuf parsing failed",
                     "subnet": "broken"})
    results = {"format": FORMAT, "version": 1, "fingerprint": {"cpu_model": cpu, "provider": "CPUExecutionProvider",
                                                                     "threads": 1, "batch_size": 1},
               "settings": {}, "models": rows}
    out = tmp_path / f"results-{cpu.replace(' ', '')}.json"
    out.write_text(json.dumps(results))
    accuracy = tmp_path / "acc.json"
    accuracy.write_text(json.dumps({"subnets": [{"subnet": s, "top1": v[0]} for s, v in table.items()]}))
    return out


def _select(results: Path, dist: Path, *budgets: str, extra=()) -> subprocess.CompletedProcess:
    args = ["rtfq-bench", "select", "--results", str(results), "--accuracy", str(results.parent / "acc.json"),
            "-o", str(dist), *extra]
    for b in budgets:
        args += ["--budget", b]
    return _run(*args)


def _plan(results: Path, *budgets: str, memory="arena"):
    data = json.loads(results.read_text())
    acc = {s: v[0] for s, v in TABLE.items()}
    return data, plan(data, acc, [parse_budget(b) for b in budgets], "dev", SelectOptions(memory=memory))


def test_most_accurate_within_each_budget_ties_and_unmeetable(tmp_path):
    _, sel = _plan(make_results(tmp_path), "5ms", "4.5ms", "latency-p90=4.3ms", "memory=50MB", "size=2500B",
                   "0.025G", "bitops=1", "latency=10ms,size=5000B")
    by_budget = {str(c.budget): c for c in sel.choices}
    assert by_budget["latency=5ms"].entry["subnet"] == "r96-w0.50-q8"  # tie at 0.70: 4.0 ms beats 5.0 ms
    assert by_budget["latency=4.5ms"].entry["subnet"] == "r96-w0.50-q8"
    assert by_budget["latency-p90=4.3ms"].entry["subnet"] == "r96-w0.50-q8"
    assert by_budget["memory=50MB"].entry["subnet"] == "r64-w1.00-q4"  # tie at 0.70: 40 MB beats 45 MB
    assert by_budget["size=0.0025MB"].entry["subnet"] == "r96-w0.50-q8"  # r64-w1.00-q4 is 3000 B
    assert by_budget["macs=0.025G"].entry["subnet"] == "r96-w0.50-q8"
    assert by_budget["latency=10ms,size=0.005MB"].entry["subnet"] == "r96-w0.50-q8"  # r96-w1.00-q8 is 6000 B
    unmet = by_budget["bitops=1e-09G"]
    assert not unmet.met and unmet.entry["subnet"] == "r64-w0.50-q4" and "cheapest option is r64-w0.50-q4" in unmet.reason
    assert [e["subnet"] for e in sel.fronts["latency_p50_ms"]] == ["r64-w0.50-q4", "r96-w0.50-q8", "r96-w1.00-q8"]
    assert [e["subnet"] for e in sel.fronts["peak_memory_bytes"]] == ["r64-w0.50-q4", "r64-w1.00-q4", "r96-w1.00-q8"]
    assert any("broken.onnx: failed" in s for s in sel.skipped)


def test_memory_budget_can_use_the_no_arena_figure(tmp_path):
    _, sel = _plan(make_results(tmp_path), "memory=50MB", memory="no-arena")
    assert sel.choices[0].entry["subnet"] == "r96-w1.00-q8"  # 50 MB without the arena


def test_publish_writes_files_and_a_valid_manifest(tmp_path):
    results, dist = make_results(tmp_path), tmp_path / "dist"
    result = _select(results, dist, "5ms", "latency=10ms", "size=1500B", extra=["--device", "phone"])
    assert result.returncode == 0, result.stderr
    assert "left out: " in result.stdout and "broken.onnx" in result.stdout
    assert "Pareto front, accuracy vs latency p50 (ms): r64-w0.50-q4" in result.stdout
    raw = json.loads((dist / "manifest.json").read_text())
    assert raw["format"] == "rtfq-manifest" and raw["version"] == 1 and list(raw["devices"]) == ["phone"]
    device = mf.read_manifest(dist).devices["phone"]
    assert device.fingerprint["cpu_model"] == "Test CPU 9000" and device.updated.endswith("Z")
    files = {e.subnet: e for e in device.files}
    assert set(files) == {"r96-w0.50-q8", "r96-w1.00-q8", "r64-w0.50-q4"}  # r64-w1.00-q4 serves no budget
    assert files["r96-w0.50-q8"].budgets == ("latency=5ms",)
    assert files["r96-w1.00-q8"].budgets == ("latency=10ms",)
    for entry in device.files:
        written = dist / entry.path
        assert entry.path == f"phone/{entry.subnet}.onnx"
        assert mf.sha256_file(written) == entry.sha256 == hashlib.sha256(written.read_bytes()).hexdigest()
        assert written.read_bytes() == (tmp_path / "models" / f"{entry.subnet}.onnx").read_bytes()
        assert entry.size_bytes == written.stat().st_size
        t = TABLE[entry.subnet]
        assert (entry.accuracy, entry.latency_p50_ms, entry.latency_p90_ms, entry.peak_memory_bytes, entry.macs) == \
               (t[0], t[1], t[2], t[3], t[6])
    assert not (dist / "phone" / "r64-w1.00-q4.onnx").exists()
    report = (dist / "phone" / "report.html").read_text()
    assert "data:image/png;base64," in report and "r96-w1.00-q8" in report and "<table>" in report
    assert "<th>peak memory (MB)</th>" in report and "<th>file size (MB)</th>" in report and "<th>GMACs</th>" in report
    assert "_bytes</th>" not in report and "<td>60.00</td>" in report  # 60e6 bytes of memory, shown in MB
    assert "<td>0.060</td>" in report and "0.06G" not in report  # 60e6 MACs: rounded GMACs
    assert (dist / "phone" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_devices_coexist_and_a_rerun_replaces_only_its_own(tmp_path):
    dist = tmp_path / "dist"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_results(tmp_path / "a", cpu="Alpha CPU")
    b = make_results(tmp_path / "b", cpu="Beta CPU")
    assert _select(a, dist, "10ms", extra=["--no-report"]).returncode == 0
    assert _select(b, dist, "3ms", extra=["--no-report"]).returncode == 0
    m = mf.read_manifest(dist)
    assert set(m.devices) == {"alpha-cpu-cpu-t1", "beta-cpu-cpu-t1"}  # default names from the fingerprints
    alpha_before = (dist / "manifest.json").read_text()
    assert [e.subnet for e in m.devices["alpha-cpu-cpu-t1"].files] == ["r96-w1.00-q8"]
    # re-run beta with another budget: its old file goes once the new manifest is in place; alpha is untouched
    result = _select(b, dist, "5ms", extra=["--no-report"])
    assert result.returncode == 0 and "1 copied, 1 removed" in result.stdout
    m2 = mf.read_manifest(dist)
    assert m2.devices["alpha-cpu-cpu-t1"] == m.devices["alpha-cpu-cpu-t1"]
    assert json.loads(alpha_before)["devices"]["alpha-cpu-cpu-t1"] == json.loads((dist / "manifest.json").read_text())["devices"]["alpha-cpu-cpu-t1"]
    assert [e.subnet for e in m2.devices["beta-cpu-cpu-t1"].files] == ["r96-w0.50-q8"]
    assert not (dist / "beta-cpu-cpu-t1" / "r64-w0.50-q4.onnx").exists()
    assert (dist / "alpha-cpu-cpu-t1" / "r96-w1.00-q8.onnx").exists()
    # --keep-old leaves the files the previous entry served
    assert _select(b, dist, "3ms", extra=["--keep-old", "--no-report"]).returncode == 0
    assert (dist / "beta-cpu-cpu-t1" / "r96-w0.50-q8.onnx").exists()


def test_unmeetable_budget_is_reported_and_exit_1(tmp_path):
    results, dist = make_results(tmp_path), tmp_path / "dist"
    result = _select(results, dist, "1ms", "5ms", extra=["--json", "--no-report"])
    assert result.returncode == 1
    assert "UNMET latency=1ms: nothing meets latency=1ms; the cheapest option is r64-w0.50-q4 (latency 2ms)" in result.stderr
    out = json.loads(result.stdout)
    assert [(c["budget"], c["met"], c["subnet"]) for c in out["choices"]] == [
        ("latency=1ms", False, "r64-w0.50-q4"), ("latency=5ms", True, "r96-w0.50-q8")]
    files = mf.read_manifest(dist).devices["test-cpu-9000-cpu-t1"].files
    assert [(e.subnet, e.budgets) for e in files] == [("r96-w0.50-q8", ("latency=5ms",))]  # unmet serves nothing
    nothing = _select(results, tmp_path / "dist2", "1ms")
    assert nothing.returncode == 1 and "nothing written" in nothing.stderr
    assert not (tmp_path / "dist2" / "manifest.json").exists()


def test_dry_run_writes_nothing(tmp_path):
    results, dist = make_results(tmp_path), tmp_path / "dist"
    result = _select(results, dist, "5ms", extra=["--dry-run"])
    assert result.returncode == 0 and "r96-w0.50-q8" in result.stdout
    assert not dist.exists()


def test_select_errors_are_one_line_and_leave_dist_untouched(tmp_path):
    results, dist = make_results(tmp_path), tmp_path / "dist"
    assert _select(results, dist, "5ms", extra=["--device", "dev", "--no-report"]).returncode == 0
    before = (dist / "manifest.json").read_bytes()
    _one_line_error(_select(results, dist, "64MB"), "could be peak memory or file size")
    _one_line_error(_select(results, dist, "5ms", extra=["--device", "../evil"]), "invalid device name '../evil'")
    _one_line_error(_select(tmp_path / "acc.json", dist, "5ms"), "not an rtfq-bench results file")
    _one_line_error(_select(tmp_path / "missing.json", dist, "5ms"), "cannot read results")
    data = json.loads(results.read_text())
    data["models"][1]["latency_p50_ms"] = "fast"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(data))
    _one_line_error(_select(tampered, dist, "5ms"), "model row 1 (r64-w1.00-q4) has no valid latency_p50_ms")
    data["version"] = 7
    tampered.write_text(json.dumps(data))
    _one_line_error(_select(tampered, dist, "5ms"), "results version 7 is not supported")
    # a measured file that changed afterwards is refused: its figures are not its own
    model = tmp_path / "models" / "r96-w1.00-q8.onnx"
    original = model.read_bytes()
    model.write_bytes(b"retrained")
    _one_line_error(_select(results, dist, "10ms", extra=["--device", "dev"]), "changed since it was benchmarked")
    model.write_bytes(original)
    # a served file with other content under the same name needs --force
    (dist / "dev" / "r64-w0.50-q4.onnx").write_bytes(b"someone else's")
    _one_line_error(_select(results, dist, "2ms", extra=["--device", "dev"]), "exists with different content")
    assert (dist / "manifest.json").read_bytes() == before
    assert _select(results, dist, "2ms", extra=["--device", "dev", "--force", "--no-report"]).returncode == 0
    assert mf.sha256_file(dist / "dev" / "r64-w0.50-q4.onnx") == \
        mf.read_manifest(dist).devices["dev"].files[0].sha256


def test_publish_skips_a_copy_already_in_place(tmp_path):
    results = make_results(tmp_path)
    data, sel = _plan(results, "5ms")
    first = publish(sel, data, tmp_path / "dist")
    assert first.copied == ("r96-w0.50-q8",)
    inode = (tmp_path / "dist" / "dev" / "r96-w0.50-q8.onnx").stat().st_ino
    again = publish(sel, data, tmp_path / "dist")
    assert again.copied == () and (tmp_path / "dist" / "dev" / "r96-w0.50-q8.onnx").stat().st_ino == inode


def test_duplicate_subnets_in_results_are_an_error(tmp_path):
    results = make_results(tmp_path)
    data = json.loads(results.read_text())
    data["models"].append(dict(data["models"][0], path="/elsewhere/x.onnx"))
    with pytest.raises(RtfqError, match="measured twice"):
        plan(data, {}, [parse_budget("5ms")], "dev")


def test_readers_never_see_a_partial_manifest_while_select_rewrites(tmp_path):
    """A reader polling manifest.json in another process, while select rewrites it again
    and again, only ever reads complete, valid manifests."""
    results, dist = make_results(tmp_path), tmp_path / "dist"
    assert _select(results, dist, "5ms", extra=["--no-report"]).returncode == 0
    reader = subprocess.Popen([sys.executable, "-c", READER, str(dist)], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline() == "reading\n"
    try:
        data = json.loads(results.read_text())
        acc = {s: v[0] for s, v in TABLE.items()}
        for i in range(40):
            budget = ["2ms", "5ms", "10ms"][i % 3]
            sel = plan(data, acc, [parse_budget(budget)], f"dev{i % 4}")
            publish(sel, data, dist)
    finally:
        (dist / "stop").write_text("")
        out, _ = reader.communicate(timeout=60)
    reads, versions, bad = map(int, out.split())
    assert bad == 0 and reads > 0 and versions > 1  # it read while the manifest was being replaced
    assert set(mf.read_manifest(dist).devices) == {"test-cpu-9000-cpu-t1", "dev0", "dev1", "dev2", "dev3"}


READER = """
import sys
from pathlib import Path
from rtfq_deploy.manifest import read_manifest
dist = Path(sys.argv[1]); reads = bad = 0; seen = set()
print("reading", flush=True)
while not (dist / "stop").exists():
    try:
        m = read_manifest(dist)
        assert m.devices
        seen.add(repr(m))
        reads += 1
    except Exception:
        bad += 1
print(reads, len(seen), bad)
"""


# -- tables that lie -----------------------------------------------------------------------------------------------

def _tamper(results: Path, edit) -> Path:
    data = json.loads(results.read_text())
    edit(data)
    out = results.with_name("tampered.json")
    out.write_text(json.dumps(data))
    return out


def test_a_results_row_with_a_lying_size_is_refused(tmp_path):
    results = make_results(tmp_path)
    tampered = _tamper(results, lambda d: d["models"][0].update(size_bytes=5))
    dist = tmp_path / "dist"
    _one_line_error(_select(tampered, dist, "5ms", extra=["--device", "dev", "--no-report"]),
                    "states size_bytes 5, but")
    assert not (dist / "manifest.json").exists()


def test_a_results_row_with_a_lying_sha256_is_refused_even_when_not_chosen(tmp_path):
    results = make_results(tmp_path)
    tampered = _tamper(results, lambda d: d["models"][3].update(sha256="ab" * 32))
    data = json.loads(tampered.read_text())
    with pytest.raises(RtfqError, match=r"results row 3 \(r96-w1.00-q8\): the sha256 it states"):
        plan(data, {}, [parse_budget("2ms")], "dev")


@pytest.mark.parametrize("rows,needle", [
    ([{"subnet": "r64-w0.50-q4", "top1": 1.5}], "is 1.5, outside [0, 1]"),
    ([{"subnet": "r64-w0.50-q4", "top1": -1}], "is -1, outside [0, 1]"),
    ([{"subnet": "r64-w0.50-q4", "top1": 0.5}, {"subnet": "r64-w0.50-q4", "top1": 0.9}], "has two rows"),
])
def test_an_accuracy_table_that_lies_is_refused_by_select(tmp_path, rows, needle):
    results = make_results(tmp_path)
    (tmp_path / "acc.json").write_text(json.dumps({"subnets": rows}))
    _one_line_error(_select(results, tmp_path / "dist", "5ms", extra=["--device", "dev", "--no-report"]), needle)
    assert not (tmp_path / "dist").exists()


def test_an_accuracy_table_of_another_checkpoint_needs_force(tmp_path):
    """The files say which checkpoint they were exported from (rtfq.checkpoint_sha256);
    a table measured on another one is refused unless --force."""
    mine, other = "1" * 64, "2" * 64
    results = _tamper(make_results(tmp_path), lambda d: [r.update(metadata={"rtfq.checkpoint_sha256": mine})
                                                        for r in d["models"] if r["ok"]])
    table = json.loads((tmp_path / "acc.json").read_text())
    (tmp_path / "acc.json").write_text(json.dumps({**table, "checkpoint_sha256": other}))
    dist = tmp_path / "dist"
    _one_line_error(_select(results, dist, "5ms", extra=["--device", "dev", "--no-report"]),
                    "measured on checkpoint 222222222222..., r64-w0.50-q4")
    assert not dist.exists()
    assert _select(results, dist, "5ms", extra=["--device", "dev", "--no-report", "--force"]).returncode == 0
    (tmp_path / "acc.json").write_text(json.dumps({**table, "checkpoint_sha256": mine}))  # the right table: no --force
    assert _select(results, tmp_path / "dist2", "5ms", extra=["--device", "dev", "--no-report"]).returncode == 0


@pytest.mark.parametrize("text,needle", [
    ('{"format": "rtfq-bench-results", "version": 2, "version": 1, "fingerprint": {}, "models": []}',
     "the key 'version' twice"),
    ('{"format": "rtfq-bench-results", "version": true, "fingerprint": {}, "models": []}', "version True"),
])
def test_results_with_duplicate_keys_or_a_boolean_version_are_refused(tmp_path, text, needle):
    (tmp_path / "r.json").write_text(text)
    (tmp_path / "acc.json").write_text(json.dumps({"r64-w0.50-q4": 0.5}))
    _one_line_error(_select(tmp_path / "r.json", tmp_path / "dist", "5ms"), needle)
