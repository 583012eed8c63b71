"""Latency of mixed-precision exports against uniform ones at equal BitOPs, on onnxruntime.

Random-weight ResNet-50 subnets; for each shape the uniform 4-bit export, the 8-bit and
3-bit ones for scale, and ``--plans`` random per-quantizer plans (bits 6/5/4/3/2) within
+-1% of the 4-bit subnet's BitOPs. Every file is a real `rtfq_deploy` export, measured by
`rtfq-bench run` (fresh processes, timed until the p50 is stable) ``--rounds`` times over
all files in turn; ratios are medians of per-round ratios.

    python bench/mixed_latency.py [--subnets r224-w1.00,r160-w0.73] [--plans 3] [--threads 1] [--rounds 3]

Prints each variant's BitOPs, median latency and its ratio to the uniform 4-bit export.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate

from rtfq_deploy.costs import plan_costs, walk  # noqa: E402
from rtfq_deploy.export.lower import lower  # noqa: E402
from rtfq_deploy.export.onnx_graph import to_onnx  # noqa: E402
from rtfq_deploy.models import SupernetConfig, build_supernet  # noqa: E402
from rtfq_deploy.space import MixedBits, SearchSpace, SubnetConfig  # noqa: E402
from rtfq_deploy.train.mixed import free_quantizers  # noqa: E402

BITS = (8, 6, 5, 4, 3, 2)


def plans_near(model, resolution: int, width: float, target: int, count: int, seed: int) -> list[SubnetConfig]:
    """Random plans (free quantizers at 6..2 bits) within +-1% of ``target`` BitOPs."""
    rng = random.Random(seed)
    shape = walk(model, resolution, width)
    free = free_quantizers(model)
    base = model.plan(SubnetConfig(resolution, width, 4)).as_dict()
    levels = [6, 5, 4, 3, 2]
    out: list[SubnetConfig] = []
    while len(out) < count:
        bits = {**base, **{n: rng.choice(levels) for n in free}}
        for _ in range(20 * len(free)):
            cost = plan_costs(model, shape, model.plan(SubnetConfig(resolution, width, MixedBits.of(bits)))).bitops
            if abs(cost - target) <= 0.01 * target:
                out.append(model.subnet(resolution, width, bits))
                break
            down = cost > target
            name = rng.choice([n for n in free if (bits[n] > 2 if down else bits[n] < 6)])
            bits[name] += -1 if down else 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subnets", default="r224-w1.00,r160-w0.73")
    parser.add_argument("--plans", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("resnet50", space=SearchSpace(bits=BITS))).eval()
    workdir = tempfile.mkdtemp(prefix="mixed_latency_")
    rows = []
    try:
        for shape in args.subnets.split(","):
            r, w = int(shape.split("-")[0][1:]), float(shape.split("-w")[1])
            walked = walk(model, r, w)
            uniform = {q: SubnetConfig(r, w, q) for q in (8, 4, 3)}
            q4_bitops = plan_costs(model, walked, model.plan(uniform[4])).bitops
            variants = {f"uniform q{q}": cfg for q, cfg in uniform.items()}
            for i, cfg in enumerate(plans_near(model, r, w, q4_bitops, args.plans, seed=r)):
                variants[f"mixed {i + 1}"] = cfg
            paths, bitops = {}, {}
            for name, cfg in variants.items():
                ir = lower(model, model.active(cfg), r)
                paths[name] = os.path.join(workdir, f"{cfg}.onnx")
                with open(paths[name], "wb") as f:
                    f.write(to_onnx(ir, {}).SerializeToString())
                bitops[name] = plan_costs(model, walked, model.plan(cfg)).bitops
            times: dict[str, list[float]] = {k: [] for k in paths}
            for i in range(args.rounds):
                results = os.path.join(workdir, f"{shape}-{i}.json")
                subprocess.run([str(Path(sys.executable).parent / "rtfq-bench"), "run", *paths.values(), "-o", results,
                                "--threads", str(args.threads)], check=True, stdout=subprocess.DEVNULL)
                p50 = {row["path"]: row["latency_p50_ms"] / 1e3 for row in json.load(open(results))["models"]}
                for name, path in paths.items():
                    times[name].append(p50[str(Path(path).resolve())])
            for name, cfg in variants.items():
                ratio = statistics.median(a / b for a, b in zip(times[name], times["uniform q4"]))
                rows.append([shape, name, str(cfg), f"{bitops[name] / 1e9:.2f}",
                             f"{statistics.median(times[name]) * 1e3:.2f}", f"{ratio:.3f}"])
    finally:
        shutil.rmtree(workdir)
    print(f"ResNet-50, random weights, batch 1, {args.threads} thread(s), onnxruntime, rtfq-bench run over every "
          f"file, {args.rounds} rounds; medians")
    print(tabulate(rows, headers=["shape", "variant", "subnet", "GBitOPs", "p50 ms", "/ uniform q4"],
                   disable_numparse=True))


if __name__ == "__main__":
    main()
