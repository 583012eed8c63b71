"""The hostile sweep of issue 26, repeatable: hostile images, one-image folders, single-rule
bits outside the space, deep or wrongly typed JSON (ONNX metadata, metrics.jsonl),
``rtfq plan --set`` digits and degenerate search settings, each run as a fresh
subprocess with a time limit.

Every case is classified as ``ok`` (exit 0: a hostile image skipped with a warning),
``error`` (exit 2 and exactly one stderr line ``Error: ...``), ``traceback``, ``timeout``
or ``other`` (any other exit code or more than one error line), and the counts are
printed per command. Each case also states what it expects (ok or error); a case that
gives the other answer is listed, as is every traceback and timeout.

    PYTHONPATH=. python bench/hostile_sweep.py [--timeout 60] [--jobs 2] [--keep DIR]

Each process runs torch with one thread (OMP_NUM_THREADS=1 unless set).

Needs about 3 to 5 minutes on 2 cores (the fixtures are a tiny supernet and 32-pixel images).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rtfq_deploy.formats import META_CLASS_NAMES, META_INPUT

ROOT = Path(__file__).resolve().parents[1]
ENTRY = {"rtfq": "from rtfq_deploy.cli.main import rtfq as c", "rtfq-train": "from rtfq_deploy.cli.train import train as c",
         "rtfq-export": "from rtfq_deploy.cli.export import export as c",
         "rtfq-bench": "from rtfq_deploy.cli.bench import bench as c"}
CLASSES = ("circle", "square", "triangle")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def build_fixtures(w: Path) -> dict:
    """A tiny 6/4/2-bit supernet, synthetic 32-pixel data, hostile folders, an export
    with hostile metadata and a finished training run."""
    import onnx
    import torch

    from rtfq_deploy.checkpoint import save_checkpoint
    from rtfq_deploy.costs import subnet_costs
    from rtfq_deploy.data.synth import SynthConfig, generate
    from rtfq_deploy.models import SupernetConfig, build_supernet
    from rtfq_deploy.space import SearchSpace, SubnetConfig

    space = SearchSpace(resolutions=(32, 24), widths=(1.0, 0.5), bits=(6, 4, 2))
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=space))
    save_checkpoint(w / "c.pt", model, meta={"class_names": list(CLASSES)})
    generate(w / "data", SynthConfig(classes=3, per_class=4, test_per_class=2, size=32, seed=0))
    good = w / "data" / "target_test"
    bomb, warn_bomb = png_claiming(100_000, 100_000), png_claiming(10_000, 10_000)
    truncated = (good / "circle" / "00000.png").read_bytes()
    truncated = truncated[: len(truncated) // 2]
    f = {"ckpt": w / "c.pt", "source": w / "data" / "source", "target": w / "data" / "target", "good": good}
    # class folders: hostile files among good images, and only hostile ones
    for name, payload in (("bombmix", bomb), ("warnmix", warn_bomb), ("truncmix", truncated)):
        f[name] = _copy_tree(good, w / name)
        (f[name] / "circle" / "zz.png").write_bytes(payload)
    f["bombonly"] = w / "bombonly"
    for c in CLASSES:
        (f["bombonly"] / c).mkdir(parents=True)
        (f["bombonly"] / c / "b.png").write_bytes(bomb)
    f["onereadable"] = _copy_tree(f["bombonly"], w / "onereadable")  # classes of bombs, one good image
    shutil.copy(good / "circle" / "00000.png", f["onereadable"] / "circle" / "0.png")
    f["one"] = w / "one"  # one image, for calibration folders
    (f["one"] / "x").mkdir(parents=True)
    shutil.copy(good / "circle" / "00000.png", f["one"] / "x" / "0.png")
    f["bombflat"] = w / "bombflat"
    f["bombflat"].mkdir()
    (f["bombflat"] / "b.png").write_bytes(bomb)
    q4, q2 = (subnet_costs(model, SubnetConfig(32, 1.0, q)).bitops for q in (4, 2))
    f["budget"] = f"bitops={(q4 + q2) // 2}"
    # an export, and copies with hostile metadata
    run([sys.executable, "-c", ENTRY["rtfq-export"] + "; c()", "--checkpoint", str(f["ckpt"]), "--subnet",
         "r24-w0.50-q4", "--no-verify", "-o", str(w / "m.onnx")], check=True)
    f["onnx"] = w / "m.onnx"
    deep = "[" * 10_000 + "]" * 10_000
    for name, key, value in (("meta_names_deep", META_CLASS_NAMES, deep), ("meta_names_int", META_CLASS_NAMES, "7"),
                             ("meta_names_null", META_CLASS_NAMES, "null"),
                             ("meta_names_objs", META_CLASS_NAMES, '[{"a": 1}, [], 3]'),
                             ("meta_input_deep", META_INPUT, deep),
                             ("meta_input_obj", META_INPUT, '{"shape": {"a": 1}, "mean": 1, "std": null}'),
                             ("meta_input_huge", META_INPUT, '{"shape": ["N", 3, 1' + "0" * 5000 + ', 24], '
                                                               '"mean": [0, 0, 0], "std": [1, 1, 1]}')):
        m = onnx.load(w / "m.onnx")
        for p in m.metadata_props:
            if p.key == key:
                p.value = value
        (w / name).mkdir()
        onnx.save(m, w / name / "m.onnx")
        f[name] = w / name / "m.onnx"
    # a finished two-step run with its own target folder (later given a bomb)
    f["run_target"] = _copy_tree(f["target"], w / "run_target")
    run([sys.executable, "-c", ENTRY["rtfq-train"] + "; c()", "--checkpoint", str(f["ckpt"]), "--source",
         str(f["source"]), "--target", str(f["run_target"]), "--out", str(w / "run"), "--steps", "2",
         "--batch-size", "4", "--log-every", "1", "--calib-images", "4", "--workers", "0", "--checkpoint-every", "1"],
        check=True)
    f["run"] = w / "run"
    return f


def run(cmd: list[str], check: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
    # one torch thread per process: on shared cores, default threads spin against each
    # other (a search of 85 plans took 57 s instead of 0.3 s at load 5 on 2 cores)
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise SystemExit(f"fixture command failed: {' '.join(cmd)}\n{result.stderr}")
    return result


def _resume_copy(f: dict, w: Path, name: str, edit) -> list[str]:
    """A copy of the finished run, edited; the case resumes it."""
    dst = w / "runs" / name
    shutil.copytree(f["run"], dst)
    edit(dst)
    return ["--resume", str(dst)]


def _edit_record(key: str, value) -> callable:
    def edit(run_dir: Path) -> None:
        record = json.loads((run_dir / "run.json").read_text())
        record["config"][key] = value
        if key == "single_bits":
            record["config"]["rule"] = "single"
        (run_dir / "run.json").write_text(json.dumps(record))
    return edit


def _metrics(content: bytes | None) -> callable:
    def edit(run_dir: Path) -> None:
        path = run_dir / "metrics.jsonl"
        path.unlink()
        if content is None:
            path.symlink_to("/dev/zero")
        else:
            path.write_bytes(content)
    return edit


def _bomb_into_target(f: dict) -> callable:
    def edit(run_dir: Path) -> None:
        target = Path(json.loads((run_dir / "run.json").read_text())["target"])
        new = run_dir.parent / f"{run_dir.name}-target"
        shutil.copytree(target, new)
        (new / "circle" / "zz.png").write_bytes(png_claiming(100_000, 100_000))
        record = json.loads((run_dir / "run.json").read_text())
        record["target"] = str(new)
        (run_dir / "run.json").write_text(json.dumps(record))
    return edit


def cases(f: dict, w: Path) -> list[tuple[str, list[str], str]]:
    """(command, argv after the program, expected: ok or error)."""
    out: list[tuple[str, list[str], str]] = []
    n = iter(range(10**6))

    def o(suffix: str = "json") -> str:
        return str(w / "out" / f"{next(n)}.{suffix}")

    ck = str(f["ckpt"])
    # -- class 1: hostile images -----------------------------------------------------------
    for folder, want in (("bombmix", "ok"), ("warnmix", "ok"), ("truncmix", "ok"), ("bombonly", "error")):
        d = str(f[folder])
        out += [("rtfq eval", ["eval", "--checkpoint", ck, "--data", d, "--subnets", "r24-w0.50-q2", "-o", o()], want),
                ("rtfq eval", ["eval", "--checkpoint", ck, "--data", str(f["good"]), "--calib", d,
                               "--subnets", "r24-w0.50-q2", "-o", o()], want),
                ("rtfq calibrate", ["calibrate", "--checkpoint", ck, "--data", d, "--subnets", "r24-w0.50-q2",
                                    "-o", o("pt")], want),
                ("rtfq search", ["search", "--checkpoint", ck, "--budget", f["budget"], "--data", d,
                                 "--search-images", "12", "-o", o()], want),
                ("rtfq search", ["search", "--checkpoint", ck, "--budget", f["budget"], "--data", d, "--labeled",
                                 "--search-images", "12", "-o", o()], want),
                ("rtfq-export", ["--checkpoint", ck, "--subnet", "r24-w0.50-q2", "--calib", d, "-o", o("onnx")], want),
                ("rtfq-export", ["--checkpoint", ck, "--subnet", "r24-w0.50-q2", "--verify-images", d,
                                 "-o", o("onnx")], want),
                ("rtfq-export", ["--checkpoint", ck, "--budget", f["budget"], "--mixed", "--data", d,
                                 "--search-images", "8", "-o", o("onnx")], want),
                ("rtfq-bench run", ["run", str(f["onnx"]), "--images", d, "--max-time", "0.2", "--min-time", "0.05",
                                    "--min-runs", "5", "--max-runs", "20", "-o", o()], "ok")]  # bombs only: the row's accuracy_error
        train_base = ["--checkpoint", ck, "--steps", "2", "--batch-size", "4", "--calib-images", "4", "--workers"]
        out += [("rtfq-train", [*train_base, "0", "--source", d, "--target", str(f["target"]), "--out", o("run")], want),
                ("rtfq-train", [*train_base, "0", "--source", str(f["source"]), "--target", d, "--out", o("run")], want),
                ("rtfq-train", [*train_base, "2", "--source", str(f["source"]), "--target", d, "--out", o("run")],
                 want)]
    recipe = w / "nocache.json"
    recipe.write_text('{"cache_mb": 0}')
    out += [("rtfq-train", ["--checkpoint", ck, "--steps", "2", "--batch-size", "4", "--calib-images", "4", "--workers",
                            "2", "--recipe", str(recipe), "--source", str(f["source"]), "--target", str(f[d]),
                            "--out", o("run")], want)
            for d, want in (("truncmix", "ok"), ("bombmix", "ok"), ("bombonly", "error"))]
    out.append(("rtfq-train", _resume_copy(f, w, "bomb", _bomb_into_target(f)), "ok"))
    # -- class 2: one image for BatchNorm statistics -----------------------------------------
    one, onereadable = str(f["one"]), str(f["onereadable"])
    out += [("rtfq calibrate", ["calibrate", "--checkpoint", ck, "--data", one, "--subnets", "r24-w0.50-q2",
                                "-o", o("pt")], "error"),
            ("rtfq calibrate", ["calibrate", "--checkpoint", ck, "--data", str(f["target"]), "--images", "1",
                                "--subnets", "r24-w0.50-q2", "-o", o("pt")], "error"),
            ("rtfq eval", ["eval", "--checkpoint", ck, "--data", str(f["good"]), "--calib", one,
                           "--subnets", "r24-w0.50-q2", "-o", o()], "error"),
            ("rtfq eval", ["eval", "--checkpoint", ck, "--data", str(f["good"]), "--calib-images", "1",
                           "--subnets", "r24-w0.50-q2", "-o", o()], "error"),
            ("rtfq eval", ["eval", "--checkpoint", ck, "--data", onereadable, "--subnets", "r24-w0.50-q2",
                           "-o", o()], "error"),
            ("rtfq-export", ["--checkpoint", ck, "--subnet", "r24-w0.50-q2", "--calib", one, "-o", o("onnx")], "error"),
            ("rtfq-export", ["--checkpoint", ck, "--subnet", "r24-w0.50-q2", "--calib", str(f["target"]),
                             "--calib-images", "1", "-o", o("onnx")], "error"),
            ("rtfq-export", ["--checkpoint", ck, "--budget", f["budget"], "--mixed", "--data", str(f["target"]),
                             "--calib", one, "--search-images", "8", "-o", o("onnx")], "error"),
            ("rtfq-export", ["--checkpoint", ck, "--budget", f["budget"], "--mixed", "--data", one,
                             "--search-images", "8", "-o", o("onnx")], "error"),
            ("rtfq search", ["search", "--checkpoint", ck, "--budget", f["budget"], "--data", one, "-o", o()], "error"),
            ("rtfq search", ["search", "--checkpoint", ck, "--budget", f["budget"], "--data", onereadable,
                             "--labeled", "-o", o()], "error"),
            ("rtfq-train", ["--checkpoint", ck, "--steps", "2", "--batch-size", "4", "--calib-images", "1", "--source",
                            str(f["source"]), "--target", str(f["target"]), "--out", o("run")], "error"),
            ("rtfq-train", ["--checkpoint", ck, "--steps", "2", "--batch-size", "4", "--calib-images", "4",
                            "--workers", "0", "--source", str(f["source"]), "--target", onereadable, "--out", o("run")],
             "error"),
            ("rtfq-train", _resume_copy(f, w, "calib1", _edit_record("calib_images", 1)), "error")]
    # -- class 3: --rule single with bits outside the space ----------------------------------
    for bits in ("8", "3", "5"):
        out.append(("rtfq-train", ["--checkpoint", ck, "--steps", "2", "--batch-size", "4", "--workers", "0",
                                   "--rule", "single", "--single-bits", bits, "--source", str(f["source"]),
                                   "--target", str(f["target"]), "--out", o("run")], "error"))
        out.append(("rtfq-train", _resume_copy(f, w, f"single{bits}", _edit_record("single_bits", int(bits))), "error"))
    # -- class 4: deep or wrongly typed JSON ------------------------------------------------
    for name in ("meta_names_deep", "meta_names_int", "meta_names_null", "meta_names_objs", "meta_input_deep",
                 "meta_input_obj", "meta_input_huge"):
        # class names are checked before anything is measured (one error line); an unusable
        # rtfq.input is that model's accuracy_error in its row (its latency is still measured)
        out.append(("rtfq-bench run", ["run", str(f[name]), "--images", str(f["good"]), "--max-time", "0.2",
                                       "--min-time", "0.05", "--min-runs", "5", "--max-runs", "20", "-o", o()],
                    "error" if "names" in name else "ok"))
    deep_line = b'{"step": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n"
    for label, content in (("deepfirst", deep_line + b'{"step": 0}\n'), ("deeplast", b'{"step": 0}\n' + deep_line),
                           ("hugeint", b'{"step": 1' + b"0" * 5000 + b'}\n{"step": 0}\n'),
                           ("nan", b'{"step": NaN}\n{"step": 0}\n'), ("devzero", None)):
        out.append(("rtfq-train", _resume_copy(f, w, label, _metrics(content)), "ok" if label == "deeplast" else "error"))
    # -- class 5: rtfq plan --set ---------------------------------------------------------------
    for value, want in (("9" * 5000, "error"), ("\u00b2", "error"), ("\u0661", "error"), ("4" * 41, "error"),
                        ("1_0", "error"), ("+4", "error"), (" 4", "error"), ("04", "ok"), ("4", "ok")):
        out.append(("rtfq plan", ["plan", "--checkpoint", ck, "--subnet", "r32-w1.00-q6", "--set", f"layer1.*={value}",
                                  "-o", o()], want))
    # -- class 6: degenerate search settings ------------------------------------------------------
    base = ["search", "--checkpoint", ck, "--budget", f["budget"], "--data", str(f["target"]), "--search-images", "12"]
    for extra, want in ((["--lambda", "0"], "error"), (["--lambda", "1e-320"], "error"), (["--lambda", "1e-9"], "error"),
                        (["--rescore", "0"], "ok"), (["--rescore", "100000"], "error"), (["--rescore", "1"], "ok"),
                        (["--lambda", "1000"], "ok"), (["--search-images", "100000"], "error")):
        out.append(("rtfq search", [*base, *extra, "-o", o()], want))
    mixed = ["--checkpoint", ck, "--budget", f["budget"], "--mixed", "--data", str(f["target"]), "--search-images", "8"]
    for extra, want in ((["--lambda", "0"], "error"), (["--rescore", "0"], "ok"), (["--rescore", "100000"], "error")):
        out.append(("rtfq-export", [*mixed, *extra, "-o", o("onnx")], want))
    return out


def classify(result: subprocess.CompletedProcess | None) -> str:
    if result is None:
        return "timeout"
    if "Traceback" in result.stderr:
        return "traceback"
    if result.returncode == 0:
        return "ok"
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("step ", "["))
              and "WARNING" not in line and not line.startswith(("warning:", "calibrating", "benchmarking"))]
    if result.returncode == 2 and len(errors) == 1 and errors[0].startswith("Error: "):
        return "error"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="Build the fixtures here and keep them (default: a temporary folder).")
    parser.add_argument("--only", help="Run only the commands whose name contains this text.")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="rtfq-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        fixtures = build_fixtures(work)
        (work / "out").mkdir()
        (work / "runs").mkdir()
        todo = [c for c in cases(fixtures, work) if not args.only or args.only in c[0]]
        print(f"{len(todo)} cases (fixtures built in {time.monotonic() - t0:.0f} s)", flush=True)

        def one(case):
            name, argv, want = case
            program = name.split()[0]
            cmd = [sys.executable, "-c", ENTRY[program] + f"; c(prog_name={program!r})", *argv]
            try:
                result = run(cmd, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                result = None
            return case, result

        counts: dict[str, Counter] = defaultdict(Counter)
        notes = []
        with ThreadPoolExecutor(args.jobs) as pool:
            for (name, argv, want), result in pool.map(one, todo):
                kind = classify(result)
                counts[name][kind] += 1
                counts[name]["unexpected"] += kind in ("ok", "error") and kind != want
                if kind not in ("ok", "error") or kind != want:
                    tail = "" if result is None else (result.stderr.strip().splitlines() or [""])[-1][:200]
                    notes.append(f"{kind} (expected {want}): {name} {' '.join(a[:60] for a in argv)}\n    {tail}")
        for note in notes:
            print(note)
        columns = ("ok", "error", "traceback", "timeout", "other", "unexpected")
        print(f"\n{'command':16}{'cases':>6}" + "".join(f"{c:>11}" for c in columns))
        total = Counter()
        for name in sorted(counts):
            c = counts[name]
            cases_n = sum(c[k] for k in columns[:5])
            total.update(c)
            print(f"{name:16}{cases_n:>6}" + "".join(f"{c[k]:>11}" for k in columns))
        print(f"{'total':16}{sum(total[k] for k in columns[:5]):>6}" + "".join(f"{total[k]:>11}" for k in columns))
        print(f"({time.monotonic() - t0:.0f} s; ok = exit 0, error = exit 2 with one 'Error:' line; "
              f"unexpected = ok where an error was expected or the reverse)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
