"""Where OpenVINO departs from the QDQ semantics of an export, and which equivalent graph is exact.

onnxruntime runs an export exactly (its top-1 equals PyTorch's evaluation of the integer
network); OpenVINO's CPU plugin lowers the same file to u8 convolutions with fused
requantization and residual adds. This script exports subnets of a tiny_resnet supernet
whose BatchNorm was randomised like a trained one (some gammas negative, so some folded
weight scales are negative), runs them on both runtimes over the same inputs, and prints:

1. per graph variant, the share of inputs whose top-1 class agrees and the logit
   difference in output steps (one step = the logit's quantization step s_pool * s_fc);
   the variants are rewrites of the exported file with the same QDQ semantics, plus
   diagnostic ones that change them:
   - ``as exported``;
   - ``positive scales``: channels with a negative weight scale get negated codes, scale
     and bias (equivalent where no code is -2^(b-1); such channels are counted);
   - ``int8 signed``: tensors carried as uint8 with zero point 128 become int8 with zero
     point 0 (codes shifted by 128; equivalent);
   - ``both`` of the above;
   - ``no clips`` (diagnostic, changes 4- and 6-bit semantics): the integer-side Clips
     removed from both runtimes' graphs;
2. for one variant, every activation tensor in graph order: the share of codes that
   differ between the runtimes and the largest difference in codes, from prefix models
   that end at that tensor; for the first tensor that differs, how far the differing
   codes' pre-quantization values (onnxruntime's, in steps) lie from a rounding tie.

    python bench/openvino_semantics.py                      # r128-w1.00 at q8, q6, q4; 256 random inputs
    python bench/openvino_semantics.py --subnets r128-w0.60-q4 --inputs 64 --no-bn-randomise
    python bench/openvino_semantics.py --models DIR --images DIR   # exported files on labeled images

With ``--models`` (a folder of exports, e.g. ``rtfq demo``'s) and ``--images`` (held-out
labeled images, as for ``rtfq eval``), each file as exported and with the add-input
clips: top-1 on each runtime, the share of images whose top-1 agrees and whose logits
are identical.
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from rtfq_deploy.export.reference_graphs import add_input_clips, without_clips
from rtfq_deploy.bench.runtimes import open_session
from rtfq_deploy.bench.sessions import ort_session
from rtfq_deploy.formats import ARCH_NAMES
from rtfq_deploy.scriptargs import Parser, positive


def build_checkpoint(path: Path, classes: int, seed: int, randomise_bn: bool, arch: str = "tiny_resnet") -> None:
    import torch

    from rtfq_deploy.checkpoint import save_checkpoint
    from rtfq_deploy.models import SupernetConfig, build_supernet

    torch.manual_seed(seed)
    model = build_supernet(SupernetConfig(arch, num_classes=classes))
    if randomise_bn:  # what training leaves: gammas of either sign, shifts, running statistics
        with torch.no_grad():
            for m in model.modules():
                for name, init in (("weight", lambda t: t.normal_(0.3, 0.6)), ("bias", lambda t: t.normal_(0, 0.3)),
                                   ("running_mean", lambda t: t.normal_(0, 0.3)),
                                   ("running_var", lambda t: t.uniform_(0.3, 2.0))):
                    t = getattr(m, name, None)
                    if isinstance(t, torch.Tensor) and "BatchNorm" in type(m).__name__:
                        init(t)
    save_checkpoint(path, model)


def export(checkpoint: Path, subnet: str, out: Path) -> None:
    import subprocess

    exe = Path(sys.executable).parent / "rtfq-export"
    result = subprocess.run([str(exe), "--checkpoint", str(checkpoint), "--subnet", subnet, "--no-verify", "-o",
                             str(out)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"export of {subnet} failed: {result.stderr.strip()}")


# ---- equivalent rewrites -------------------------------------------------------------------

def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _set(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def positive_scales(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    """Negate codes, scale and bias of every channel with a negative weight scale.
    Returns the model, channels flipped, channels left (a -2^(b-1) code would overflow)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = _inits(model)
    flipped = left = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith(".weight_q"):
            continue
        prefix = node.input[0].removesuffix(".weight_q")
        codes = numpy_helper.to_array(inits[node.input[0]]).copy()
        scale = numpy_helper.to_array(inits[node.input[1]]).copy()
        bias_q = numpy_helper.to_array(inits[f"{prefix}.bias_q"]).copy()
        bias_s = numpy_helper.to_array(inits[f"{prefix}.bias_scale"]).copy()
        for c in np.flatnonzero(scale < 0):
            if codes[c].min() == np.iinfo(codes.dtype).min:
                left += 1
                continue
            codes[c], scale[c] = -codes[c], -scale[c]
            bias_q[c], bias_s[c] = -bias_q[c], -bias_s[c]
            flipped += 1
        _set(model, node.input[0], codes)
        _set(model, node.input[1], scale)
        _set(model, f"{prefix}.bias_q", bias_q)
        _set(model, f"{prefix}.bias_scale", bias_s)
    return model, flipped, left


def int8_signed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """uint8 zero point 128 -> int8 zero point 0 (every Q/DQ/Clip bound on such a tensor)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = _inits(model)
    zps = {n for n, t in inits.items() if t.data_type == onnx.TensorProto.UINT8 and n.endswith(".zp")
           and numpy_helper.to_array(t).size == 1 and int(numpy_helper.to_array(t)) == 128}
    for name in zps:
        _set(model, name, np.array(0, np.int8))
    clips = 0
    for node in model.graph.node:
        if node.op_type == "Clip":
            lo, hi = inits.get(node.input[1]), inits.get(node.input[2])
            prefix = node.input[1].removesuffix(".min")
            if f"{prefix}.zp" in zps and lo is not None and hi is not None:
                _set(model, node.input[1], (numpy_helper.to_array(lo).astype(np.int16) - 128).astype(np.int8))
                _set(model, node.input[2], (numpy_helper.to_array(hi).astype(np.int16) - 128).astype(np.int8))
                clips += 1
    return model, len(zps)


# ---- running ---------------------------------------------------------------------------------

def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The first output of onnxruntime (one thread) on ``x``, 32 inputs at a time."""
    session = ort_session(model, 1)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])


def run_ov(model: onnx.ModelProto, x: np.ndarray, folder: Path) -> np.ndarray:
    """The first output of OpenVINO's CPU plugin (one thread, batch 32, the last batch
    padded with zeros) on ``x``."""
    path = folder / "ov.onnx"
    onnx.save(model, path)
    session = open_session("openvino", str(path), threads=1, batch_size=32)
    name = session.inputs[0].name
    outs = []
    for i in range(0, len(x), 32):
        chunk = x[i:i + 32]
        pad = 32 - len(chunk)
        batch = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
        outs.append(np.asarray(session.infer({name: batch}))[:len(chunk)])
    return np.concatenate(outs)


def output_step(model: onnx.ModelProto) -> np.ndarray:
    inits = _inits(model)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")  # the classifier, whatever its name
    fc = numpy_helper.to_array(inits[gemm.input[1].removesuffix(".weight") + ".weight_scale"])
    pool = float(numpy_helper.to_array(inits["q_pool.scale"]))
    return np.abs(pool * fc)


def compare(model: onnx.ModelProto, x: np.ndarray, folder: Path) -> dict[str, float]:
    a, b = run_ort(model, x), run_ov(model, x, folder)
    steps = np.abs(a - b) / output_step(model)
    return {"agree": float((a.argmax(1) == b.argmax(1)).mean()), "max_steps": float(steps.max()),
            "mean_steps": float(steps.mean()), "exact": float((steps < 1e-3).all(axis=1).mean())}


def activations(model: onnx.ModelProto) -> list[tuple[str, str, str, str]]:
    """(dq output, q codes tensor, scale init, zp init) of every activation DequantizeLinear."""
    inits = _inits(model)
    return [(n.output[0], n.input[0], n.input[1], n.input[2]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] not in inits]


def prefix_model(model: onnx.ModelProto, tensor: str, extra: list[str] = ()) -> onnx.ModelProto:
    from onnx.utils import Extractor

    sub = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model([model.graph.input[0].name],
                                                                             [tensor, *extra])
    del sub.opset_import[:]
    sub.opset_import.extend(model.opset_import)
    return sub


def _pre_quantization(model: onnx.ModelProto, codes: str) -> str | None:
    """The float tensor the QuantizeLinear that makes ``codes`` reads."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(codes)
    while node is not None and node.op_type != "QuantizeLinear":
        node = producers.get(node.input[0])
    return None if node is None else node.input[0]


def per_tensor(model: onnx.ModelProto, x: np.ndarray, folder: Path) -> None:
    """Codes of every activation tensor on both runtimes; where they differ, how far
    onnxruntime's value before rounding is from a tie (0: exactly halfway between codes)."""
    inits = _inits(model)
    print(f"  {'tensor':28s} {'clip':>4s} {'codes differ':>12s} {'max':>4s} {'at a tie (<0.01 step)':>22s}")
    for dq_out, codes, scale_name, zp_name in activations(model):
        scale = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
        zp = numpy_helper.to_array(inits[zp_name]).astype(np.float64)
        sub = prefix_model(model, dq_out)
        a, b = run_ort(sub, x), run_ov(sub, x, folder)
        diff = np.abs(np.round(a / scale + zp) - np.round(b / scale + zp))
        clip = any(n.op_type == "Clip" and n.output[0] == codes for n in model.graph.node)
        ties = "-"
        pre = _pre_quantization(model, codes)
        if diff.max() > 0 and pre is not None:
            value = run_ort(prefix_model(model, pre), x).astype(np.float64) / scale
            if value.size == diff.size:
                value = value.reshape(diff.shape)
                frac = np.abs(value - np.floor(value) - 0.5)
                ties = f"{float((frac[diff > 0] < 0.01).mean()):.0%} (of all {float((frac < 0.01).mean()):.1%})"
        print(f"  {dq_out:28s} {'yes' if clip else '':>4s} {float((diff > 0).mean()):12.3%} {int(diff.max()):4d} "
              f"{ties:>22s}")


def on_images(models: Path, images: Path) -> None:
    """Each export as it is and with add-input clips, on both runtimes, on labeled images."""
    import tempfile

    from tabulate import tabulate

    from rtfq_deploy.bench.images import scan

    image_set = scan(images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for path in sorted(models.glob("*.onnx")):
            x_path, y_path = image_set.arrays_for(path, folder)
            x, y = np.load(x_path), np.load(y_path)
            model = onnx.load(path)
            row = [path.stem]
            for variant in (model, add_input_clips(model)[0]):
                a, b = run_ort(variant, x), run_ov(variant, x, folder)
                steps = np.abs(a - b) / output_step(variant)
                row += [f"{float((a.argmax(1) == y).mean()):.4f}", f"{float((b.argmax(1) == y).mean()):.4f}",
                        f"{float((a.argmax(1) == b.argmax(1)).mean()):.2%}", f"{float((steps < 1e-3).all(1).mean()):.2%}"]
            rows.append(row)
            print(" ".join(row), file=sys.stderr, flush=True)
    heads = [f"{v} {h}" for v in ("exported", "addclip") for h in ("ort top-1", "ov top-1", "agree", "identical")]
    print(f"{len(image_set.paths)} images in {images}")
    print(tabulate(rows, headers=["subnet", *heads], disable_numparse=True))


def main() -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subnets", default="r128-w1.00-q8,r128-w1.00-q6,r128-w1.00-q4")
    p.add_argument("--inputs", type=positive, default=256)
    p.add_argument("--classes", type=positive, default=10)
    p.add_argument("--arch", default="tiny_resnet", choices=ARCH_NAMES,
                   help="resnet50: bottleneck blocks with identity shortcuts (subnets like r128-w0.60-q8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-inputs", action="store_true",
                   help="inputs on the input quantizer's grid (no rounding ties at the input)")
    p.add_argument("--no-bn-randomise", action="store_true", help="keep the initial BatchNorm (gamma 1)")
    p.add_argument("--per-tensor", default="add-input clips", help="variant whose tensors are compared one by one "
                                                              "('' for none)")
    p.add_argument("--models", type=Path, help="a folder of exported files: compare them on --images instead")
    p.add_argument("--images", type=Path, help="labeled images (one sub-folder per class) for --models")
    args = p.parse_args()
    if (args.models is None) != (args.images is None):
        p.error("--models and --images go together")
    if args.models is not None:
        on_images(args.models, args.images)
        return
    if args.inputs > 100_000:
        p.error("--inputs must be between 1 and 100000")
    import importlib.metadata

    print(f"onnxruntime {importlib.metadata.version('onnxruntime')}, openvino {importlib.metadata.version('openvino')}; "
          f"{args.inputs} inputs drawn from N(0, 1) per value" + (", on the input grid" if args.grid_inputs else ""))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_checkpoint(folder / "ck.pt", args.classes, args.seed, not args.no_bn_randomise, args.arch)
        for subnet in args.subnets.split(","):
            export(folder / "ck.pt", subnet, folder / f"{subnet}.onnx")
            model = onnx.load(folder / f"{subnet}.onnx")
            r = int(model.graph.input[0].type.tensor_type.shape.dim[2].dim_value)
            x = np.random.default_rng(args.seed).standard_normal((args.inputs, 3, r, r)).astype(np.float32)
            if args.grid_inputs:  # exactly on the input quantizer's grid: no rounding tie at the input
                s_in = float(numpy_helper.to_array(_inits(model)["q_input.scale"]))
                x = (np.round(x / s_in) * s_in).astype(np.float32)
            pos, flipped, left = positive_scales(model)
            clipped, branches = add_input_clips(model)
            signed, zps = int8_signed(model)
            both, _ = int8_signed(pos)
            scales = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith(".weight_scale")]
            negative = sum(int((s < 0).sum()) for s in scales)
            print(f"\n{subnet}: {negative} of {sum(s.size for s in scales)} weight channels have a negative scale "
                  f"({flipped} flipped, {left} left: a -2^(b-1) code), {zps} uint8 zero-point-128 tensors, "
                  f"{collections.Counter(n.op_type for n in model.graph.node)['Clip']} integer-side Clips, "
                  f"{branches} residual-add inputs without one")
            variants = {"as exported": model, "positive scales": pos, "int8 signed": signed, "both": both,
                        "add-input clips": clipped, "add-input clips, both": add_input_clips(both)[0],
                        "clips on every tensor": add_input_clips(model, every=True)[0],
                        "no clips (diagnostic)": without_clips(model)}
            print(f"{'variant':30s} {'top-1 agrees':>12s} {'exact rows':>10s} {'max steps':>9s} {'mean steps':>10s}")
            for name, variant in variants.items():
                c = compare(variant, x, folder)
                print(f"{name:30s} {c['agree']:12.2%} {c['exact']:10.2%} {c['max_steps']:9.1f} {c['mean_steps']:10.3f}")
            if args.per_tensor:
                print(f"per tensor, variant '{args.per_tensor}' ({min(64, len(x))} inputs):")
                per_tensor(variants[args.per_tensor], x[:64], folder)


if __name__ == "__main__":
    main()
