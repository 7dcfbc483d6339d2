"""The calibration methods and INT8 options compared: an explicit, opt-in measurement
(`report --compare-calibration`).

Unlike the rest of the report, which reads what the build wrote, this re-quantizes the build's FP32 graph:
once per calibration method (minmax / percentile / entropy / mse on the build's calibration images) with
the build's options, and once per INT8 option of `pipeline.yaml` turned the other way (bias correction,
UINT8 activations, residual Adds, equalization; AdaRound only off, since learning it takes minutes), each
with the same layers in float as the gate chose. Each Q/DQ model is judged on the build's INT8 evaluation
images in ONNX Runtime and, converted to an IR, in OpenVINO. The result is cached in report/cache.json under
the keys of the stages it depends on.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
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
                         "int8_head": bool(quantize["params"].get("int8_head", False)),
                         # what the build resolved (pipeline.stages.quantize.unsigned); older builds: signed
                         "unsigned_activations": bool(quantize["params"].get("unsigned_activations", False)),
                         # resolved by the build's machine (pipeline.stages.quantize.overflow), not this one's
                         "overflow_fix": "enable" if quantize["params"].get("overflow_fix") else "disable",
                         "equalization": "equalize" in stages},
    }
    if "frames" in data:
        overrides["network"]["labels"] = str(build.root / manifest.get("labels", "labels.txt"))
    return load_config(None, overrides)


# The INT8 options a row turns the other way, as `pipeline.yaml` names them (`quantization.<option>`).
OPTIONS = ("bias_correction", "unsigned_activations", "overflow_fix", "residual_adds", "int8_head", "equalization",
           "adaround")


@dataclass(frozen=True)
class Variant:
    """How one row's Q/DQ model is made: a calibration method and the INT8 options."""

    method: str
    bias_correction: bool
    unsigned_activations: bool
    overflow_fix: bool
    residual_adds: bool
    int8_head: bool
    equalization: bool
    adaround: bool  # the build's learnt AdaRound weights, or nearest rounding


def compare_calibration_methods(build: Build, reporter=None) -> dict:
    """Quantize with each calibration method, then with each INT8 option turned the other way (the same layers
    in float as the gate chose), and judge each on both back ends."""
    from pipeline.plan import BuildPlan
    from pipeline.progress import Reporter

    reporter = reporter or Reporter(quiet=True)
    config = _config_of(build)
    # The stage graph the build was made with, of the network it was made from (your file or module too).
    source = build.manifest.get("model_source") or {}
    plan = BuildPlan(config, source.get("path") or source.get("argument") or build.manifest["model"])
    scratch = Path(tempfile.mkdtemp(prefix="calibration-compare-"))
    try:
        quantizer = _Requantizer(build, plan, reporter, scratch)
        built = quantizer.built
        rows = [quantizer.row(replace(built, method=method)) for method in CALIBRATION_METHODS]
        options, not_compared = [], {}
        for option in OPTIONS:
            why_not = quantizer.why_not(option)
            if why_not:
                not_compared[option] = why_not
                continue
            value = not getattr(built, option)
            options.append({"option": option, "value": value, **quantizer.row(replace(built, **{option: value}))})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    same = quantizer.same_images
    q = config.quantization
    note = "" if same else (f"the {q.method} ranges computed now differ from the build's calibrate stage (its "
                            "images, settings or code changed since): rebuild for an exact comparison")
    return {"methods": rows, "options": options, "options_not_compared": not_compared,
            "build_options": {option: getattr(built, option) for option in OPTIONS},
            "images": quantizer.count, "kept_in_float": quantizer.excluded, "same_images_as_build": same,
            "random_weights": quantizer.ctx.random_weights,
            "percentile": q.percentile, "bins": q.histogram_bins, "note": note}


class _Requantizer:
    """The build's FP32 graph, calibration table, bias shifts and AdaRound weights, re-used where a variant
    keeps what they depend on and recomputed where it changes it."""

    def __init__(self, build: Build, plan, reporter, scratch: Path):
        from pipeline.build import stage_key
        from pipeline.cache import StageRecord
        from pipeline.context import BuildContext
        from pipeline.stages.equalize import quantized_source
        from pipeline.stages.quantize.adaround import saved_rounding
        from pipeline.stages.quantize.bias import saved_shifts
        from pipeline.stages.quantize.options import qdq_options

        self.config, self.reporter, self.scratch = plan.config, reporter, scratch
        self.ctx = BuildContext(plan, reporter)
        q = self.config.quantization
        source = quantized_source(self.config)  # the FP32 ONNX the build quantized (equalized or simplified)
        self.records = {name: StageRecord.read(build.root / name)
                        for name in dict.fromkeys(("reference", "simplify", source, "calibrate"))}
        calibrate = next(stage for stage in plan.stages if stage.name == "calibrate")
        self.same_images = stage_key(calibrate, self.ctx, self.records) == self.records["calibrate"].key
        self.fp32 = {q.equalization: self.records[source].path(ONNX_FILE)}
        self.build_stages = build.stages
        self.excluded = build.stages["quantize"]["facts"].get("excluded_layers") or []
        self.count = build.stages["quantize"]["drift"]["images"]
        self.reference = np.load(self.records["reference"].path(LOGITS_FILE))[:self.count]
        self.labels = self.ctx.labels(self.records["reference"])[:self.count]
        self.shifts = saved_shifts(build.root / "quantize")  # the build's bias correction, if it made one
        self.rounding = saved_rounding(build.root / "quantize")  # and its AdaRound weights (range-independent)
        self.target = self.config.target
        options = qdq_options(self.config)
        self.built = Variant(q.method, self.shifts is not None, options["unsigned"], options["overflow_fix"],
                             q.residual_adds, q.int8_head, q.equalization, self.rounding is not None)
        self.tables: dict = {}
        self.computed_shifts: dict = {}

    def why_not(self, option: str) -> str:
        """Why an option's other value cannot be measured on this build ("" when it can)."""
        if option == "unsigned_activations" and self.target != "cpu":
            return "GPU targets keep signed INT8 (TensorRT's Q/DQ takes no UINT8)"
        if option == "overflow_fix" and self.target != "cpu":
            return "GPU targets: TensorRT's INT8 accumulates in int32"
        if option == "adaround" and not self.built.adaround:
            return "learning AdaRound takes minutes per Conv: build with quantization.adaround: true to measure it"
        if option == "equalization" and self.built.adaround:
            return "the build's AdaRound weights were learnt for its own graph"
        return ""

    def row(self, variant: Variant) -> dict:
        """The variant quantized, judged on both back ends."""
        from pipeline.drift import compare
        from pipeline.stages.quantize.overflow import host_int8_saturates_tensorrt_model
        from pipeline.stages.quantize.qdq import write_qdq_model
        from targets.onnxruntime import OnnxRuntimeRunner
        from targets.openvino import OpenVinoRunner, convert_to_ir

        started = time.perf_counter()
        name = _describe(variant, self.built)
        fp32 = self._fp32(variant.equalization)
        table = self._table(variant)
        rounding = self.rounding if variant.adaround else None
        path = self.scratch / "variant.onnx"
        write_qdq_model(fp32, table.amax, path, self.excluded, bias_shifts=self._shifts(variant, table.amax),
                        residual_adds=variant.residual_adds, int8_head=variant.int8_head, weight_rounding=rounding,
                        unsigned=variant.unsigned_activations, overflow_fix=variant.overflow_fix)
        ctx, judged = self.ctx, {}
        exact = host_int8_saturates_tensorrt_model(self.config)  # as the gate judges a GPU target's model here
        ort = ctx.predict(OnnxRuntimeRunner(path, threads=ctx.threads, exact=exact), self.count,
                          f"INT8 ONNX Runtime ({name})")
        judged["onnxruntime"] = compare(f"quantize ({name})", self.reference, ort, self.labels, self._budget("quantize"))
        if not exact:
            xml = convert_to_ir(path, self.scratch / "variant.xml", "fp32")
            runner = OpenVinoRunner(xml, inference_precision=ctx.deployed_openvino_hint, threads=ctx.threads)
            ov = ctx.predict(runner, self.count, f"INT8 OpenVINO ({name})")
            del runner
            judged["openvino"] = compare(f"openvino_int8 ({name})", self.reference, ov, self.labels,
                                         self._budget("openvino_int8"))
        for result in judged.values():
            self.reporter.say(f"  {result.summary()}")
        return {"method": variant.method, "build_method": variant == self.built, "calibration_images": table.images,
                "seconds": round(time.perf_counter() - started, 2), "drift": judged["onnxruntime"].as_dict(),
                "openvino": judged["openvino"].as_dict() if "openvino" in judged else None}

    def _budget(self, stage: str):
        """The budget the build judged `stage` on (its manifest's), else this configuration's."""
        from pipeline.drift import DriftBudget

        recorded = ((self.build_stages.get(stage) or {}).get("drift") or {}).get("budget")
        if recorded:
            return DriftBudget(**recorded)
        return self.config.budget(stage, self.ctx.random_weights, labelled=bool((self.labels >= 0).any()))

    def _fp32(self, equalization: bool) -> Path:
        """The FP32 graph a variant quantizes: the simplified one, or it equalized."""
        if equalization not in self.fp32:
            if equalization:
                from pipeline.stages.quantize.equalization import write_equalized_model

                write_equalized_model(self.records["simplify"].path(ONNX_FILE), self.scratch / "equalized.onnx")
                self.fp32[True] = self.scratch / "equalized.onnx"
            else:
                self.fp32[False] = self.records["simplify"].path(ONNX_FILE)
        return self.fp32[equalization]

    def _table(self, variant: Variant):
        """The ranges of the variant's tensors with its method: the build's table where it holds them."""
        from calibration.statistics import CalibrationTable, ImageBatches, collect_ranges
        from pipeline.stages.quantize.qdq import quantized_activations

        key = (variant.method, variant.equalization, variant.residual_adds, variant.int8_head)
        if key in self.tables:
            return self.tables[key]
        q = self.config.quantization
        fp32 = self._fp32(variant.equalization)
        tensors = quantized_activations(fp32, residual_adds=variant.residual_adds, int8_head=variant.int8_head)
        built = self.built
        table = None
        if self.same_images and variant.method == built.method and variant.equalization == built.equalization:
            own = CalibrationTable.load(self.records["calibrate"].path(TABLE_FILE))
            if set(tensors) <= set(own.amax):  # the build's own table: the same ranges
                table = own
        if table is None:
            batches = ImageBatches(self.ctx.calibration.crops, self.ctx.preprocessing, self.config.data.batch_size)
            table = collect_ranges(fp32, tensors, batches, method=variant.method, percentile=q.percentile,
                                   bins=q.histogram_bins, threads=self.ctx.threads,
                                   progress=self.ctx.progress(f"calibrating ({variant.method})"))
            if variant.method == built.method and variant.equalization == built.equalization and not self.same_images:
                # the key changed with the code: do the ranges?
                own = CalibrationTable.load(self.records["calibrate"].path(TABLE_FILE)).amax
                self.same_images = all(name in table.amax and math.isclose(own[name], table.amax[name], rel_tol=1e-5)
                                       for name in own if name in tensors)
        self.tables[key] = table
        return table

    def _shifts(self, variant: Variant, amax: dict):
        """Bias correction's shifts of the variant's weights: the build's when its weights are the build's."""
        if not variant.bias_correction:
            return None
        key = (variant.equalization, variant.adaround, variant.overflow_fix)  # what the weights depend on
        if key == (self.built.equalization, self.built.adaround, self.built.overflow_fix) and self.shifts:
            return self.shifts
        if key not in self.computed_shifts:
            from pipeline.stages.quantize.bias import BIAS_CORRECTION_IMAGES, weight_rounding_shifts
            from pipeline.stages.quantize.qdq import write_qdq_model

            fp32, plain = self._fp32(variant.equalization), self.scratch / "uncorrected.onnx"
            write_qdq_model(fp32, amax, plain, self.excluded, weight_rounding=self.rounding if variant.adaround else None,
                            unsigned=variant.unsigned_activations, overflow_fix=variant.overflow_fix)
            crops, size = self.ctx.calibration.crops[:BIAS_CORRECTION_IMAGES], self.config.data.batch_size
            batches = [self.ctx.preprocessing.normalize(crops[i:i + size]) for i in range(0, len(crops), size)]
            with self.reporter.status(f"bias correction: mean output shifts on {len(crops)} calibration images"):
                self.computed_shifts[key] = weight_rounding_shifts(fp32, plain, batches, self.ctx.threads)
        return self.computed_shifts[key]


def _describe(variant: Variant, built: Variant) -> str:
    """A row's name: the method, and the option it turns the other way."""
    changed = [option for option in OPTIONS if getattr(variant, option) != getattr(built, option)]
    return variant.method + "".join(f", {option} {'on' if getattr(variant, option) else 'off'}" for option in changed)
