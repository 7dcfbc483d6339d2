"""The bundle's golden data: the logits each bundled model gives on the golden images (reused from the
drift checks where they cover them), the tolerance a device reproduces them within, and the
intermediate tensors device-build compares when an engine diverges."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from pipeline.cache import MARKER
from pipeline.layout import LOGITS_FILE, check_folder

if TYPE_CHECKING:
    from pipeline.context import BuildContext

INTERMEDIATE_IMAGES = 2  # golden images whose intermediate tensors are stored
MAX_INTERMEDIATES = 16
TOLERANCE_MARGIN = 1.25  # times the largest difference seen here, plus TOLERANCE_FLOOR
TOLERANCE_FLOOR = 1e-3


class Golden:
    """The golden images and their reference, and the logits a model gives on them (reused when checked)."""

    def __init__(self, ctx: "BuildContext", crops: np.ndarray, reference: np.ndarray, labels: np.ndarray):
        self.ctx, self.crops, self.reference, self.labels = ctx, crops, reference, labels

    def logits(self, runner_factory: Callable, reuse: list[Path] = ()) -> np.ndarray:
        """The model's logits on the golden images: from an earlier check's logits when they cover them."""
        count = len(self.crops)
        for path in reuse:
            if path.is_file():
                earlier = np.load(path, mmap_mode="r")
                if len(earlier) >= count:
                    return np.asarray(earlier[:count], dtype=np.float32)
        from targets.runner import predict

        return predict(runner_factory(), self.crops, self.ctx.config.data.batch_size,
                       progress=self.ctx.progress("bundle: golden logits"), prepare=self.ctx.preprocessing.normalize)

    def compare(self, stage: str, logits: np.ndarray, budget):
        from pipeline.drift import compare

        return compare(stage, self.reference, logits, self.labels, budget)

    def tolerance(self, logits: np.ndarray) -> float:
        worst = float(np.max(np.abs(logits.astype(np.float64) - self.reference)))
        return round(worst * TOLERANCE_MARGIN + TOLERANCE_FLOOR, 6)


def check_logits(ctx: "BuildContext", inputs: dict, stage: str) -> list[Path]:
    """The check's logits of `stage`, when that check ran on exactly the stage's current artifact."""
    check = ctx.root / check_folder(stage)
    try:
        data = json.loads((check / MARKER).read_text())
    except (OSError, ValueError):
        return []
    return [check / LOGITS_FILE] if data.get("artifact_key") == inputs[stage].key else []


def write_intermediates(onnx_path: Path, images: np.ndarray, output: Path, threads: int | None = None) -> list[str]:
    """FP32 values of block-level tensors (Concat / residual Add outputs) for a few images, stored float16.

    Returns the tensor names in graph order (the order a divergence search walks)."""
    import onnx

    from targets.onnxruntime import open_session

    model = onnx.load(str(onnx_path))
    names = block_outputs(model)
    if not names:
        return []
    graph_outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in graph_outputs:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory(prefix="intermediates-") as scratch:
        marked = Path(scratch) / "marked.onnx"
        onnx.save(model, str(marked))
        session = open_session(marked, threads)  # several outputs: the session itself, not a Runner
        values = session.run(names, {session.get_inputs()[0].name: np.ascontiguousarray(images, np.float32)})
    arrays = {name: value.astype(np.float16) for name, value in zip(names, values)}
    with open(output, "wb") as file:
        np.savez_compressed(file, **arrays)
    return names


def block_outputs(model, limit: int = MAX_INTERMEDIATES) -> list[str]:
    """Up to `limit` Concat outputs and residual Add outputs (both inputs computed), spread evenly."""
    graph = model.graph
    constants = {init.name for init in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    candidates = [node.output[0] for node in graph.node
                  if node.op_type == "Concat" and len(node.input) > 1 and not set(node.input) & constants
                  or node.op_type == "Add" and not set(node.input) & constants]
    if len(candidates) <= limit:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, limit).round().astype(int)
    return [candidates[i] for i in sorted(set(picks.tolist()))]
