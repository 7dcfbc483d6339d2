"""Where an engine's layers really run, read back from TensorRT's engine inspector.

Asking for DLA is not getting it: with GPU fallback TensorRT moves what DLA cannot take (a dynamic
shape, an unsupported layer) to the GPU without an error. So after every build the serialized engine
is deserialized and its engine inspector asked for the layer information in JSON; the build sets
`ProfilingVerbosity.DETAILED`, without which the inspector gives layer names only. The documented
JSON form is `{"Layers": [{"Name", "LayerType", "Inputs": [{"Name", "Format/Datatype", ...}],
"Outputs": [...], ...}], "Bindings": [...]}`. A DLA subgraph is one layer of type "DLA" named
`{ForeignNode[first...last]}` (the first and last network layers it covers); a fused GPU layer is
named "a + b + c"; reformat layers ("Reformatting CopyNode ...") are TensorRT's own and not counted.
A layer's precision is that of its outputs' Format/Datatype (Int8, Half, Float); for a DLA subgraph
that is the precision of its last outputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.errors import PipelineError

FOREIGN = re.compile(r"^\{ForeignNode\[(.*)\]\}$")
# Words of "Format/Datatype" ("Thirty-two wide channel vectorized row major Int8 format", "Row major linear FP32"),
# most specific first.
PRECISIONS = ((re.compile(r"\bint8\b", re.I), "int8"), (re.compile(r"\b(fp16|half)\b", re.I), "fp16"),
              (re.compile(r"\b(bf16|bfloat16)\b", re.I), "bf16"), (re.compile(r"\bfp8\b", re.I), "fp8"),
              (re.compile(r"\b(fp32|float)\b", re.I), "fp32"))


def parse_engine_information(text: str, network_layers: list[str] | None = None) -> dict:
    """Placement facts from `EngineInspector.get_engine_information(LayerInformationFormat.JSON)`.

    `network_layers`: the network's layer names in order (to count the layers a DLA subgraph covers).
    """
    try:
        data = json.loads(text)
    except ValueError:
        raise PipelineError("the engine inspector's layer information is not JSON: cannot read the placement") from None
    layers = data.get("Layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise PipelineError("the engine inspector's layer information has no 'Layers' list")
    if any(not isinstance(layer, dict) for layer in layers):
        return {"detailed": False, "engine_layers": len(layers),
                "note": "layer names only: the engine was not built with ProfilingVerbosity.DETAILED"}
    order = {name: index for index, name in enumerate(network_layers or [])}
    placed: dict[str, tuple[str, str]] = {}  # network layer -> (device, precision)
    engine_layers = 0
    for layer in layers:
        name, kind = str(layer.get("Name", "")), str(layer.get("LayerType", ""))
        if kind == "Reformat" or name.startswith("Reformatting CopyNode"):
            continue
        engine_layers += 1
        device = "DLA" if kind == "DLA" else "GPU"
        for member in _members(name, order):
            placed[member] = (device, _precision(layer))
    gpu = [name for name, (device, _) in placed.items() if device == "GPU"]
    return {"detailed": True, "engine_layers": engine_layers, "layers": len(placed),
            "on_dla": sum(device == "DLA" for device, _ in placed.values()),
            "int8": sum(precision == "int8" for _, precision in placed.values()),
            "precisions": {p: sum(q == p for _, q in placed.values()) for p in sorted({q for _, q in placed.values()})},
            "gpu_layers": gpu}


def _members(name: str, order: dict[str, int]) -> list[str]:
    """The network layers one engine layer covers."""
    match = FOREIGN.match(name)
    if not match:
        return [part.strip() for part in name.split(" + ") if part.strip()]
    inner = match.group(1)
    first, dots, last = inner.partition("...")
    if not dots:
        return [inner]
    if first in order and last in order and order[first] <= order[last]:
        names = sorted(order, key=order.get)
        return names[order[first]:order[last] + 1]
    return [first, last]  # names TensorRT gave its own layers: count the two ends


def _precision(layer: dict) -> str:
    formats = " ".join(str(t.get("Format/Datatype", "")) for t in layer.get("Outputs") or [] if isinstance(t, dict))
    for pattern, precision in PRECISIONS:
        if pattern.search(formats):
            return precision
    return "unknown"


def read_placement(trt, serialized: bytes, network_layers: list[str], dla_core: int) -> dict:
    """Deserialize a just-built engine and read its placement; {"error": ...} when that fails."""
    try:
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        if dla_core >= 0:
            runtime.DLA_core = dla_core
        engine = runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            return {"error": "TensorRT could not deserialize the engine it built"}
        inspector = engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception as error:  # noqa: BLE001 (a read-back failure must not hide the engine; the budget decides)
        return {"error": f"{type(error).__name__}: {error}"}
    try:
        return parse_engine_information(str(text), network_layers)
    except PipelineError as error:
        return {"error": str(error)}


def summary(placement: dict, dla_core: int) -> str:
    """"N of M layers on DLA 0, K in INT8; fell back to GPU: a, b" (or the GPU-only form)."""
    if placement.get("error") or not placement.get("detailed"):
        return f"placement unknown ({placement.get('error') or placement.get('note') or 'not read'})"
    total, int8 = placement["layers"], placement["int8"]
    if dla_core < 0:
        return f"{total} layers on the GPU, {int8} in INT8"
    gpu = placement["gpu_layers"]
    fell = ", ".join(gpu[:8]) + (f" (+{len(gpu) - 8} more)" if len(gpu) > 8 else "") if gpu else "none"
    return f"{placement['on_dla']} of {total} layers on DLA {dla_core}, {int8} in INT8; fell back to GPU: {fell}"


def check_dla_budget(placement: dict, dla_core: int, min_dla_layers: float, engine: str | Path = "") -> None:
    """PipelineError when fewer than `min_dla_layers` (a fraction) of the layers landed on DLA."""
    if dla_core < 0 or min_dla_layers <= 0:
        return
    where = f"{engine}: " if engine else ""
    if placement.get("error") or not placement.get("detailed") or not placement.get("layers"):
        raise PipelineError(f"{where}cannot check tensorrt.min_dla_layers: {summary(placement, dla_core)}")
    share = placement["on_dla"] / placement["layers"]
    if share < min_dla_layers:
        raise PipelineError(f"{where}{summary(placement, dla_core)}: {share:.0%} on DLA, tensorrt.min_dla_layers "
                            f"asks {min_dla_layers:.0%}: check TensorRT's DLA layer support, or lower the budget")
