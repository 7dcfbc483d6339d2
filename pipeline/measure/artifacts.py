"""The artifacts of a build that the speed tables measure, where a build keeps them, and their input shape."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

ARTIFACT_KEYS = ("onnx_fp32", "onnx_int8", "ir_fp32", "ir_fp16", "ir_int8")
# Where a build keeps each artifact, relative to its root (`<build_dir>/<model>/<target>`).
BUILD_LAYOUT = {
    "onnx_fp32": "simplify/model.onnx",
    "onnx_int8": "quantize/model.onnx",
    "ir_fp32": "openvino_fp32/model.xml",
    "ir_fp16": "openvino_fp16/model.xml",
    "ir_int8": "openvino_int8/model.xml",
}
TORCH_KEY = "torch_fp32"
BENCHMARK_APP_KEY = "benchmark_app_int8"
ROW_LABELS = {
    TORCH_KEY: "torch FP32 (eager)",
    "onnx_fp32": "ONNX Runtime FP32",
    "onnx_int8": "ONNX Runtime INT8 (Q/DQ)",
    "ir_fp32": "OpenVINO FP32 IR",
    "ir_fp16": "OpenVINO FP16 IR",
    "ir_int8": "OpenVINO INT8 IR",
    BENCHMARK_APP_KEY: "OpenVINO benchmark_app, INT8 IR",
}


def shared_input_dims(present: Mapping[str, Path]) -> tuple[int, ...] | None:
    """(C, H, W) of the first readable artifact's input (all of them come from the same network)."""
    for path in present.values():
        try:
            dims = input_dims(path)
        except Exception:  # an unreadable artifact gets its own "failed" row later
            continue
        if dims is not None:
            return dims
    return None


def input_dims(path: Path) -> tuple[int, ...] | None:
    """(C, H, W) of an IR's or ONNX model's input; None when one of them is dynamic."""
    if path.suffix == ".xml":
        from targets.openvino import read_ir

        dims = list(read_ir(path).inputs[0].get_partial_shape())[1:]
        return tuple(d.get_length() for d in dims) if all(d.is_static for d in dims) else None
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    dims = [i for i in graph.input if i.name not in initializers][0].type.tensor_type.shape.dim[1:]
    return tuple(d.dim_value for d in dims) if all(d.HasField("dim_value") for d in dims) else None


def missing_note(path: Path | None) -> str:
    """Why a row of an artifact that is not there was not measured."""
    if path is None:
        return "skipped: not given"
    return f"skipped: {path} not found"


def error_line(error: BaseException) -> str:
    """The first line of a failed measurement's error, for its row (runtimes raise their own types)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def table_footer(gap: float | None, gap_sentence: str, notes: Sequence[str]) -> list[str]:
    """The lines under a speed table: our loop against the vendor tool's (when both ran), then each row's note."""
    lines = ["", f"{gap_sentence}: {gap:+.1%}."] if gap is not None else []
    return lines + (["", *(f"- {note}" for note in notes)] if notes else [])
