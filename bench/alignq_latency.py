"""Latency of AlignQ exports against LSQ exports of the same subnet, on onnxruntime.

Random-weight ResNet-50 supernets built from one seed (same weights), once with LSQ and
once per AlignQ kind (``--kinds``: by default today's ``alignq``, its logistic form and
the first variant, ``alignq-v1``), activation quantizers calibrated on random images. For each subnet every
export is a real `rtfq_deploy` file, measured by `rtfq-bench run` (fresh processes,
timed until the p50 is stable) ``--rounds`` times over all files in turn; each ratio is
the median of per-round ratios against LSQ. An AlignQ graph keeps every conv a
QLinearConv and adds, per CDF tensor, DequantizeLinear -> Erf -> QuantizeLinear on the
codes (plus a Clip for signed ones); a logistic variant has a Sigmoid in the Erf's place,
which onnxruntime fuses with its neighbours into one QLinearSigmoid table.

    python bench/alignq_latency.py [--subnets r224-w1.00-q4,r160-w0.73-q4,r224-w1.00-q2]
        [--kinds alignq,alignq-branch-logistic,alignq-v1] [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from collections import Counter

import onnx
import torch
from tabulate import tabulate

from rtfq_deploy.bench.sessions import bench_rounds, median_ratio
from rtfq_deploy.calibrate import init_activation_steps
from rtfq_deploy.export.lower import lower
from rtfq_deploy.export.onnx_graph import to_onnx
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.quant import ALIGNQ_VARIANTS, resolve_kind
from rtfq_deploy.scriptargs import Parser, name_list, positive
from rtfq_deploy.space import SearchSpace, SubnetConfig

BITS = (6, 4, 2)


def supernet(kind: str):
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("resnet50", space=SearchSpace(bits=BITS), weight_quantizer=kind,
                                          act_quantizer=kind))
    init_activation_steps(model, ActiveSubnet(1.0, model.float_plan()), torch.randn(4, 3, 224, 224))
    return model.eval()


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--subnets", type=name_list, default="r224-w1.00-q4,r160-w0.73-q4,r224-w1.00-q2")
    parser.add_argument("--kinds", type=name_list, default="alignq,alignq-branch-logistic,alignq-v1",
                        help="AlignQ kinds to compare with LSQ (an alias counts as the kind it names)")
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--rounds", type=positive, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kinds = list(dict.fromkeys(resolve_kind(k) for k in args.kinds if k != "lsq"))
    exportable = [k for k, options in ALIGNQ_VARIANTS.items() if options.domain == "cdf"]
    unknown = [k for k in kinds if k not in exportable]
    if unknown:
        parser.error(f"--kinds: not exportable AlignQ kinds: {', '.join(unknown)} (known: {', '.join(exportable)})")
    models = {kind: supernet(kind) for kind in ("lsq", *kinds)}
    workdir = tempfile.mkdtemp(prefix="alignq_latency_")
    paths: dict[tuple[str, str], str] = {}
    erfs: dict[tuple[str, str], int] = {}
    try:
        for name in args.subnets:
            cfg = SubnetConfig.parse(name)
            for kind, model in models.items():
                path = os.path.join(workdir, f"{name}-{kind}.onnx")
                m = to_onnx(lower(model, model.active(cfg), cfg.resolution), {})
                onnx.save(m, path)
                paths[(name, kind)] = path
                ops = Counter(n.op_type for n in m.graph.node)
                erfs[(name, kind)] = ops["Erf"] + ops["Sigmoid"]  # one code map per CDF tensor
        times = bench_rounds(paths, args.rounds, args.threads, workdir)
    finally:
        shutil.rmtree(workdir)
    rows = []
    for name in args.subnets:
        lsq = times[(name, "lsq")]
        rows.append([name, "lsq", 0, f"{statistics.median(lsq):.2f}", "1.000"])
        for kind in kinds:
            alq = times[(name, kind)]
            rows.append([name, kind, erfs[(name, kind)], f"{statistics.median(alq):.2f}",
                         f"{median_ratio(alq, lsq):.3f}"])
    print(f"ResNet-50, random weights, batch 1, {args.threads} thread(s), onnxruntime, rtfq-bench run over every "
          f"file, {args.rounds} rounds; medians")
    print(tabulate(rows, headers=["subnet", "kind", "CDF tensors", "p50 ms", "/ LSQ"], disable_numparse=True))


if __name__ == "__main__":
    main()
