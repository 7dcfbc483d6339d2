"""The stage table's rows: the manifest's figures per stage, plus each checked artifact's latency
on this machine (batch 1, cached in report/cache.json under the stage's key and this machine).

Artifacts are opened through the back ends of `targets`; OpenVINO's precision is the one the build
deployed (`targets.openvino`'s rule), an FP16-typed ONNX runs with graph optimizations off.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from pipeline.cache import stable_hash
from pipeline.errors import PipelineError
from pipeline.report.cache import cached
from pipeline.report.collect import Build, artifact_size
from pipeline.stages import FP16_TYPED_STAGES


def stage_rows(build: Build, cache: dict, latency_seconds: float, say, missing: list) -> list[dict]:
    rows = []
    for name, stage in build.stages.items():
        drift = stage.get("drift")
        artifact = stage.get("artifact")
        row = {"stage": name, "artifact": f"{name}/{artifact}" if artifact else None,
               "size_bytes": artifact_size(stage), "precision_ran": stage.get("precision_ran"),
               "checked": drift is not None, "drift": drift, "latency": None, "latency_note": ""}
        if name == "reference":
            ran = (stage.get("facts") or {}).get("runner", "torch fp32")  # ONNX Runtime on a user's ONNX file
            row["precision_ran"] = "fp32 (onnxruntime)" if ran.startswith("onnxruntime") else "fp32 (torch)"
        if drift is not None:
            row["latency"], row["latency_note"] = _latency(build, name, artifact, cache, latency_seconds, say)
        rows.append(row)
    if latency_seconds > 0 and not any(row["latency"] for row in rows):
        missing.append("latency: no artifact could be timed (see the notes in the stage table)")
    return rows


def _latency(build: Build, stage: str, artifact: str | None, cache: dict, seconds: float, say) -> tuple:
    """(LatencyResult.as_dict() or None, note) for a checked stage's artifact, cached by its key."""
    if seconds <= 0:
        return None, "not measured (--latency-seconds 0)"
    if not artifact:
        return None, "no artifact"
    path = build.root / stage / artifact
    if path.suffix not in (".onnx", ".xml"):
        return None, "timed on the device (device-build / verify)"
    hint = openvino_hint(build.manifest, stage) if path.suffix == ".xml" else None
    key = stable_hash([build.key(stage), seconds, hint, platform.node(), os.cpu_count()])  # this machine's timing

    def measure():
        say(f"  timing {stage} ({seconds:g} s)")
        return _measure(path, hint, seconds, fp16_typed=stage in FP16_TYPED_STAGES)

    try:
        value = cached(cache, f"latency/{stage}", key, measure)
    except PipelineError as error:
        return None, f"failed: {error}"
    except Exception as error:  # runtimes raise their own exception types: a note, not a failed build
        return None, f"failed: {first_line(error)}"
    return value["result"], value["note"]


def openvino_hint(manifest: dict, stage: str) -> str | None:
    """The precision OpenVINO runs a stage's IR in: f32 for the FP32 reference IR, else the deployed one."""
    from targets.openvino import inference_precision, precision_hint

    ir_precision = "fp32" if stage == "openvino_fp32" else None  # any other IR runs as deployed
    return precision_hint(inference_precision(ir_precision, manifest.get("deployed", {}).get("inference_precision")))


def _measure(path: Path, hint: str | None, seconds: float, fp16_typed: bool = False) -> dict:
    from targets.timing import measure_latency

    if path.suffix == ".xml":
        from targets.openvino import OpenVinoRunner

        runner = OpenVinoRunner(path, hint, static_batch=1)
        shape = [1, *runner.compiled.inputs[0].get_shape()[1:]]
        ran_in = ("int8 + " if runner.fake_quantize else "") + runner.execution_precision
        note = f"OpenVINO, ran in {ran_in}" + (" (pinned)" if hint else " (OpenVINO's choice)")
    else:
        from targets.onnxruntime import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(path, threads=os.cpu_count(), fp16_typed=fp16_typed)
        dims = runner.session.get_inputs()[0].shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise PipelineError(f"{path}: input shape {dims} is not static besides the batch")
        shape = [1, *dims]
        note = "ONNX Runtime CPU" + (" (graph optimizations off: FP16-typed)" if fp16_typed else "")
    result = measure_latency(runner, shape, warmup=3, seconds=seconds)
    return {"result": result.as_dict(), "note": f"{note}, batch 1, {result.iterations} runs"}


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
