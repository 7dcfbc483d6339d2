"""One runner interface for every back end: named numpy inputs in, named numpy outputs out.

Drift checks, benchmarks and reports only see `Runner`s, so torch, ONNX Runtime, OpenVINO
(`targets.openvino`) and TensorRT (`targets.tensorrt`) are interchangeable. The project's ONNX
convention: one input named `input` (N,3,H,W float32, dynamic batch axis), one output `logits`.

Importing this module imports no runtime: torch and onnxruntime are imported by the runner that
needs them (the camera runtime never needs torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from pipeline.errors import PipelineError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class Runner(Protocol):
    name: str  # what ran, for reports: "torch fp32", "onnxruntime", "openvino f32", ...
    input_name: str
    output_name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def predict(
    runner: Runner,
    images: np.ndarray,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Logits (N, classes) of float32 images (N, C, H, W), `batch_size` images per run.

    `progress(done, total)` is called after every batch. `prepare` turns each batch slice into network
    input (e.g. normalises uint8 crops), so that only one batch of float input exists at a time.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    total = len(images)
    batches = []
    for start in range(0, total, batch_size):
        batch = images[start : start + batch_size]
        batch = images_as_input(prepare(batch) if prepare is not None else batch)
        batches.append(runner.run({runner.input_name: batch})[runner.output_name])
        if progress is not None:
            progress(min(start + batch_size, total), total)
    if not batches:
        raise ValueError("predict needs at least one image")
    return np.concatenate(batches)


def images_as_input(images: np.ndarray) -> np.ndarray:
    """C-contiguous float32, the layout every back end takes without another copy."""
    return np.ascontiguousarray(images, dtype=np.float32)


def single_input(runner: Runner, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The runner's one input from `inputs`, with a clear error when it is missing."""
    try:
        return images_as_input(inputs[runner.input_name])
    except KeyError:
        raise ValueError(
            f"{runner.name}: no input named {runner.input_name!r} (got {sorted(inputs)})"
        ) from None


class TorchRunner:
    """The FP32 reference: a torch module in eval mode under `inference_mode`."""

    input_name = INPUT_NAME
    output_name = OUTPUT_NAME

    def __init__(self, module, name: str = "torch fp32"):
        import torch

        non_fp32 = {str(p.dtype) for p in module.parameters() if p.dtype != torch.float32}
        if non_fp32:
            # The reference must be FP32: converting here would hide a wrong model.
            raise PipelineError(
                f"the torch reference must be float32, the module has {sorted(non_fp32)} "
                "parameters: load the checkpoint as float32"
            )
        self._torch = torch
        self.module = module.eval()
        self.name = name

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self._torch.from_numpy(single_input(self, inputs))
        with self._torch.inference_mode():
            logits = self.module(x)
        return {self.output_name: logits.numpy()}


class OnnxRuntimeRunner:
    """An ONNX file on ONNX Runtime's CPU provider; input/output names come from the model.

    `optimize=False` turns ONNX Runtime's graph optimizations off: its CPU provider computes
    FP16-typed graphs wrongly with them on (fused FP16 kernels; design.md), so FP16 models run without.
    """

    def __init__(self, path: str | Path, threads: int | None = None, name: str = "onnxruntime",
                 optimize: bool = True):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            name = f"{name} (graph optimizations off)"
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises several private exception types
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise PipelineError(
                f"cannot load ONNX model {path}: {first_line} (rebuild the stage that wrote it)"
            ) from error
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise PipelineError(
                f"{path} must have one input and one output, it has "
                f"{[i.name for i in inputs]} -> {[o.name for o in outputs]}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.name = name

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {self.input_name: single_input(self, inputs)}
        (logits,) = self.session.run([self.output_name], feed)
        return {self.output_name: logits}
