"""The calibration methods compared: an explicit, opt-in measurement (`report --compare-calibration`).

Unlike the rest of the report, which reads what the build wrote, this re-runs calibration
(minmax / percentile / entropy on the build's calibration images) and quantization with the
build's configuration, and judges each Q/DQ model on the build's INT8 evaluation images. The result
is cached in report/cache.json under the keys of the stages it depends on.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from calibration import METHODS as CALIBRATION_METHODS
from pipeline.cache import stable_hash
from pipeline.errors import PipelineError
from pipeline.layout import LOGITS_FILE, ONNX_FILE, TABLE_FILE
from pipeline.report.cache import cached
from pipeline.report.collect import Build, existing_images, last_index


def calibration_comparison(build: Build, cache: dict, requested: bool, reporter, missing: list) -> dict:
    """minmax / percentile / entropy on the build's calibration images, judged on its INT8 images.

    Cached under the keys of the stages it depends on: without --compare-calibration a cached
    comparison is still shown (it costs nothing), and none is computed."""
    needed = ("reference", "simplify", "calibrate", "quantize")
    if any(name not in build.stages for name in needed):
        return {"note": "Not an INT8 build: no calibration to compare"}
    key = stable_hash([build.key(name) for name in needed])
    entry = cache.get("calibration_comparison")
    if isinstance(entry, dict) and entry.get("key") == key:
        return entry["value"]
    if not requested:
        return {"note": "Not computed: run `python -m pipeline report BUILD_DIR --compare-calibration` (minutes)"}
    try:
        value = cached(cache, "calibration_comparison", key, lambda: compare_calibration_methods(build, reporter))
    except PipelineError as error:
        missing.append(f"calibration comparison: {error}")
        return {"note": f"failed: {error}"}
    return value


def _config_of(build: Build):
    """The configuration a finished build was made with, as far as its manifest records it."""
    from pipeline.config import load_config

    manifest, stages = build.manifest, build.stages
    calibrate, quantize = stages["calibrate"], stages["quantize"]
    if not build.image_paths:
        raise PipelineError(f"{build.root}/reference/images.txt is missing: rebuild the reference stage to record "
                            "the evaluation images")
    paths = [Path(p) for p in existing_images(build.image_paths)]
    if len(paths) < len(build.image_paths):
        raise PipelineError(f"{build.root}/reference/images.txt names evaluation images that cannot be found from "
                            "here: run the report from the folder the build ran in, or set IMAGENET_DIR")
    data = {"seed": manifest.get("seed", 0), "calibration_images": calibrate["facts"]["images"]}
    lossless = [s["drift"]["images"] for n, s in stages.items() if s.get("drift") and n in ("export", "simplify")]
    if lossless:
        data["evaluation_images"] = lossless[0]
    if paths and all("val" in p.parts for p in paths):
        first = paths[0].parts
        data["imagenet"] = str(Path(*first[: last_index(first, "val")]))
    elif paths:
        data["frames"] = os.path.commonpath([str(p.parent) for p in paths])
    overrides = {
        "build_dir": str(build.root.parent.parent), "models": [manifest["model"]], "target": manifest["target"],
        "precision": "int8", "weights": "random" if manifest.get("weights", {}).get("random") else "imagenet",
        "network": {"input_size": manifest.get("input", {}).get("size", 0)},
        "data": data,
        "quantization": {"method": calibrate["params"]["method"], "percentile": calibrate["params"]["percentile"],
                         "histogram_bins": calibrate["params"]["bins"],
                         "evaluation_images": quantize["params"]["evaluation_images"],
                         "residual_adds": bool(quantize["params"].get("residual_adds", False)),
                         # what the build resolved (pipeline.stages.quantize.unsigned); older builds: signed
                         "unsigned_activations": bool(quantize["params"].get("unsigned_activations", False)),
                         "equalization": "equalize" in stages},
    }
    if "frames" in data:
        overrides["network"]["labels"] = str(build.root / manifest.get("labels", "labels.txt"))
    return load_config(None, overrides)


def compare_calibration_methods(build: Build, reporter=None) -> dict:
    """Quantize with each calibration method (the same layers in float as the gate chose) and judge it."""
    from calibration.statistics import CalibrationTable, ImageBatches, collect_ranges
    from pipeline.build import stage_key
    from pipeline.cache import StageRecord
    from pipeline.context import BuildContext
    from pipeline.drift import compare
    from pipeline.plan import BuildPlan
    from pipeline.progress import Reporter
    from pipeline.stages.equalize import quantized_source
    from pipeline.stages.quantize.adaround import saved_rounding
    from pipeline.stages.quantize.bias import saved_shifts
    from pipeline.stages.quantize.qdq import quantized_activations, write_qdq_model
    from pipeline.stages.quantize.unsigned import unsigned_activations
    from targets.onnxruntime import OnnxRuntimeRunner

    reporter = reporter or Reporter(quiet=True)
    config = _config_of(build)
    # The stage graph the build was made with, of the network it was made from (your file or module too).
    source = build.manifest.get("model_source") or {}
    plan = BuildPlan(config, source.get("path") or source.get("argument") or build.manifest["model"])
    stages = plan.stages
    ctx = BuildContext(plan, reporter)
    source = quantized_source(config)  # the FP32 ONNX the build quantized (equalized or simplified)
    records = {name: StageRecord.read(build.root / name)
               for name in ("reference", source, "calibrate")}
    calibrate = next(stage for stage in stages if stage.name == "calibrate")
    same_images = stage_key(calibrate, ctx, records) == records["calibrate"].key
    fp32_onnx = records[source].path(ONNX_FILE)
    excluded = build.stages["quantize"]["facts"].get("excluded_layers") or []
    count = build.stages["quantize"]["drift"]["images"]
    reference = np.load(records["reference"].path(LOGITS_FILE))[:count]
    labels = ctx.labels(records["reference"])[:count]
    budget = config.budget("quantize", ctx.random_weights, labelled=bool((labels >= 0).any()))
    tensors = quantized_activations(fp32_onnx, residual_adds=config.quantization.residual_adds)
    shifts = saved_shifts(build.root / "quantize")  # the build's bias correction, if it made one
    rounding = saved_rounding(build.root / "quantize")  # and its AdaRound weights (range-independent)
    q = config.quantization
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="calibration-compare-"))
    try:
        for method in CALIBRATION_METHODS:
            started = time.perf_counter()
            if method == q.method and same_images:  # the build's own table: the same ranges
                table = CalibrationTable.load(records["calibrate"].path(TABLE_FILE))
            else:
                batches = ImageBatches(ctx.calibration.crops, ctx.preprocessing, config.data.batch_size)
                table = collect_ranges(fp32_onnx, tensors, batches, method=method, percentile=q.percentile,
                                       bins=q.histogram_bins, threads=ctx.threads,
                                       progress=ctx.progress(f"calibrating ({method})"))
            path = scratch / f"{method}.onnx"
            write_qdq_model(fp32_onnx, table.amax, path, excluded, bias_shifts=shifts,
                            residual_adds=config.quantization.residual_adds, weight_rounding=rounding,
                            unsigned=unsigned_activations(config))
            logits = ctx.predict(OnnxRuntimeRunner(path, threads=ctx.threads), count, f"INT8 ONNX Runtime ({method})")
            result = compare(f"quantize ({method})", reference, logits, labels, budget)
            reporter.say(f"  calibration {method}: {result.summary()}")
            if method == q.method and not same_images:  # the key changed with the code: do the ranges?
                built = CalibrationTable.load(records["calibrate"].path(TABLE_FILE)).amax
                same_images = built.keys() == table.amax.keys() and all(
                    math.isclose(built[name], table.amax[name], rel_tol=1e-5) for name in built)
            rows.append({"method": method, "build_method": method == q.method, "calibration_images": table.images,
                         "seconds": round(time.perf_counter() - started, 2), "drift": result.as_dict()})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    note = "" if same_images else (f"the {q.method} ranges computed now differ from the build's calibrate stage (its "
                                   "images, settings or code changed since): rebuild for an exact comparison")
    return {"methods": rows, "images": count, "kept_in_float": excluded, "same_images_as_build": same_images,
            "percentile": q.percentile, "bins": q.histogram_bins, "note": note}
