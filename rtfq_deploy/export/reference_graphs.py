"""The graphs the research benchmarks in ``bench/`` compare an export against, built in one
place so that every script measures the same references: the subnet's export and fp32
graph, onnxruntime's own ``quantize_static`` of that graph, and two rewrites of an export
(the add-input clips OpenVINO needs, the export without its integer-side Clips).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def random_supernet(arch: str = "resnet50", space: Any = None) -> Any:
    """A random-init supernet (torch seed 0) in eval mode, torch left at one thread: latency
    depends on the graphs' shapes, not their weights, and no torch thread pool may spin
    beside the sessions being timed."""
    import torch

    from rtfq_deploy.models import SupernetConfig, build_supernet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = SupernetConfig(arch) if space is None else SupernetConfig(arch, space=space)
    return build_supernet(config).eval()


def subnet_graphs(model: Any, subnet: Any) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(rtfq-export's integer QDQ graph, the fp32 graph) of ``subnet`` (a SubnetConfig) of a
    supernet, without metadata: what ``rtfq-export`` writes, less its verification."""
    from rtfq_deploy.export.lower import lower
    from rtfq_deploy.export.onnx_graph import to_float_onnx, to_onnx

    ir = lower(model, model.active(subnet), subnet.resolution)
    return to_onnx(ir, {}), to_float_onnx(ir)


def ort_quantize_static(fp32: onnx.ModelProto, resolution: int) -> bytes:
    """onnxruntime's ``quantize_static`` of an fp32 graph (QDQ, per-channel, U8S8),
    calibrated on 4 random images: the reference an export's latency is read against."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((1, 3, resolution, resolution)).astype(np.float32)}
                                 for _ in range(4)])

        def get_next(self):  # noqa: ANN201
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "qdq.onnx")
        onnx.save(fp32, src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        with open(dst, "rb") as f:
            return f.read()


def without_clips(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every Clip whose bounds are initializers bypassed (its readers read
    its input): the export's integer-side ranges gone, 8-bit everywhere. Not exact below
    8 bits; a reference for what the Clips cost and change."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name for t in out.graph.initializer}
    bypass = {n.output[0]: n.input[0] for n in out.graph.node
              if n.op_type == "Clip" and len(n.input) > 1 and n.input[1] in inits}
    kept = [n for n in out.graph.node if not (n.op_type == "Clip" and n.output[0] in bypass)]
    for n in kept:
        n.input[:] = [bypass.get(i, i) for i in n.input]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def add_input_clips(model: onnx.ModelProto, every: bool = False) -> tuple[onnx.ModelProto, int]:
    """A full-range integer Clip (an identity) between QuantizeLinear and DequantizeLinear
    on every input of a residual Add that has none (``every``: on every activation
    QuantizeLinear that has none): OpenVINO then keeps that tensor's requantization
    instead of fusing the add into the producing convolution. Returns the model and the
    number of tensors clipped."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = {i for n in model.graph.node for i in n.input if n.op_type == "Clip"}
    targets = {n.output[0] for n in model.graph.node if every and n.op_type == "QuantizeLinear"
               and n.output[0] not in consumers and n.input[0] != model.graph.input[0].name}
    for node in model.graph.node:
        if node.op_type == "Add":
            for name in node.input:
                dq = producers.get(name)
                q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
                if q is not None and q.op_type == "QuantizeLinear":
                    targets.add(q.output[0])
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type == "QuantizeLinear" and node.output[0] in targets:
            name = node.output[0]
            dtype = numpy_helper.to_array(inits[node.input[2]]).dtype
            info = np.iinfo(dtype)
            node.output[0] = f"{name}.unclipped"
            model.graph.initializer.extend([numpy_helper.from_array(np.array(info.min, dtype), f"{name}.cmin"),
                                            numpy_helper.from_array(np.array(info.max, dtype), f"{name}.cmax")])
            nodes.append(helper.make_node("Clip", [f"{name}.unclipped", f"{name}.cmin", f"{name}.cmax"], [name]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, len(targets)
