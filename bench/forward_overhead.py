"""Cost of fake quantization in the supernet: a training step (forward + backward) of
the same subnet with its bit plan against the float plan (same slicing, same convs, no
quantizers), measured interleaved in one run; prints medians and the ratio.

    python bench/forward_overhead.py [--arch resnet50] [--batch 8] [--reps 5]
"""

from __future__ import annotations

import statistics
import time

import torch
from tabulate import tabulate

from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.scriptargs import Parser, name_list, positive
from rtfq_deploy.space import SubnetConfig


def step_time(model, x: torch.Tensor, net: ActiveSubnet) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(x, net).logsumexp(dim=1).mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=positive, default=8)
    parser.add_argument("--reps", type=positive, default=5)
    parser.add_argument("--subnets", type=name_list, default="r224-w1.00-q4,r160-w0.73-q4,r128-w0.60-q4")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig(args.arch)).train()
    rows = []
    for text in args.subnets:
        config = SubnetConfig.parse(text)
        x = torch.randn(args.batch, 3, config.resolution, config.resolution)
        quant = model.active(config)
        flt = ActiveSubnet(config.width, model.float_plan())
        step_time(model, x, quant), step_time(model, x, flt)  # warm-up
        tq, tf = [], []
        for _ in range(args.reps):  # interleaved, so drift hits both alike
            tq.append(step_time(model, x, quant))
            tf.append(step_time(model, x, flt))
        ratios = [a / b for a, b in zip(tq, tf)]
        rows.append([text, f"{statistics.median(tf) * 1e3:.0f}", f"{statistics.median(tq) * 1e3:.0f}",
                     f"{statistics.median(ratios):.2f}"])
    print(f"{args.arch}, batch {args.batch}, {torch.get_num_threads()} threads, {args.reps} interleaved reps, medians")
    print(tabulate(rows, headers=["subnet", "float step (ms)", "quantized step (ms)", "quantized / float"]))


if __name__ == "__main__":
    main()
