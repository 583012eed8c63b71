"""The runtimes a model is benchmarked on: onnxruntime and OpenVINO, behind one small interface.

Each runtime is imported only inside the measuring child that uses it (never at module
import time), so a device installs only the runtime it runs: ``pip install onnxruntime``
or ``pip install openvino`` (the ``openvino`` extra). Both read the same exported ONNX QDQ
file; OpenVINO compiles it for one of its plugins (``CPU`` by default), onnxruntime
creates a session on an execution provider.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import ONNXRUNTIME, OPENVINO, RUNTIMES

_PACKAGES = {ONNXRUNTIME: "onnxruntime", OPENVINO: "openvino"}  # runtime -> the package that provides it
_INSTALL = {ONNXRUNTIME: "pip install onnxruntime", OPENVINO: "pip install 'rtfq_deploy[openvino]' (or openvino)"}

GRAPH_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                      "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64",
               "tensor(bool)": "bool"}


def check_runtime_name(name: str) -> str:
    if name not in RUNTIMES:
        raise RtfqError(f"unknown runtime {name!r}: expected one of {', '.join(RUNTIMES)}")
    return name


def require(name: str) -> Any:
    """The runtime's module, or one RtfqError line saying how to install it."""
    check_runtime_name(name)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise RtfqError(f"runtime {name} is not installed here ({' '.join(str(e).split())[:120]}): "
                        f"{_INSTALL[name]}") from None


def version(name: str) -> str | None:
    """The installed version of a runtime's package, without importing it."""
    try:
        return importlib.metadata.version(_PACKAGES[name])
    except importlib.metadata.PackageNotFoundError:
        return None


_VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")  # OpenVINO's plugins over other plugins


def check_openvino_device(device: str) -> str:
    """``device`` if OpenVINO offers that plugin here (virtual ones like AUTO:CPU pass),
    else one RtfqError line naming those it offers."""
    ov = require(OPENVINO)
    if device.split(":")[0].upper() in _VIRTUAL_DEVICES:
        return device
    available = list(ov.Core().available_devices)
    if device not in available:
        raise RtfqError(f"OpenVINO device {device!r} is not available here (OpenVINO offers: {', '.join(available)})")
    return device


@dataclass(frozen=True)
class Input:
    name: str
    dtype: str | None  # numpy dtype name; None when the benchmark cannot generate it
    type_text: str
    shape: tuple[int | str | None, ...]  # int where fixed, else the symbolic name or None


class Session:
    """A compiled model ready to run. ``set_inputs`` once, then ``run`` repeatedly (timed);
    ``infer`` runs given inputs and returns the first output (accuracy)."""

    inputs: Sequence[Input]
    metadata: Mapping[str, str]
    details: Mapping[str, Any]  # what the results row records about how it ran

    def set_inputs(self, feeds: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def infer(self, feeds: Mapping[str, Any]) -> Any:
        raise NotImplementedError


class OrtSession(Session):
    def __init__(self, path: str, threads: int, provider: str, graph_optimization: str, arena: bool) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = arena
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[graph_optimization])
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=[provider])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.inputs = [Input(a.name, _ORT_DTYPES.get(a.type), a.type, tuple(a.shape)) for a in self.session.get_inputs()]
        self.details = {"providers": self.session.get_providers()}
        self._feeds: Mapping[str, Any] = {}

    def set_inputs(self, feeds: Mapping[str, Any]) -> None:
        self._feeds = feeds

    def run(self) -> None:
        self.session.run(None, self._feeds)

    def infer(self, feeds: Mapping[str, Any]) -> Any:
        return self.session.run(None, feeds)[0]


class OvSession(Session):
    """OpenVINO: the model is reshaped to a static batch before compiling (the CPU plugin
    runs static shapes fastest), one stream, ``threads`` inference threads."""

    def __init__(self, path: str, threads: int, device: str, batch_size: int, metadata: Mapping[str, str]) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(path)
        shapes = {}
        for port in model.inputs:
            dims = list(port.get_partial_shape())
            if dims and not dims[0].is_static:
                dims[0] = ov.Dimension(batch_size)
            shapes[port.get_any_name()] = ov.PartialShape(dims)
        model.reshape(shapes)
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self.metadata = dict(metadata)
        self.inputs = []
        for port in self.compiled.inputs:
            try:
                dtype = port.get_element_type().to_dtype().name
            except Exception:  # noqa: BLE001  an element type numpy has no name for
                dtype = None
            shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
            self.inputs.append(Input(port.get_any_name(), dtype, str(port.get_element_type()), shape))
        self.details = {"openvino_device": device,
                        "inference_threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS"))}

    def set_inputs(self, feeds: Mapping[str, Any]) -> None:
        for name, value in feeds.items():
            self.request.set_tensor(name, _ov_tensor(value))

    def run(self) -> None:
        self.request.infer()

    def infer(self, feeds: Mapping[str, Any]) -> Any:
        self.request.infer(dict(feeds))
        return self.request.get_output_tensor(0).data.copy()


def _ov_tensor(value: Any) -> Any:
    import openvino as ov

    return ov.Tensor(value, shared_memory=True)


def open_session(runtime: str, path: str, *, threads: int, provider: str = "CPUExecutionProvider",
                 graph_optimization: str = "all", arena: bool = True, openvino_device: str = "CPU",
                 batch_size: int = 1, metadata: Callable[[], Mapping[str, str]] | None = None) -> Session:
    """A session on ``runtime``; ``metadata`` reads the file's metadata where the runtime cannot."""
    if runtime == ONNXRUNTIME:
        return OrtSession(path, threads, provider, graph_optimization, arena)
    if runtime == OPENVINO:
        return OvSession(path, threads, openvino_device, batch_size, metadata() if metadata else {})
    raise ValueError(f"unknown runtime {runtime!r}")
