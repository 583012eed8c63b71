"""Load on ``rtfq-serve`` over loopback: N concurrent clients downloading one model file.

Starts ``rtfq-serve`` as a subprocess on 127.0.0.1 (a free port) over a temporary
DIST_DIR holding one ResNet-50-sized file, then runs N client threads (http.client,
keep-alive), each resolving once and then downloading the file repeatedly until the
duration is over (a download in progress is finished). Every body is streamed through
sha256 and checked against the ETag and the manifest entry; a wrong byte, a short body or
a non-200 answer counts as an error. Prints errors, downloads/s, MB/s, latency
percentiles (request sent to last byte) and the server's peak RSS (VmHWM).

    python bench/serve_load.py                         # 200 clients, 20 s, 26 MB of random bytes
    python bench/serve_load.py --model r50.onnx        # a real exported ResNet-50 file
    python bench/serve_load.py --clients 50 --duration 10

Loopback only; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rtfq_deploy import manifest as mf

RESNET50_INT8_BYTES = 26_037_743  # what rtfq-export writes for a ResNet-50 r224-w1.00-q8


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_dist(root: Path, model: Path | None, size: int) -> tuple[mf.Entry, str]:
    device_dir = root / "bench"
    device_dir.mkdir(parents=True)
    target = device_dir / "r224-w1.00-q8.onnx"
    if model is not None:
        shutil.copyfile(model, target)
        what = f"{model} ({target.stat().st_size} bytes)"
    else:
        with open(target, "wb") as f:  # incompressible, like quantized weights
            left = size
            while left:
                block = os.urandom(min(left, 1 << 20))
                f.write(block)
                left -= len(block)
        what = f"random bytes ({size} bytes)"
    data_sha = mf.sha256_file(target)
    entry = mf.Entry("r224-w1.00-q8", "bench/r224-w1.00-q8.onnx", data_sha, target.stat().st_size,
                     18.5, 19.5, 120_000_000, 4_089_000_000, 261_000_000_000, 0.76)
    mf.set_device(root, "bench", mf.Device({"cpu": "loopback"}, (entry,)))
    return entry, what


def start_server(dist: Path) -> tuple[subprocess.Popen, str]:
    exe = Path(sys.executable).parent / "rtfq-serve"
    proc = subprocess.Popen([str(exe), str(dist), "--port", "0", "--max-connections", "4096"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    match = re.search(r" on (http://127\.0\.0\.1:\d+) ", line)
    if match is None:
        proc.kill()
        raise SystemExit(f"rtfq-serve did not start: {line!r}")
    return proc, match[1]


def proc_status(pid: int, key: str) -> int:
    """A /proc/<pid>/status field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(host: str, port: int, entry: mf.Entry, deadline: float, start: threading.Barrier, tally: Tally) -> None:
    buf = bytearray(1 << 20)
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        start.wait()
        conn.request("GET", "/v1/devices/bench/resolve?budget=latency=20ms")
        resolved = json.loads(conn.getresponse().read())
        url = resolved["entry"]["url"]
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            conn.request("GET", url)
            resp = conn.getresponse()
            digest, got = hashlib.sha256(), 0
            while n := resp.readinto(buf):
                digest.update(memoryview(buf)[:n])
                got += n
            elapsed = time.perf_counter() - t0
            ok = (resp.status == 200 and got == entry.size_bytes and digest.hexdigest() == entry.sha256
                  and resp.getheader("ETag") == f'"{entry.sha256}"')
            with tally.lock:
                if ok:
                    tally.latencies.append(elapsed)
                    tally.bytes += got
                else:
                    tally.errors.append(f"status {resp.status}, {got} bytes, sha {digest.hexdigest()[:12]}")
    except Exception as e:  # a refused connection, a reset, a timeout: an error, counted
        with tally.lock:
            tally.errors.append(f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds during which downloads start")
    parser.add_argument("--model", type=Path, help="a model file to serve (default: random bytes)")
    parser.add_argument("--size", type=int, default=RESNET50_INT8_BYTES, help="bytes of the random file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        dist = Path(tmp)
        entry, what = make_dist(dist, args.model, args.size)
        proc, url = start_server(dist)
        try:
            host, port = url.removeprefix("http://").split(":")
            idle_rss = proc_status(proc.pid, "VmRSS")
            cpu0 = cpu_seconds(proc.pid)
            tally = Tally()
            barrier = threading.Barrier(args.clients + 1)
            deadline = time.monotonic() + args.duration
            threads = [threading.Thread(target=client, args=(host, int(port), entry, deadline, barrier, tally))
                       for _ in range(args.clients)]
            for t in threads:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            peak_rss = idle_rss
            while any(t.is_alive() for t in threads):
                peak_rss = max(peak_rss, proc_status(proc.pid, "VmRSS"))
                time.sleep(0.1)
            wall = time.perf_counter() - t0
            hwm = proc_status(proc.pid, "VmHWM")
            cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait(30)

    n = len(tally.latencies)
    print(f"file: {what}, sha256 {entry.sha256[:16]}")
    print(f"clients: {args.clients}, downloads started for {args.duration:g} s, wall {wall:.1f} s "
          f"(the last downloads finish after the deadline)")
    print(f"errors: {len(tally.errors)}" + (f" (first: {tally.errors[0]})" if tally.errors else ""))
    print(f"downloads: {n} complete and verified, {n / wall:.2f} downloads/s, {tally.bytes / wall / 1e6:.0f} MB/s")
    if n:
        print(f"latency per download (s): p50 {percentile(tally.latencies, 50):.2f}, "
              f"p90 {percentile(tally.latencies, 90):.2f}, p99 {percentile(tally.latencies, 99):.2f}, "
              f"max {max(tally.latencies):.2f}")
    print(f"server memory: idle RSS {idle_rss / 2**20:.0f} MiB, peak RSS {hwm / 2**20:.0f} MiB (VmHWM; "
          f"sampled max {peak_rss / 2**20:.0f} MiB)")
    print(f"server CPU: {cpu:.1f} s over {wall:.1f} s wall ({cpu / wall:.2f} cores), "
          f"{tally.bytes / max(cpu, 1e-9) / 1e6:.0f} MB per CPU-second")
    if tally.errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
