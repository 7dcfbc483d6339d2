"""ONNX Runtime back end: the one place sessions are opened, and the runner over an ONNX file.

The build's drift checks, calibration, the sensitivity ranking, the bundle's intermediate tensors,
the benchmark and the camera runtime all open their sessions through `open_session`, so the rule
below is decided here once: ONNX Runtime's CPU provider computes FP16-typed graphs wrongly with its
graph optimizations on (fused FP16 kernels; design.md), so an FP16-typed model runs with them off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from targets.runner import RunnerBase, first_line, single_input

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise PipelineError("the ONNX Runtime back end is not installed: `pip install onnxruntime`, "
                            "or choose another back end") from None
    return onnxruntime


def graph_optimizations(fp16_typed: bool, provider: str = CPU, exact: bool = False) -> bool:
    """Whether ONNX Runtime may optimize the graph: not for FP16-typed models on the CPU provider, nor where the
    Q/DQ model's exact arithmetic is asked for (`exact`: each DequantizeLinear and Conv in float, no INT8
    kernel, which on x86 without VNNI saturates pair sums that TensorRT does not)."""
    return not exact and not (fp16_typed and provider == CPU)


def providers_for(device: str = "CPU") -> list[str]:
    """ONNX Runtime's providers for a device name (CPU, or CUDA/GPU where onnxruntime-gpu is installed)."""
    if device.upper() == "CPU":
        return [CPU]
    if device.upper() in ("GPU", "CUDA"):
        if CUDA not in _ort().get_available_providers():
            raise PipelineError(f"device {device!r}: this ONNX Runtime has no CUDA provider "
                                "(install onnxruntime-gpu, or use --device CPU)")
        return [CUDA, CPU]
    raise PipelineError(f"device {device!r} is not one ONNX Runtime knows here: use CPU or CUDA")


def open_session(model, threads: int | None = None, fp16_typed: bool = False, device: str = "CPU",
                 what: str | None = None, advice: str = "", exact: bool = False):
    """An InferenceSession over an ONNX file or a serialized / in-memory `onnx.ModelProto`.

    `threads`: intra-op threads (None or 0: ONNX Runtime's choice). A model that cannot be loaded is
    a PipelineError naming `what` (the file, by default) and saying `advice`."""
    ort = _ort()
    providers = providers_for(device)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not graph_optimizations(fp16_typed, providers[0], exact):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, (str, Path)):
        source, what = str(model), what or str(model)
    else:
        source = model if isinstance(model, bytes) else model.SerializeToString()
        what = what or "the ONNX model"
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as error:  # onnxruntime raises several private exception types
        advice = f" ({advice})" if advice else ""
        raise PipelineError(f"cannot load ONNX model {what}: {first_line(error)}{advice}") from error


class OnnxRuntimeRunner(RunnerBase):
    """An ONNX file on ONNX Runtime (CPU provider by default); input/output names come from the model.

    `fp16_typed=True` marks an FP16-typed graph, which runs with graph optimizations off on the CPU.
    """

    def __init__(self, path: str | Path, threads: int | None = None, name: str = "onnxruntime",
                 fp16_typed: bool = False, device: str = "CPU", exact: bool = False):
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"ONNX model not found: {path}")
        self.session = open_session(path, threads, fp16_typed, device, advice="rebuild the stage that wrote it",
                                    exact=exact)
        provider = self.session.get_providers()[0]
        if not graph_optimizations(fp16_typed, provider, exact):
            name = f"{name} (graph optimizations off)"
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise PipelineError(
                f"{path} must have one input and one output, it has "
                f"{[i.name for i in inputs]} -> {[o.name for o in outputs]}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_type = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.name = name
        self.threads = threads
        self.execution_precision = "fp16 (host proxy)" if fp16_typed else "fp32"
        self.provider = provider

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {self.input_name: single_input(self, inputs).astype(self.input_type, copy=False)}
        (logits,) = self.session.run([self.output_name], feed)
        return {self.output_name: logits}

    def describe(self) -> dict:
        import onnxruntime

        return {"runtime": f"onnxruntime {onnxruntime.__version__}", "device": self.provider,
                "execution_precision": self.execution_precision, "threads": self.threads}
