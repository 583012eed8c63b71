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

import os
import random
import shutil
import statistics
import tempfile

from tabulate import tabulate

from rtfq_deploy.export.reference_graphs import random_supernet
from rtfq_deploy.bench.sessions import bench_rounds, median_ratio
from rtfq_deploy.costs import plan_costs, walk
from rtfq_deploy.export.lower import lower
from rtfq_deploy.export.onnx_graph import to_onnx
from rtfq_deploy.scriptargs import Parser, name_list, positive
from rtfq_deploy.space import MixedBits, SearchSpace, SubnetConfig
from rtfq_deploy.planfile import free_quantizers

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
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--subnets", type=name_list, default="r224-w1.00,r160-w0.73")
    parser.add_argument("--plans", type=positive, default=3)
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--rounds", type=positive, default=3)
    args = parser.parse_args()
    model = random_supernet("resnet50", SearchSpace(bits=BITS))
    workdir = tempfile.mkdtemp(prefix="mixed_latency_")
    rows = []
    try:
        for shape in args.subnets:
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
            times = bench_rounds(paths, args.rounds, args.threads, workdir)
            for name, cfg in variants.items():
                ratio = median_ratio(times[name], times["uniform q4"])
                rows.append([shape, name, str(cfg), f"{bitops[name] / 1e9:.2f}",
                             f"{statistics.median(times[name]):.2f}", f"{ratio:.3f}"])
    finally:
        shutil.rmtree(workdir)
    print(f"ResNet-50, random weights, batch 1, {args.threads} thread(s), onnxruntime, rtfq-bench run over every "
          f"file, {args.rounds} rounds; medians")
    print(tabulate(rows, headers=["shape", "variant", "subnet", "GBitOPs", "p50 ms", "/ uniform q4"],
                   disable_numparse=True))


if __name__ == "__main__":
    main()
