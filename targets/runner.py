"""The runner contract every back end keeps: open, named numpy inputs in, named numpy outputs out,
close, and a description of what really ran.

Drift checks, calibration, the sensitivity ranking, benchmarks, `verify`, `device-build` and the
camera runtime only see `Runner`s, so torch (`targets.pytorch`), ONNX Runtime
(`targets.onnxruntime`), OpenVINO (`targets.openvino`) and TensorRT (`targets.tensorrt`) are
interchangeable. The project's ONNX convention: one input named `input` (N,3,H,W float32, dynamic
batch axis), one output `logits`.

Importing this module imports no runtime: each back end imports its library itself (the camera
runtime never needs torch). The device imports this module: it depends on nothing of the build host.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class Runner(Protocol):
    name: str  # what ran, for reports: "torch fp32", "onnxruntime", "openvino f32", ...
    input_name: str
    output_name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict: ...  # precision, device, threads: what really ran

    def close(self) -> None: ...


class RunnerBase:
    """Defaults of the contract: a runner without resources to free, described by its name."""

    name = "runner"
    input_name = INPUT_NAME
    output_name = OUTPUT_NAME
    execution_precision = "fp32"

    def describe(self) -> dict:
        return {"runtime": self.name, "execution_precision": self.execution_precision}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def close(runner) -> None:
    """Close a runner that holds resources (every runner of this package has `close`)."""
    getattr(runner, "close", lambda: None)()


def first_line(error: BaseException) -> str:
    """The informative line of a back end's error (OpenVINO's and ONNX Runtime's start with C++
    source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (useful or lines or [type(error).__name__])[0]
