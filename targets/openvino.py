"""OpenVINO back end for CPUs: ONNX -> IR (FP32 / FP16 weights), the one place IRs are compiled,
the precision rule, and the runner for an IR.

OpenVINO is imported only here. Two library defaults change precision without saying so, and
this module pins both:
- `ov.save_model` compresses weights to FP16 unless `compress_to_fp16=False`;
- the CPU plugin runs an FP32 IR in bf16 on CPUs with AVX512-BF16/AMX unless
  `INFERENCE_PRECISION_HINT` is `f32`. A compiled model is checked for the precision that really
  runs, and a runner reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import PipelineError
from targets.runner import RunnerBase, first_line, single_input

if TYPE_CHECKING:
    import openvino

IR_PRECISIONS = ("fp32", "fp16")  # how weights are stored in the .bin
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")  # what the CPU computes in
AUTO = "auto"  # pipeline.yaml's openvino.inference_precision: OpenVINO's choice for the CPU
DEVICE = "CPU"



def _openvino():
    """The openvino module, imported on first use: the precision rule and `import targets.openvino` need none."""
    try:
        import openvino
    except ImportError:
        raise PipelineError("OpenVINO is not installed: `pip install openvino` (the `openvino` extra)") from None
    return openvino


def openvino_version() -> str:
    ov = _openvino()
    return ov.get_version()


def inference_precision(ir_precision: str, configured: str) -> str:
    """The precision a deployed IR of `ir_precision` runs in: the FP32 IR always f32 (it is the
    lossless reference), the others what pipeline.yaml's `openvino.inference_precision` says."""
    return "f32" if ir_precision == "fp32" else configured


def precision_hint(value: str | None) -> str | None:
    """INFERENCE_PRECISION_HINT for a configured or recorded precision: None (OpenVINO's choice) for auto."""
    return None if value in (None, "", AUTO) else value


def convert_to_ir(onnx_path: str | Path, xml_path: str | Path, precision: str = "fp32") -> Path:
    """Write `xml_path` and the `.bin` beside it; the caller makes the write atomic."""
    ov = _openvino()
    if precision not in IR_PRECISIONS:
        raise PipelineError(f"IR precision must be one of {IR_PRECISIONS}, got {precision!r}")
    onnx_path, xml_path = Path(onnx_path), Path(xml_path)
    if not onnx_path.is_file():
        raise PipelineError(f"ONNX model not found: {onnx_path}")
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as error:
        raise PipelineError(f"OpenVINO cannot convert {onnx_path}: {first_line(error)}") from error
    ov.save_model(model, str(xml_path), compress_to_fp16=(precision == "fp16"))
    return xml_path


def read_ir(xml_path: str | Path, advice: str = "rebuild the IR stage") -> "openvino.Model":
    """The IR's model, with a clear error when its .xml or .bin is missing or unreadable."""
    ov = _openvino()
    xml_path = Path(xml_path)
    for path in (xml_path, xml_path.with_suffix(".bin")):
        if not path.is_file():
            raise PipelineError(f"OpenVINO IR file not found: {path} ({advice})")
    try:
        return ov.Core().read_model(str(xml_path))
    except Exception as error:
        raise PipelineError(f"cannot load OpenVINO IR {xml_path}: {first_line(error)} ({advice})") from error


def static_input_shape(partial_shape, batch: int) -> list[int]:
    """(batch, C, H, W) from an IR input's partial shape whose only dynamic dimension is the batch."""
    dims = list(partial_shape)
    rest = [d.get_length() if d.is_static else None for d in dims[1:]]
    if None in rest:
        raise PipelineError(f"input shape {partial_shape} has dynamic dimensions besides the batch")
    return [batch, *rest]


def compile_ir(
    model: "openvino.Model",
    what: str,
    inference_precision: str | None = None,
    threads: int | None = None,
    performance: str = "LATENCY",
    device: str = DEVICE,
    static_batch: int | None = None,
) -> "openvino.CompiledModel":
    """Compile `model` for `device` under a performance hint; `inference_precision=None` keeps
    OpenVINO's choice (bf16 on CPUs that have it). A precision asked for and not honoured is refused
    rather than silently run (e.g. "f16" on a CPU without AVX512-FP16 comes back as "bf16")."""
    ov = _openvino()
    if inference_precision is not None and inference_precision not in INFERENCE_PRECISIONS:
        raise PipelineError(f"inference precision must be one of {INFERENCE_PRECISIONS}, got {inference_precision!r}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise PipelineError(f"{what} must have one input and one output")
    if static_batch is not None:
        model.reshape({model.inputs[0]: static_input_shape(model.inputs[0].get_partial_shape(), static_batch)})
    config: dict[str, Any] = {"PERFORMANCE_HINT": performance}
    on_cpu = device.upper().startswith("CPU")
    if inference_precision is not None and on_cpu:
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = ov.Core().compile_model(model, device, config)
    except Exception as error:  # OpenVINO raises RuntimeError with C++ locations
        raise PipelineError(f"OpenVINO cannot load {what} on {device}: {first_line(error)}") from error
    ran = execution_precision(compiled)
    if inference_precision is not None and on_cpu and ran != inference_precision:
        raise PipelineError(
            f"this CPU cannot run {what} in {inference_precision}: OpenVINO would run it in {ran} instead; "
            f"ask for {ran!r} explicitly or build for another device"
        )
    return compiled


def execution_precision(compiled: "openvino.CompiledModel") -> str:
    """What the compiled model computes in: "f32", "bf16", "f16" (or "device default")."""
    try:
        return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except Exception:  # not every device reports it
        return "device default"


class OpenVinoRunner(RunnerBase):
    """An IR compiled for the CPU, latency-oriented, one reused infer request.

    `inference_precision=None` keeps OpenVINO's choice (bf16 on CPUs that have it); a reference
    stage passes "f32". When the CPU would compute in another precision than the one asked for,
    the runner refuses instead of silently running it.
    """

    def __init__(
        self,
        xml_path: str | Path,
        inference_precision: str | None = None,
        threads: int | None = None,
        performance: str = "LATENCY",
        static_batch: int | None = None,
    ):
        xml_path = Path(xml_path)
        model = read_ir(xml_path)
        self.fake_quantize = sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize")
        self.compiled = compile_ir(model, xml_path.name, inference_precision, threads, performance,
                                   static_batch=static_batch)
        self.input_name = self.compiled.inputs[0].get_any_name()
        self.output_name = self.compiled.outputs[0].get_any_name()
        self.execution_precision = execution_precision(self.compiled)
        self.pinned = inference_precision is not None
        core = _openvino().Core()
        self.device_name = core.get_property(DEVICE, "FULL_DEVICE_NAME")
        self.capabilities = tuple(core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self.name = f"openvino {self.execution_precision}"
        # One request reused for every batch: CompiledModel.__call__ would do the same behind
        # a lock; creating a request per batch costs allocations.
        self._request = self.compiled.create_infer_request()
        self._bound: np.ndarray | None = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # share_inputs: no copy of our contiguous float32 batch; outputs stay copies (the
        # request's buffers are overwritten by the next batch).
        results = self._request.infer(
            {self.input_name: single_input(self, inputs)}, share_inputs=True, share_outputs=False
        )
        return {self.output_name: results[self.output_name]}

    def bind(self, x: np.ndarray):
        """Set `x` as the request's input once (shared, no copy); the returned step only infers
        (for timing without per-call Python overhead)."""
        self._bound = np.ascontiguousarray(x, dtype=np.float32)  # keep the shared buffer alive
        self._request.set_input_tensor(_openvino().Tensor(self._bound, shared_memory=True))
        request = self._request

        def step():
            request.start_async()  # C++ infer, no Python-side output dictionary
            request.wait()

        return step

    def describe(self) -> dict:
        """What really ran, for reports."""
        return {
            "runtime": f"openvino {openvino_version()}",
            "device": self.device_name,
            "execution_precision": self.execution_precision,
            "optimization_capabilities": list(self.capabilities),
            "threads": self.threads,
        }


def default_threads(xml_path: str | Path | None = None) -> int:
    """INFERENCE_NUM_THREADS that OpenVINO chooses under the LATENCY hint (for `xml_path`, or a probe)."""
    ov = _openvino()
    if xml_path is not None:
        model = read_ir(xml_path)
    else:
        import openvino.opset13 as ops

        parameter = ops.parameter([1, 8, 8, 8], np.float32, name="input")
        model = ov.Model([ops.relu(parameter)], [parameter], "probe")
    return int(compile_ir(model, "probe").get_property("INFERENCE_NUM_THREADS"))


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's view of the CPU, e.g. ('BF16', 'FP32', 'INT8', ...)."""
    ov = _openvino()
    return tuple(ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
