"""Where do onnxruntime's integer kernels and the exact QDQ semantics part ways?

For one subnet of a checkpoint and a folder of images, prints how far onnxruntime's
logits are from the float64 PyTorch subnet (in output steps) with graph optimisation on
(fused integer kernels) and off (float convolutions between Q/DQ), then, on the worst
image, how many codes of every quantized tensor differ from the ONNX reference
evaluator in each mode. A first difference deep inside an otherwise equal graph, that
grows layer by layer, is float32 requantization at a .5 tie, not an export error.

    python export/code_flips.py --checkpoint run/supernet.pt --subnet r56-w0.73-q6 --images data/target_test
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from rtfq_deploy.bench.sessions import ort_session
from rtfq_deploy.checkpoint import load_checkpoint
from rtfq_deploy.formats import normalization_of
from rtfq_deploy.export.api import build_model
from rtfq_deploy.export.verify import output_step, torch_logits
from rtfq_deploy.images import load_folder
from rtfq_deploy.scriptargs import Parser, positive
from rtfq_deploy.space import SubnetConfig


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--subnet", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--limit", type=positive, default=300)
    args = ap.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.model.config.space.parse(args.subnet)
    model, ir, net, _ = build_model(ckpt, SubnetConfig.parse(str(cfg)), "")
    norm = normalization_of(ckpt.meta)
    x = load_folder(args.images, cfg.resolution, norm["mean"], norm["std"], limit=args.limit).float()
    expected = torch_logits(ckpt.model, net, x)
    step = output_step(expected) or 1.0  # all-zero logits: plain logit units
    worst = 0
    for fused in (True, False):
        got = ort_session(model, 1, fused).run(None, {ir.input: x.numpy()})[0]
        steps = np.abs(expected - got).max(1) / step
        worst = int(steps.argmax()) if fused else worst
        print(f"{'fused integer kernels' if fused else 'unfused float32 Q/DQ':22s} max {steps.max():.2f} steps, "
              f"p99 {np.percentile(steps, 99):.3f}, top-1 agreement {(expected.argmax(1) == got.argmax(1)).mean():.4f}")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    codes = [n.output[0] for n in probe.graph.node if n.op_type == "QuantizeLinear"]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in codes)
    xi = x[worst:worst + 1].numpy()
    ref = ReferenceEvaluator(probe).run(codes, {ir.input: xi})
    fused_codes = ort_session(probe, 1, True).run(codes, {ir.input: xi})
    plain_codes = ort_session(probe, 1, False).run(codes, {ir.input: xi})
    print(f"\ncodes differing from the ONNX reference on image {worst}:")
    print(f"{'tensor':44s} {'size':>8s} {'fused':>7s} {'unfused':>8s}")
    for name, r, f, p in zip(codes, ref, fused_codes, plain_codes):
        df, dp = f.astype(int) - r.astype(int), p.astype(int) - r.astype(int)
        print(f"{name[:44]:44s} {r.size:8d} {np.count_nonzero(df):7d} {np.count_nonzero(dp):8d}")


if __name__ == "__main__":
    main()
