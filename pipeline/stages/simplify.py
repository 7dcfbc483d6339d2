"""The simplify stage: onnxsim on the exported ONNX (before quantizing, never after: design.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stages.base import ONNX_CHECK_MODULES, ONNX_FILE, Stage, onnx_runner

if TYPE_CHECKING:
    from pipeline.context import BuildContext


def stage(config) -> Stage:
    return Stage("simplify", "ONNX -> simplified ONNX (onnxsim)", ("export",), {}, ("onnx", "onnxsim"),
                 produce_simplify, ONNX_FILE, runner=onnx_runner, modules=ONNX_CHECK_MODULES)


def produce_simplify(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    import onnx
    import onnxsim

    source = inputs["export"].path(ONNX_FILE)
    model = onnx.load(str(source))
    nodes_before = len(model.graph.node)
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model against the original")
    onnx.save(simplified, str(folder / ONNX_FILE))
    return {"nodes_before": nodes_before, "nodes_after": len(simplified.graph.node)}
