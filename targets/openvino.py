"""OpenVINO back end for CPUs: ONNX -> IR (FP32 / FP16 weights) and a runner for the IR.

OpenVINO is imported only here. Two library defaults change precision without saying so, and
this module pins both:
- `ov.save_model` compresses weights to FP16 unless `compress_to_fp16=False`;
- the CPU plugin runs an FP32 IR in bf16 on CPUs with AVX512-BF16/AMX unless
  `INFERENCE_PRECISION_HINT` is `f32`. A runner reports the precision that really ran.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov

from pipeline.errors import PipelineError
from pipeline.runners import single_input

IR_PRECISIONS = ("fp32", "fp16")  # how weights are stored in the .bin
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")  # what the CPU computes in
DEVICE = "CPU"


def openvino_version() -> str:
    return ov.get_version()


def convert_to_ir(onnx_path: str | Path, xml_path: str | Path, precision: str = "fp32") -> Path:
    """Write `xml_path` and the `.bin` beside it; the caller makes the write atomic."""
    if precision not in IR_PRECISIONS:
        raise PipelineError(f"IR precision must be one of {IR_PRECISIONS}, got {precision!r}")
    onnx_path, xml_path = Path(onnx_path), Path(xml_path)
    if not onnx_path.is_file():
        raise PipelineError(f"ONNX model not found: {onnx_path}")
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as error:
        raise PipelineError(f"OpenVINO cannot convert {onnx_path}: {_first_line(error)}") from error
    ov.save_model(model, str(xml_path), compress_to_fp16=(precision == "fp16"))
    return xml_path


class OpenVinoRunner:
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
    ):
        if inference_precision is not None and inference_precision not in INFERENCE_PRECISIONS:
            raise PipelineError(
                f"inference precision must be one of {INFERENCE_PRECISIONS}, "
                f"got {inference_precision!r}"
            )
        xml_path = Path(xml_path)
        bin_path = xml_path.with_suffix(".bin")
        for path in (xml_path, bin_path):
            if not path.is_file():
                raise PipelineError(f"OpenVINO IR file not found: {path} (rebuild the IR stage)")

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if inference_precision is not None:
            config["INFERENCE_PRECISION_HINT"] = inference_precision
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core.read_model(str(xml_path))
            self.compiled = core.compile_model(model, DEVICE, config)
        except Exception as error:
            raise PipelineError(
                f"cannot load OpenVINO IR {xml_path}: {_first_line(error)} (rebuild the IR stage)"
            ) from error

        if len(self.compiled.inputs) != 1 or len(self.compiled.outputs) != 1:
            raise PipelineError(f"{xml_path} must have one input and one output")
        self.input_name = self.compiled.inputs[0].get_any_name()
        self.output_name = self.compiled.outputs[0].get_any_name()
        # Read back what the plugin will compute in: e.g. "f16" asked on a CPU without
        # AVX512-FP16 comes back as "bf16".
        precision = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type
        self.execution_precision = precision.get_type_name()  # "f32", "bf16", "f16"
        if inference_precision is not None and self.execution_precision != inference_precision:
            raise PipelineError(
                f"this CPU cannot run {xml_path.name} in {inference_precision}: OpenVINO would "
                f"run it in {self.execution_precision} instead; ask for "
                f"{self.execution_precision!r} explicitly or build for another device"
            )
        self.device_name = core.get_property(DEVICE, "FULL_DEVICE_NAME")
        self.capabilities = tuple(core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
        self.threads = self.compiled.get_property("INFERENCE_NUM_THREADS")
        self.name = f"openvino {self.execution_precision}"
        # One request reused for every batch: CompiledModel.__call__ would do the same behind
        # a lock; creating a request per batch costs allocations.
        self._request = self.compiled.create_infer_request()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # share_inputs: no copy of our contiguous float32 batch; outputs stay copies (the
        # request's buffers are overwritten by the next batch).
        results = self._request.infer(
            {self.input_name: single_input(self, inputs)}, share_inputs=True, share_outputs=False
        )
        return {self.output_name: results[self.output_name]}

    def describe(self) -> dict:
        """What really ran, for reports."""
        return {
            "runtime": f"openvino {openvino_version()}",
            "device": self.device_name,
            "execution_precision": self.execution_precision,
            "optimization_capabilities": list(self.capabilities),
            "threads": self.threads,
        }


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's view of the CPU, e.g. ('BF16', 'FP32', 'INT8', ...)."""
    return tuple(ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


def _first_line(error: Exception) -> str:
    """The informative line of an OpenVINO error (it starts with C++ source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (useful or lines or [type(error).__name__])[0]
