"""The quantization accuracy report of a finished build: report.md (+ PNGs), report.json, report.html.

`write_report(root)` reads `build/<model>/<target>/` (manifest.json, the reference and check logits,
quantize/gate.json, labels.txt, benchmark.json when present) and writes `root/report/` atomically
(a temporary folder renamed into place). Measurements that cost time (latency per artifact, the
deployment preprocessing row, the calibration-method comparison) are cached in `report/cache.json`
under the keys of the stages they measured, so a report of a cached build is quick. A missing
optional input never fails a build: the report says what is missing and how to get it.

The content is collected once into a JSON-ready dict (report.json) plus a list of sections (titles,
paragraphs, tables, figures, thumbnails) that the markdown writer here and `pipeline.report_html`
both render.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.cache import stable_hash
from pipeline.errors import PipelineError
from pipeline.stages import FP16_TYPED_STAGES

REPORT_DIR = "report"
REPORT_FORMAT = "inception-edge-report/1"
CACHE_FILE = "cache.json"
MANIFEST = "manifest.json"
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
BENCHMARK_SECTIONS = ("latency", "throughput", "frame_path", "nncf")  # benchmark.json, see pipeline.benchmark
BENCHMARK_HIDDEN = {"key", "artifact"}  # internal names and long paths: the back end's name says it
MAX_FLIP_THUMBNAILS = 48
THUMBNAIL_SIZE = 160
PROJECT_DIR = Path(__file__).resolve().parents[1]
PREPROCESSING_IMAGES = 64  # images the deployment preprocessing row is measured on (at most)


# ---------------------------------------------------------------------------------------------------
# Entry points.


def command(args) -> int:
    """`python -m pipeline report BUILD_DIR`: report every finished build under BUILD_DIR."""
    from pipeline.progress import Reporter

    if args.latency_seconds < 0:
        raise PipelineError(f"--latency-seconds must be 0 (no latency) or more, not {args.latency_seconds}")
    roots = find_builds(Path(args.build_dir), args.model, args.target)
    reporter = Reporter()
    for root in roots:
        written = write_report(root, latency_seconds=args.latency_seconds, reporter=reporter,
                               compare_calibration=args.compare_calibration)
        reporter.say(f"{root}: report written to {written}")
    return 0


def find_builds(build_dir: Path, models: list[str] | None = None, target: str | None = None) -> list[Path]:
    """Build folders (holding manifest.json): `build_dir` itself, or `build_dir/<model>/<target>/`."""
    if (build_dir / MANIFEST).is_file():
        return [build_dir]
    if not build_dir.is_dir():
        raise PipelineError(f"{build_dir}: no such folder: give the build folder (default: build) or build/<model>/<target>")
    roots = sorted(path.parent for path in build_dir.glob(f"*/*/{MANIFEST}"))
    chosen = [root for root in roots if (not models or root.parent.name in models) and (not target or root.name == target)]
    if not chosen:
        wanted = f" for {', '.join(models or [])} {target or ''}".rstrip() if models or target else ""
        raise PipelineError(f"{build_dir}: no finished build here{wanted} (no <model>/<target>/{MANIFEST}): "
                            "run `python -m pipeline build` first, or give build/<model>/<target>")
    return chosen


def write_report(root: Path, latency_seconds: float = 1.0, reporter=None, compare_calibration: bool = False) -> Path:
    """Write root/report/ (report.md + PNGs, report.json, report.html); return the path of report.html."""
    from pipeline import report_html

    root = Path(root)
    manifest = read_manifest(root)
    folder = root / REPORT_DIR
    cache = _read_cache(folder)
    report, sections, images = collect(root, manifest, cache, latency_seconds, compare_calibration, reporter)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{REPORT_DIR}.", suffix=".tmp"))
    try:
        for name, data in images.items():
            (tmp / name).write_bytes(data)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report, sections))
        (tmp / "report.html").write_text(report_html.render(report, sections, images))
        (tmp / CACHE_FILE).write_text(json.dumps(cache, indent=1) + "\n")
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / "report.html"


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{root}: not a build folder ({MANIFEST} missing): run `python -m pipeline build` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path}: unreadable build manifest ({error}): rebuild with `python -m pipeline build`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise PipelineError(f"{path}: not a build manifest (no stages): rebuild with `python -m pipeline build`")
    return manifest


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Rename `tmp` into place; an old report is moved aside first (a rename never meets a full folder)."""
    if folder.exists():
        stale = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
        os.replace(folder, stale / "old")
        os.replace(tmp, folder)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def _read_cache(folder: Path) -> dict:
    try:
        cache = json.loads((folder / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _cached(cache: dict, name: str, key: str, measure):
    """`cache[name]` when it was made under `key`; else measure, store and return it."""
    entry = cache.get(name)
    if isinstance(entry, dict) and entry.get("key") == key:
        return entry["value"]
    value = measure()
    cache[name] = {"key": key, "value": value}
    return value


# ---------------------------------------------------------------------------------------------------
# Collecting the data.


class _Build:
    """The files of one build folder that the report reads."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.stages: dict = manifest["stages"]
        self.labels = _read_labels(root / manifest.get("labels", "labels.txt"))
        self.reference_logits = self._npy("reference/logits.npy")
        self.truth = self._npy("reference/labels.npy")
        # The drift checks tell whether labels apply (not for a fine-tuned head or unlabelled frames).
        labelled = any((stage.get("drift") or {}).get("labelled_images") for stage in self.stages.values())
        if self.truth is not None and not labelled:
            self.truth = np.full_like(self.truth, -1)
        self.image_paths = _read_lines(root / "reference" / "images.txt")

    def _npy(self, relative: str) -> np.ndarray | None:
        path = self.root / relative
        return np.load(path) if path.is_file() else None

    def logits(self, stage: str) -> np.ndarray | None:
        """A checked stage's logits: the check folder's, or the stage's own (self-checked stages)."""
        for relative in (f"check_{stage}/logits.npy", f"{stage}/logits.npy"):
            if (self.root / relative).is_file():
                return np.load(self.root / relative)
        return None

    def class_name(self, index: int) -> str:
        if 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"

    def key(self, stage: str) -> str | None:
        return (self.stages.get(stage) or {}).get("key")


def _read_labels(path: Path) -> list[str]:
    return [line.strip() for line in _read_lines(path)]


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def collect(root: Path, manifest: dict, cache: dict, latency_seconds: float, compare_calibration: bool,
            reporter=None) -> tuple[dict, list[dict], dict[str, bytes]]:
    """(report.json's dict, the sections to render, {file name: PNG/JPEG bytes})."""
    from pipeline import report_plots

    build = _Build(root, manifest)
    say = reporter.say if reporter is not None else (lambda text: None)
    random = bool(manifest.get("weights", {}).get("random"))
    report = {
        "format": REPORT_FORMAT,
        "model": manifest.get("model"),
        "target": manifest.get("target"),
        "precision": manifest.get("precision"),
        "status": manifest.get("status"),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build": str(root),
        "weights": manifest.get("weights", {}),
        "random_weights": random,
        "deployed": manifest.get("deployed", {}),
        "preprocessing": manifest.get("preprocessing", {}),
        "host": manifest.get("host", {}),
        "missing": [],  # optional inputs the report could not use, each with how to get it
    }
    images: dict[str, bytes] = {}
    sections: list[dict] = [_summary_section(report, build)]

    report["reference"] = _reference_summary(build)
    report["stages"] = _stage_rows(build, cache, latency_seconds, say, report["missing"])
    sections.append(_stage_section(report, images, report_plots))
    report["deployment_preprocessing"] = _preprocessing_row(build, cache, say, report["missing"])
    sections.append(_preprocessing_section(report["deployment_preprocessing"]))
    report["sensitivity"] = _sensitivity(build, report["missing"])
    sections.append(_sensitivity_section(report["sensitivity"], images, report_plots))
    report["calibration_comparison"] = _calibration_comparison(build, cache, compare_calibration, reporter,
                                                               report["missing"])
    sections.append(_calibration_section(report["calibration_comparison"], images, report_plots))
    report["flips"] = _flips(build, report["missing"])
    sections.append(_flips_section(report["flips"], build, images))
    report["benchmark"] = _benchmark(build, report["missing"])
    sections.append(_benchmark_section(report["benchmark"]))
    if report["missing"]:
        sections.append({"title": "Missing inputs", "blocks": [("list", report["missing"])]})
    return report, sections, images


def _reference_summary(build: _Build) -> dict:
    logits, truth = build.reference_logits, build.truth
    if logits is None:
        return {"images": 0}
    summary = {"images": int(len(logits)), "distinct_classes": int(len(np.unique(logits.argmax(1))))}
    if truth is not None and (truth >= 0).any():
        known = truth >= 0
        top5 = np.argsort(-logits[known], axis=1)[:, :5]
        summary.update(labelled_images=int(known.sum()),
                       top1=100.0 * float(np.mean(logits[known].argmax(1) == truth[known])),
                       top5=100.0 * float(np.mean(np.any(top5 == truth[known][:, None], axis=1))))
    return summary


def _stage_rows(build: _Build, cache: dict, latency_seconds: float, say, missing: list) -> list[dict]:
    rows = []
    for name, stage in build.stages.items():
        drift = stage.get("drift")
        artifact = stage.get("artifact")
        row = {"stage": name, "artifact": f"{name}/{artifact}" if artifact else None,
               "size_bytes": _artifact_size(stage), "precision_ran": stage.get("precision_ran"),
               "checked": drift is not None, "drift": drift, "latency": None, "latency_note": ""}
        if name == "reference":
            row["precision_ran"] = "fp32 (torch)"
        if drift is not None:
            row["latency"], row["latency_note"] = _latency(build, name, artifact, cache, latency_seconds, say)
        rows.append(row)
    if latency_seconds > 0 and not any(row["latency"] for row in rows):
        missing.append("latency: no artifact could be timed (see the notes in the stage table)")
    return rows


def _artifact_size(stage: dict) -> int | None:
    """Bytes of the stage's artifact and its companions (model.xml + model.bin; model.onnx + .data)."""
    artifact, files = stage.get("artifact"), stage.get("files") or {}
    if not artifact:
        return None
    stem = Path(artifact).stem
    sizes = [info.get("size", 0) for name, info in files.items() if Path(name).name.startswith(stem + ".")]
    return int(sum(sizes)) if sizes else None


def _latency(build: _Build, stage: str, artifact: str | None, cache: dict, seconds: float, say) -> tuple:
    """(LatencyResult.as_dict() or None, note) for a checked stage's artifact, cached by its key."""
    if seconds <= 0:
        return None, "not measured (--latency-seconds 0)"
    if not artifact:
        return None, "no artifact"
    path = build.root / stage / artifact
    if path.suffix not in (".onnx", ".xml"):
        return None, "timed on the device (device-build / verify)"
    hint = _openvino_hint(build.manifest, stage) if path.suffix == ".xml" else None
    key = stable_hash([build.key(stage), seconds, hint, platform.node(), os.cpu_count()])  # this machine's timing

    def measure():
        say(f"  timing {stage} ({seconds:g} s)")
        return _measure(path, hint, seconds, optimize=stage not in FP16_TYPED_STAGES)

    try:
        value = _cached(cache, f"latency/{stage}", key, measure)
    except PipelineError as error:
        return None, f"failed: {error}"
    except Exception as error:  # runtimes raise their own exception types: a note, not a failed build
        return None, f"failed: {_first_line(error)}"
    return value["result"], value["note"]


def _openvino_hint(manifest: dict, stage: str) -> str | None:
    """The precision OpenVINO runs a stage's IR in: f32 for the FP32 reference IR, else the deployed one."""
    if stage == "openvino_fp32":
        return "f32"
    hint = manifest.get("deployed", {}).get("inference_precision") or "auto"
    return None if hint == "auto" else hint


def _measure(path: Path, hint: str | None, seconds: float, optimize: bool = True) -> dict:
    from pipeline.latency import OpenVinoLatencyRunner, measure_latency

    if path.suffix == ".xml":
        runner = OpenVinoLatencyRunner(path, hint)
        shape = [1, *runner.compiled.inputs[0].get_shape()[1:]]
        ran_in = ("int8 + " if runner.fake_quantize else "") + runner.execution_precision
        note = f"OpenVINO, ran in {ran_in}" + (" (pinned)" if hint else " (OpenVINO's choice)")
    else:
        from pipeline.runners import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(path, threads=os.cpu_count(), optimize=optimize)
        dims = runner.session.get_inputs()[0].shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise PipelineError(f"{path}: input shape {dims} is not static besides the batch")
        shape = [1, *dims]
        note = "ONNX Runtime CPU" + ("" if optimize else " (graph optimizations off: FP16-typed)")
    result = measure_latency(runner, shape, warmup=3, seconds=seconds)
    return {"result": result.as_dict(), "note": f"{note}, batch 1, {result.iterations} runs"}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _preprocessing_row(build: _Build, cache: dict, say, missing: list) -> dict:
    """The deployed artifact on frames preprocessed the runtime's way vs the reference crops."""
    try:
        from pipeline.runtime.evaluate import preprocessing_drift
    except ImportError:
        note = "the camera runtime's pipeline.runtime.evaluate.preprocessing_drift is not available in this checkout"
        missing.append(f"deployment preprocessing row: {note}")
        return {"note": note}
    bundle = build.root / "bundle"
    if not (bundle / "manifest.json").is_file():
        note = f"no bundle in {bundle}: rebuild with this version of `python -m pipeline build` to write it"
        missing.append(f"deployment preprocessing row: {note}")
        return {"note": note}
    paths = _existing_images(build.image_paths)[:PREPROCESSING_IMAGES]
    if not paths:
        note = "reference/images.txt is missing or names no readable image: rebuild the reference stage"
        missing.append(f"deployment preprocessing row: {note}")
        return {"note": note}
    bundle_key = build.key("bundle") or _file_digest(bundle / "manifest.json")
    key = stable_hash([bundle_key, paths])

    def measure():
        say(f"  deployment preprocessing drift on {len(paths)} images")
        return preprocessing_drift(bundle, paths).as_dict()

    try:
        return {"drift": _cached(cache, "preprocessing", key, measure), "images": len(paths)}
    except Exception as error:  # another component's failure is reported, not raised into the build
        note = f"failed: {_first_line(error)}"
        missing.append(f"deployment preprocessing row: {note}")
        return {"note": note}


def _file_digest(path: Path) -> str:
    from pipeline.cache import sha256_file

    return sha256_file(path)


def _existing_images(paths: list[str]) -> list[str]:
    """The evaluation images that can be read from here (paths are as the build saw them)."""
    found = []
    for path in paths:
        resolved = _resolve_image(path)
        if resolved is not None:
            found.append(str(resolved))
    return found


def _resolve_image(path: str) -> Path | None:
    """An image path from images.txt. Relative paths are relative to where the build ran: try the
    current folder, then IMAGENET_DIR and the project folder (the default ImageNet root is relative to it)."""
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate if candidate.is_file() else None
    tries = []
    if os.environ.get("IMAGENET_DIR") and "val" in candidate.parts:
        tries.append(Path(os.environ["IMAGENET_DIR"], *candidate.parts[_last_index(candidate.parts, "val"):]))
    tries.append(PROJECT_DIR / candidate)
    return next((found for found in tries if found.is_file()), None)


def _last_index(parts: tuple[str, ...], name: str) -> int:
    return len(parts) - 1 - parts[::-1].index(name)


def _sensitivity(build: _Build, missing: list) -> dict:
    path = build.root / "quantize" / "gate.json"
    if "quantize" not in build.stages:
        return {"note": "Not an INT8 build: no quantization, no per-layer sensitivity"}
    try:
        gate = json.loads(path.read_text())
    except (OSError, ValueError):
        note = f"{path} is missing or unreadable: rebuild the quantize stage"
        missing.append(f"per-layer sensitivity: {note}")
        return {"note": note}
    attempts = [{"excluded_count": a.get("excluded_count"), "passed": a.get("passed"), "figure": a.get("figure"),
                 "figure_name": (a.get("details") or {}).get("figure")} for a in gate.get("attempts", [])]
    return {"kept_in_float": gate.get("excluded_layers", []), "passed": gate.get("passed"),
            "layers": len(gate.get("ranking", [])), "ranking": gate.get("ranking", []), "attempts": attempts}


def _int8_stages(build: _Build) -> list[str]:
    """Checked stages whose artifact is quantized (quantize, openvino_int8, quantize_fp16, tensorrt_int8)."""
    return [name for name, stage in build.stages.items()
            if stage.get("drift") is not None and (name.startswith("quantize") or name.endswith("int8"))]


def _flips(build: _Build, missing: list) -> dict:
    """Evaluation images whose top-1 differs between the FP32 reference and an INT8 stage."""
    stages = _int8_stages(build)
    if not stages:
        return {"stages": [], "images": [], "note": "Not an INT8 build: no INT8 stage to compare"}
    if build.reference_logits is None:
        note = "reference/logits.npy is missing: rebuild the reference stage"
        missing.append(f"changed predictions: {note}")
        return {"stages": stages, "images": [], "note": note}
    reference = build.reference_logits.argmax(1)
    predictions = {}
    counts = {}
    for stage in stages:
        logits = build.logits(stage)
        if logits is None:
            missing.append(f"changed predictions: no logits of {stage} (check_{stage}/logits.npy): rebuild it")
            continue
        predictions[stage] = logits.argmax(1)
        counts[stage] = {"images": int(len(logits)), "changed": int(np.sum(predictions[stage] != reference[: len(logits)]))}
    changed = sorted({int(i) for stage, pred in predictions.items() for i in np.flatnonzero(pred != reference[: len(pred)])})
    if not build.image_paths:
        missing.append("thumbnails of changed predictions: reference/images.txt is missing: rebuild the reference stage")
    rows = []
    for index in changed:
        truth = int(build.truth[index]) if build.truth is not None else -1
        row = {"index": index, "image": build.image_paths[index] if index < len(build.image_paths) else None,
               "label": truth, "label_name": build.class_name(truth) if truth >= 0 else None,
               "fp32": int(reference[index]), "fp32_name": build.class_name(int(reference[index])), "int8": {}}
        for stage, pred in predictions.items():
            if index < len(pred):
                row["int8"][stage] = {"class": int(pred[index]), "name": build.class_name(int(pred[index]))}
        rows.append(row)
    return {"stages": list(predictions), "counts": counts, "images": rows}


def _benchmark(build: _Build, missing: list) -> dict | None:
    path = build.root / "benchmark.json"
    if not path.is_file():
        missing.append(f"benchmark table: no {path.name} in the build: run `python -m pipeline benchmark --latency "
                       f"--throughput --frame-path --model {build.manifest.get('model')}` to write it")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        missing.append(f"benchmark table: {path} is unreadable ({error}): run `python -m pipeline benchmark` again")
        return None


# ---------------------------------------------------------------------------------------------------
# Calibration methods compared.


def _calibration_comparison(build: _Build, cache: dict, requested: bool, reporter, missing: list) -> dict:
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
        value = _cached(cache, "calibration_comparison", key, lambda: compare_calibration_methods(build, reporter))
    except PipelineError as error:
        missing.append(f"calibration comparison: {error}")
        return {"note": f"failed: {error}"}
    return value


def _config_of(build: _Build):
    """The configuration a finished build was made with, as far as its manifest records it."""
    from pipeline.config import load_config

    manifest, stages = build.manifest, build.stages
    calibrate, quantize = stages["calibrate"], stages["quantize"]
    if not build.image_paths:
        raise PipelineError(f"{build.root}/reference/images.txt is missing: rebuild the reference stage to record "
                            "the evaluation images")
    paths = [Path(p) for p in _existing_images(build.image_paths)]
    if len(paths) < len(build.image_paths):
        raise PipelineError(f"{build.root}/reference/images.txt names evaluation images that cannot be found from "
                            "here: run the report from the folder the build ran in, or set IMAGENET_DIR")
    data = {"seed": manifest.get("seed", 0), "calibration_images": calibrate["facts"]["images"]}
    lossless = [s["drift"]["images"] for n, s in stages.items() if s.get("drift") and n in ("export", "simplify")]
    if lossless:
        data["evaluation_images"] = lossless[0]
    if paths and all("val" in p.parts for p in paths):
        first = paths[0].parts
        data["imagenet"] = str(Path(*first[: _last_index(first, "val")]))
    elif paths:
        data["frames"] = os.path.commonpath([str(p.parent) for p in paths])
    overrides = {
        "build_dir": str(build.root.parent.parent), "models": [manifest["model"]], "target": manifest["target"],
        "precision": "int8", "weights": "random" if manifest.get("weights", {}).get("random") else "imagenet",
        "network": {"input_size": manifest.get("input", {}).get("size", 0)},
        "data": data,
        "quantization": {"method": calibrate["params"]["method"], "percentile": calibrate["params"]["percentile"],
                         "histogram_bins": calibrate["params"]["bins"],
                         "evaluation_images": quantize["params"]["evaluation_images"]},
    }
    if "frames" in data:
        overrides["network"]["labels"] = str(build.root / manifest.get("labels", "labels.txt"))
    return load_config(None, overrides)


def compare_calibration_methods(build: _Build, reporter=None) -> dict:
    """Quantize with each calibration method (the same layers in float as the gate chose) and judge it."""
    from calibration.statistics import CalibrationTable, ImageBatches, collect_ranges
    from pipeline.build import BuildContext, stage_key
    from pipeline.cache import StageRecord
    from pipeline.drift import compare
    from pipeline.progress import Reporter
    from pipeline.quantize import quantized_activations, write_qdq_model
    from pipeline.runners import OnnxRuntimeRunner
    from pipeline import stages as stage_graphs

    reporter = reporter or Reporter(quiet=True)
    config = _config_of(build)
    stages = (getattr(stage_graphs, "stages_for", None) or stage_graphs.cpu_stages)(config)
    ctx = BuildContext(config, build.manifest["model"], reporter, stages)
    records = {name: StageRecord(build.root / name, json.loads((build.root / name / "stage.json").read_text()))
               for name in ("reference", "simplify", "calibrate")}
    calibrate = next(stage for stage in stages if stage.name == "calibrate")
    same_images = stage_key(calibrate, ctx, records) == records["calibrate"].key
    fp32_onnx = records["simplify"].path("model.onnx")
    excluded = build.stages["quantize"]["facts"].get("excluded_layers") or []
    count = build.stages["quantize"]["drift"]["images"]
    reference = np.load(records["reference"].path("logits.npy"))[:count]
    labels = ctx.labels(records["reference"])[:count]
    budget = config.budget("quantize", ctx.random_weights, labelled=bool((labels >= 0).any()))
    tensors = quantized_activations(fp32_onnx)
    q = config.quantization
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="calibration-compare-"))
    try:
        for method in CALIBRATION_METHODS:
            started = time.perf_counter()
            if method == q.method and same_images:  # the build's own table: the same ranges
                table = CalibrationTable.load(records["calibrate"].path("calibration.json"))
            else:
                batches = ImageBatches(ctx.calibration.crops, ctx.preprocessing, config.data.batch_size)
                table = collect_ranges(fp32_onnx, tensors, batches, method=method, percentile=q.percentile,
                                       bins=q.histogram_bins, threads=ctx.threads,
                                       progress=ctx.progress(f"calibrating ({method})"))
            path = scratch / f"{method}.onnx"
            write_qdq_model(fp32_onnx, table.amax, path, excluded)
            logits = ctx.predict(OnnxRuntimeRunner(path, threads=ctx.threads), count, f"INT8 ONNX Runtime ({method})")
            result = compare(f"quantize ({method})", reference, logits, labels, budget)
            reporter.say(f"  calibration {method}: {result.summary()}")
            if method == q.method and not same_images:  # the key changed with the code: do the ranges?
                built = CalibrationTable.load(records["calibrate"].path("calibration.json")).amax
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


# ---------------------------------------------------------------------------------------------------
# Sections: what the markdown and HTML writers render.
#
# A section is {"title", "blocks"}; a block is ("text", str), ("warning", str), ("list", [str]),
# ("table", headers, rows), ("figure", file name, caption) or ("gallery", [{"file", "caption"}]).


def _summary_section(report: dict, build: _Build) -> dict:
    manifest = build.manifest
    blocks = []
    if report["random_weights"]:
        blocks.append(("warning", "RANDOM WEIGHTS: this build's network was never trained. Accuracy, agreement "
                       "and changed predictions below mean nothing; drift is judged on mean-centred logits "
                       "(centred cosine / SQNR). Do not ship it."))
    if report["status"] != "ok":
        blocks.append(("warning", f"The build did not finish: {report['status']}."))
    deployed = report["deployed"]
    pre = report["preprocessing"]
    blocks.append(("table", ["", ""], [
        ["model", str(report["model"])], ["target", str(report["target"])],
        ["deployed", f"{deployed.get('artifact')} ({report['precision']}"
                     + (f", OpenVINO precision {deployed['inference_precision']})" if deployed.get("inference_precision")
                        else ", engine built on the device)")],
        ["layers kept in float", ", ".join(deployed.get("int8_layers_in_float") or []) or "none"],
        ["weights", _weights_text(report["weights"])],
        ["preprocessing", f"resize {pre.get('resize')} ({pre.get('interpolation')}), center crop {pre.get('crop')}, "
                          f"mean {pre.get('mean')}, std {pre.get('std')}"],
        ["evaluation images", str(manifest.get("evaluation_images"))],
        ["host", f"{report['host'].get('processor')}, Python {report['host'].get('python')}"],
        ["report written", report["generated_at"]],
    ]))
    return {"title": f"{report['model']} on {report['target']}: quantization accuracy report", "blocks": blocks}


def _weights_text(weights: dict) -> str:
    text = weights.get("source", "?")
    if weights.get("sha256"):
        text += f" (sha256 {weights['sha256'][:12]}…)"
    return text + (" — RANDOM, accuracy meaningless" if weights.get("random") else "")


def _stage_section(report: dict, images: dict, plots) -> dict:
    headers = ["stage", "ran in", "images", "top-1 %", "top-5 %", "agreement", "flips lost/gained", "cosine",
               "SQNR dB", "max abs diff", "centred cos / SQNR", "size", "latency p50 / p99 ms", "verdict"]
    rows = []
    reference = report["reference"]
    notes = []
    for row in report["stages"]:
        drift = row["drift"]
        latency = row["latency"]
        latency_text = f"{latency['median_ms']:.2f} / {latency['p99_ms']:.2f}" if latency else "—"
        if row["latency_note"] and row["checked"]:
            notes.append(f"{row['stage']} latency: {row['latency_note']}")
        if drift is None:
            if row["stage"] == "reference":
                rows.append(["reference", "fp32 (torch)", str(reference.get("images", "—")),
                             _pct(reference.get("top1")), _pct(reference.get("top5")), "—", "—", "—", "—", "—", "—",
                             "—", "—", f"the reference ({reference.get('distinct_classes', '?')} distinct classes predicted)"])
            continue
        rows.append([
            row["stage"], row["precision_ran"] or "?", str(drift["images"]),
            _change(drift.get("ref_top1"), drift.get("top1")), _change(drift.get("ref_top5"), drift.get("top5")),
            f"{drift['agreement']:.2%}",
            "—" if drift.get("flips_lost") is None else f"{drift['flips_lost']} / {drift['flips_gained']}",
            f"{drift['cosine']:.6f}", _number(drift.get("sqnr_db"), ".1f"), _number(drift.get("max_abs"), ".3g"),
            f"{_number(drift.get('centred_cosine'), '.4f')} / {_number(drift.get('centred_sqnr_db'), '.1f')}",
            _size(row["size_bytes"]), latency_text,
            "pass" if drift.get("passed") else "FAIL: " + "; ".join(drift.get("failures", [])),
        ])
    blocks = []
    if report["random_weights"]:
        blocks.append(("warning", "Random weights: top-1 / top-5 / agreement are meaningless here; read the centred "
                                  "cosine and SQNR."))
    blocks += [("text", "Every stage against the torch FP32 reference on the first N evaluation images (top-1: "
                        "reference → stage; flips: images right in FP32 and wrong in the stage / the reverse)."),
               ("table", headers, rows)]
    checked = [row for row in report["stages"] if row["drift"] is not None]
    if checked:
        images["stages.png"] = plots.stages_plot([r["stage"] for r in checked], [r["drift"].get("top1") for r in checked],
                                                 [r["drift"]["agreement"] for r in checked],
                                                 [r["drift"].get("sqnr_db") for r in checked])
        blocks.append(("figure", "stages.png", "Accuracy and SQNR per stage"))
    if notes:
        blocks.append(("list", notes))
    return {"title": "Stages", "blocks": blocks}


def _preprocessing_section(row: dict) -> dict:
    if "drift" not in row:
        return {"title": "Deployment preprocessing", "blocks": [("text", f"Not measured: {row['note']}.")]}
    drift = row["drift"]
    table = ["deployment preprocessing", str(drift["images"]), f"{drift['agreement']:.2%}",
             _change(drift.get("ref_top1"), drift.get("top1")), f"{drift['cosine']:.6f}",
             _number(drift.get("sqnr_db"), ".1f"), _number(drift.get("max_abs"), ".3g")]
    return {"title": "Deployment preprocessing", "blocks": [
        ("text", "The deployed artifact on frames preprocessed the camera runtime's fast way, against the torch "
                 "FP32 reference on PIL-bicubic crops: the preprocessing's own drift, on top of the model's."),
        ("table", ["row", "images", "agreement", "top-1 %", "cosine", "SQNR dB", "max abs diff"], [table])]}


def _sensitivity_section(sensitivity: dict, images: dict, plots) -> dict:
    if "ranking" not in sensitivity:
        return {"title": "Per-layer sensitivity", "blocks": [("text", sensitivity["note"] + ".")]}
    kept = sensitivity["kept_in_float"]
    blocks = [("text", f"{sensitivity['layers']} quantized convolutions ranked by the SQNR of each one quantized "
                       f"alone (one-pass ranking of the INT8 gate). Kept in float by the gate: "
                       f"{', '.join(kept) if kept else 'none (every convolution runs in INT8)'}.")]
    if sensitivity["ranking"]:
        images["sensitivity.png"] = plots.sensitivity_plot(sensitivity["ranking"], kept)
        blocks.append(("figure", "sensitivity.png", "Per-layer sensitivity (red: kept in float)"))
    attempts = [[str(a["excluded_count"]), "pass" if a["passed"] else "over budget",
                 f"{a['figure_name']}: {_number(a['figure'], '.4g')}"] for a in sensitivity["attempts"]]
    if attempts:
        blocks.append(("table", ["layers in float", "gate verdict", "figure"], attempts))
    return {"title": "Per-layer sensitivity", "blocks": blocks}


def _calibration_section(comparison: dict, images: dict, plots) -> dict:
    if "methods" not in comparison:
        return {"title": "Calibration methods", "blocks": [("text", comparison["note"] + ".")]}
    rows = []
    for row in comparison["methods"]:
        drift = row["drift"]
        rows.append([row["method"] + (" (this build)" if row["build_method"] else ""), str(row["calibration_images"]),
                     _change(drift.get("ref_top1"), drift.get("top1")), f"{drift['agreement']:.2%}",
                     "—" if drift.get("flips_lost") is None else f"{drift['flips_lost']} / {drift['flips_gained']}",
                     f"{drift['cosine']:.6f}", _number(drift.get("sqnr_db"), ".1f"),
                     "pass" if drift["passed"] else "FAIL: " + "; ".join(drift["failures"])])
    methods = comparison["methods"]
    images["calibration.png"] = plots.calibration_plot([m["method"] for m in methods],
                                                       [m["drift"].get("top1") for m in methods],
                                                       [m["drift"]["agreement"] for m in methods],
                                                       [m["drift"].get("sqnr_db") for m in methods])
    blocks = [("text", f"The Q/DQ model quantized with each method's ranges (the build's calibration images; "
                       f"percentile {comparison['percentile']}, {comparison['bins']} histogram bins; the same "
                       f"{len(comparison['kept_in_float'])} layers in float as the gate chose), in ONNX Runtime on "
                       f"{comparison['images']} INT8 evaluation images, judged on the quantize budget."),
              ("table", ["method", "calibration images", "top-1 %", "agreement", "flips lost/gained", "cosine",
                         "SQNR dB", "verdict"], rows),
              ("figure", "calibration.png", "Calibration methods compared")]
    if comparison.get("note"):
        blocks.insert(0, ("warning", comparison["note"]))
    return {"title": "Calibration methods", "blocks": blocks}


def _flips_section(flips: dict, build: _Build, images: dict) -> dict:
    if flips.get("note"):
        return {"title": "Changed predictions", "blocks": [("text", flips["note"] + ".")]}
    counts = "; ".join(f"{stage}: {c['changed']} of {c['images']} images" for stage, c in flips["counts"].items())
    blocks = [("text", f"Evaluation images whose top-1 class differs between the FP32 reference and an INT8 stage "
                       f"({counts or 'no INT8 logits'}).")]
    if not flips["images"]:
        blocks.append(("text", "No image changed its top-1 class."))
        return {"title": "Changed predictions", "blocks": blocks}
    gallery, rows = [], []
    for number, row in enumerate(flips["images"]):
        int8 = "; ".join(f"{stage}: {p['name']}" for stage, p in row["int8"].items())
        truth = row["label_name"] or "unknown"
        rows.append([str(row["index"]), Path(row["image"]).name if row["image"] else "?", truth, row["fp32_name"], int8])
        if number >= MAX_FLIP_THUMBNAILS:
            continue
        thumbnail = _thumbnail(row["image"])
        if thumbnail is None:
            continue
        name = f"flip_{row['index']:04d}.jpg"
        images[name] = thumbnail
        gallery.append({"file": name, "caption": f"true: {truth} | FP32: {row['fp32_name']} | INT8 {int8}"})
    if gallery:
        blocks.append(("gallery", gallery))
    if len(flips["images"]) > MAX_FLIP_THUMBNAILS:
        blocks.append(("text", f"Thumbnails of the first {MAX_FLIP_THUMBNAILS} only; the table lists all."))
    blocks.append(("table", ["#", "image", "true label", "FP32 top-1", "INT8 top-1"], rows))
    return {"title": "Changed predictions", "blocks": blocks}


def _thumbnail(path: str | None) -> bytes | None:
    """A JPEG thumbnail of an evaluation image, or None when it cannot be read from here."""
    from PIL import Image

    resolved = _resolve_image(path) if path else None
    if resolved is None:
        return None
    try:
        with Image.open(resolved) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            return buffer.getvalue()
    except OSError:
        return None


def _benchmark_section(benchmark) -> dict:
    title = "Benchmark"
    if benchmark is None:
        return {"title": title, "blocks": [("text", "No benchmark.json in this build: run `python -m pipeline benchmark "
                                                    "--latency --throughput --frame-path` to add latency percentiles, "
                                                    "throughput and the camera frame path here.")]}
    blocks = []
    for name in BENCHMARK_SECTIONS:
        section = benchmark.get(name) if isinstance(benchmark, dict) else None
        if not isinstance(section, dict) or not section.get("rows"):
            continue
        rows = section["rows"]
        headers = [key for key in dict.fromkeys(key for row in rows for key in row)
                   if key not in BENCHMARK_HIDDEN and any(row.get(key) not in (None, "") for row in rows)]
        machine = section.get("machine") or {}
        blocks.append(("text", f"{name.replace('_', ' ')} (python -m pipeline benchmark, {section.get('time', '?')}, "
                               f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores):"))
        blocks.append(("table", [h.replace("_", " ") for h in headers], [[_cell(row.get(h)) for h in headers] for row in rows]))
    if blocks:
        return {"title": title, "blocks": blocks}
    for name, rows in _benchmark_tables(benchmark):  # another layout: every list of rows in it
        headers = list(dict.fromkeys(key for row in rows for key in row))
        blocks.append(("text", f"{name}:"))
        blocks.append(("table", headers, [[_cell(row.get(h)) for h in headers] for row in rows]))
    if not blocks:
        blocks.append(("text", "benchmark.json holds no table: " + json.dumps(benchmark)[:500]))
    return {"title": title, "blocks": blocks}


def _benchmark_tables(benchmark) -> list[tuple[str, list[dict]]]:
    """Lists of row dicts anywhere in benchmark.json (its layout belongs to `pipeline.benchmark`)."""
    tables = []

    def walk(value, name: str) -> None:
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            tables.append((name, value))
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{name}.{key}" if name else str(key))

    walk(benchmark, "")
    return tables


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _pct(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _change(reference, value) -> str:
    return "—" if value is None else f"{reference:.2f} → {value:.2f}"


def _number(value, spec: str) -> str:
    """A metric from DriftResult.as_dict(): a float, None (undefined), or "inf"/"nan" strings."""
    if value is None:
        return "—"
    if value == "inf":
        return "∞"
    if isinstance(value, str):
        return value
    return format(value, spec) if math.isfinite(value) else str(value)


def _size(size: int | None) -> str:
    if size is None:
        return "—"
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


# ---------------------------------------------------------------------------------------------------
# Markdown.


def render_markdown(report: dict, sections: list[dict]) -> str:
    lines = []
    for number, section in enumerate(sections):
        lines += [("# " if number == 0 else "## ") + section["title"], ""]
        for block in section["blocks"]:
            kind = block[0]
            if kind == "text":
                lines += [block[1], ""]
            elif kind == "warning":
                lines += [f"> **WARNING:** {block[1]}", ""]
            elif kind == "list":
                lines += [f"- {item}" for item in block[1]] + [""]
            elif kind == "table":
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                lines.append("|" + "|".join(" --- " for _ in headers) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                lines.append("")
            elif kind == "figure":
                lines += [f"![{block[2]}]({block[1]})", ""]
            elif kind == "gallery":
                lines += [f"![{item['caption']}]({item['file']})  \n{_md_cell(item['caption'])}\n" for item in block[1]]
    return "\n".join(lines).rstrip() + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
