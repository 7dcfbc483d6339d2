"""`python -m pipeline device-build BUNDLE`: build the TensorRT engine on the GPU it runs on, check it, time it.

An engine is tied to the GPU architecture and the TensorRT version, so the host ships a bundle and the
engine is built here, from the bundle's ONNX and its `tensorrt` options:

1. TensorRT and a GPU must be present (`tensorrt_status()`), else one line saying how to get them.
2. The plan (`targets.tensorrt.builder.plan_build`) picks the ONNX and flags by what this TensorRT can do;
   DLA / implicit INT8 on TensorRT 10.x gets a legacy calibration cache written from calibration.json.
3. `engines/<precision>[-fallback][-dla<N>]-<gpu>-trt<version>/model.engine` (+ `.json` metadata) is reused
   when its metadata matches (TensorRT version, GPU, source ONNX sha256), else built.
4. The golden crops run through the engine and are judged on the bundle's budget for the precision;
   latency (batch 1) and throughput (max batch) are measured, trtexec's figure added when it exists,
   and the power mode / clocks recorded with them in `results/device-build-<precision>-<UTC time>.json`.
5. Past budget: an engine that also outputs the manifest's intermediate tensors runs the first golden
   images; the first tensor whose cosine against the host's FP32 value falls below 0.99 is named, and
   the host's fallback variant offered (`pipeline.divergence`). Exit 3.

Device-side: no torch, no ONNX, no build code; Python 3.10; TensorRT and cuda-python imported inside
functions. Everything that does not need TensorRT is a small function tested on development machines.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from pipeline import golden
from pipeline.artifact import ENGINES_DIR, Bundle, sha256_file
from pipeline.divergence import (  # noqa: F401
    DIVERGENCE_COSINE,
    failure_advice,
    first_divergence,
    intermediates,
)
from pipeline.errors import DriftError, PipelineError
from targets import GPU_TARGETS
from targets.runner import close as _close
from targets.tensorrt.device_info import CUDA_PYTHON_JETPACK6

CALIBRATION_CACHE = "calibration.cache"  # bundle-relative: engines/calibration.cache, as trtexec.txt names it
ENGINE_FILE = "model.engine"
VENV_ADVICE = ("on a Jetson create the venv with `python3 -m venv --system-site-packages` so that JetPack's "
               "TensorRT bindings are visible")
CUDA_PYTHON_ADVICE = f"install `{CUDA_PYTHON_JETPACK6}` on JetPack 6 (CUDA 12.6)"


def command(args) -> int:
    options = dict(variant=args.variant, dla_core=args.dla_core, dla_batch=getattr(args, "dla_batch", None),
                   seconds=args.seconds, trtexec=not args.no_trtexec)
    results = build_and_check(args.bundle, args.precision, **options)
    bundle = Bundle.open(results["bundle"]["root"], check_hashes=False)
    written = golden.write_results(bundle, f"device-build-{results['precision']}", _without_table(results))
    if args.json:
        print(json.dumps({**_without_table(results), "results_file": str(written)}, indent=2, default=str))
    else:
        print(results["table"])
        print(f"results: {written}")
    if not results["passed"]:
        raise DriftError(results["message"])
    return 0


def require_tensorrt() -> None:
    """One clear line (exit 2) when this machine cannot build TensorRT engines."""
    try:
        from targets.tensorrt.device_info import tensorrt_status
    except ImportError as error:
        raise PipelineError(f"the TensorRT back end of this pipeline is missing ({error}): reinstall the "
                            "project's wheel from the bundle") from None
    ok, reason = tensorrt_status()
    if not ok:
        raise PipelineError(no_tensorrt_message(reason))


def no_tensorrt_message(reason: str) -> str:
    """Why no engine can be built here and how to get there, without repeating what `reason` says."""
    advice = ["run device-build on the Jetson or GPU machine the engine is for"]
    advice += [text for text, mark in ((VENV_ADVICE, "--system-site-packages"), (CUDA_PYTHON_ADVICE, "cuda-python"))
               if mark not in reason]
    return f"cannot build a TensorRT engine here: {reason.rstrip('.')}; " + "; ".join(advice)


def build_and_check(bundle_dir: str | Path, precision: str | None = None, reporter=None, *,
                    variant: str = "default", dla_core: int | None = None, dla_batch: int | None = None,
                    seconds: float = 10.0,
                    trtexec: bool = True, diagnose: bool = True) -> dict:
    """Build (or reuse) the engine of a GPU bundle, check it on the golden data, time it.

    Returns at least `passed`, `drift` (DriftResult.as_dict()), `engine`, `latency`, `throughput`,
    `trtexec`, `device`, and on failure `divergence` and `message`. Needs TensorRT and a GPU.
    """
    # The bundle first: a damaged or CPU bundle is worth knowing about before anything else is missing.
    bundle = Bundle.open(bundle_dir)
    check_gpu_bundle(bundle)
    require_tensorrt()
    import tensorrt as trt

    from targets.tensorrt.device_info import (
        gpu_description,
        jetson_info,
        l4t_release_here,
    )

    precision = precision or bundle.precision
    plan, options, features = plan_for(bundle, precision, variant, dla_core, trt, dla_batch)
    gpu = {**gpu_description(), "l4t_release": l4t_release_here()}
    folder = bundle.path(ENGINES_DIR) / engine_folder_name(precision, variant, options.dla_core, gpu["name"],
                                                           features.version, options.dla_batch)
    golden.say(reporter, f"device-build: {bundle.model} {precision} ({variant}) from {plan.onnx.name}: {plan.note}")
    engine = ensure_engine(plan, options, folder, gpu, trt, reporter, extra={"bundle_model": bundle.model, "variant": variant})
    from targets.tensorrt.placement import check_dla_budget, summary
    from targets.tensorrt.runner import TensorRtRunner

    cache = plan.calibration_cache
    placement = (_metadata(engine) or {}).get("placement") or {}
    golden.say(reporter, f"  placement: {summary(placement, options.dla_core)}")
    check_dla_budget(placement, options.dla_core, options.min_dla_layers, engine)  # a reused engine too
    if options.dla_core >= 0 and placement.get("detailed") and not placement.get("on_dla"):
        golden.say(reporter, f"  warning: DLA core {options.dla_core} asked for, every layer runs on the GPU: "
                             "set tensorrt.min_dla_layers to make this an error")

    crops, labels, reference = golden.load_golden(bundle)
    runner = TensorRtRunner(engine)
    low, _, high = options.batches  # a static (DLA) engine takes its one batch size only
    try:
        logits = golden.run_golden(bundle, runner, crops, high, pad=options.static)
        drift = golden.judge(f"tensorrt_{precision}", reference, logits, labels, golden.budget_for(bundle, precision))
        size = options.image_size
        latency = golden.time_runner(runner, (low, 3, size, size), seconds)
        throughput = golden.time_runner(runner, (high, 3, size, size), seconds)
        execution = getattr(runner, "execution_precision", precision)
    finally:
        _close(runner)
    trtexec_figures = None
    if trtexec:
        from targets.tensorrt.trtexec import run_trtexec

        trtexec_figures = run_trtexec(engine, f"{options.input_name}:{low}x3x{size}x{size}", seconds,
                                      dla_core=options.dla_core)
    results = {
        "command": "device-build",
        "passed": drift.passed,
        "precision": precision,
        "variant": variant,
        "bundle": {"root": str(bundle.root), "model": bundle.model, "target": bundle.target},
        "time_utc": golden.utc_stamp(),
        "hostname": golden.hostname(),
        "engine": {"path": str(engine), "onnx": str(plan.onnx.relative_to(bundle.root)), "flags": list(plan.flags),
                   "strongly_typed": plan.strongly_typed, "calibration_cache": None if cache is None else str(cache),
                   "note": plan.note, "execution_precision": execution, "dla_core": options.dla_core,
                   "static_shapes": options.static, "batches": list(options.batches), "placement": placement,
                   "placement_summary": summary(placement, options.dla_core)},
        "drift": drift.as_dict(),
        "expected": (bundle.manifest.get("expected") or {}).get(precision),
        "latency": latency,
        "throughput": throughput,
        "trtexec": trtexec_figures,
        "device": {"gpu": gpu, "jetson": jetson_info(), "tensorrt": features.version},
    }
    if not drift.passed:
        divergence = None
        if diagnose:
            divergence = diagnose_divergence(bundle, plan, options, folder, gpu, trt, reporter)
            results["divergence"] = divergence
        results["message"] = golden.failure_message(
            f"{bundle.root} ({precision} engine)", drift,
            failure_advice(bundle, precision, variant, divergence, from_qdq=plan.calibration_cache is None))
    results["table"] = result_table(bundle, results)
    return results


# ---------------------------------------------------------------------------------------------------
# TensorRT-independent pieces (tested on development machines).


def plan_for(bundle: Bundle, precision: str, variant: str, dla_core: int | None, trt, dla_batch: int | None = None):
    """(plan, engine options, features) for this TensorRT module: which ONNX, which flags, which cache.

    Writes engines/calibration.cache when the plan takes implicit INT8 from it (DLA on TensorRT 10.x).
    """
    from targets.tensorrt.builder import (
        detect_features,
        needs_calibration_cache,
        plan_build,
    )

    models = plan_models(bundle, precision, variant)
    options = engine_options(bundle, precision, dla_core, dla_batch)
    features = detect_features(trt)
    cache = write_calibration_cache(bundle, features.version) if needs_calibration_cache(features, options) else None
    plan = plan_build(features, options, models, calibration_cache=cache)
    if variant == "fallback" and plan.onnx != models["int8_qdq"]:
        raise PipelineError(f"--variant fallback is a Q/DQ model, but INT8 on DLA core {options.dla_core} with TensorRT "
                            f"{features.version} comes from the calibration cache: use --dla-core -1 (GPU) for the "
                            "fallback variant, or --precision fp16")
    return plan, options, features


def check_gpu_bundle(bundle: Bundle) -> None:
    if bundle.target not in GPU_TARGETS:
        raise PipelineError(f"{bundle.root}: a {bundle.target} bundle (OpenVINO IR) has no TensorRT engine to build: "
                            "run `python -m pipeline verify` on it instead")
    if not bundle.manifest.get("tensorrt"):
        raise PipelineError(f"{bundle.path('manifest.json')}: no 'tensorrt' options: rebuild the bundle with this "
                            "version of the pipeline")


def plan_models(bundle: Bundle, precision: str, variant: str = "default") -> dict[str, Path]:
    """The bundle's ONNX files under the keys `plan_build` takes: fp32, fp16, int8_qdq, int8_qdq_fp16.

    The fallback variant (int8 only) replaces both Q/DQ models by the host's fallback Q/DQ model (more
    layers in float; FP32-typed, so a strongly typed build runs its float layers in FP32).
    """
    if variant not in ("default", "fallback"):
        raise PipelineError(f"--variant must be 'default' or 'fallback', got {variant!r}")
    bundle.artifact(precision)  # a clear error when the bundle lacks this precision
    artifacts = bundle.manifest.get("artifacts", {})
    models: dict[str, Path] = {}
    for key in ("fp32", "fp16"):
        if key in artifacts:
            models[key] = bundle.path(artifacts[key]["file"])
    int8 = artifacts.get("int8")
    if int8:
        models["int8_qdq"] = bundle.path(int8["file"])
        if int8.get("strongly_typed"):
            models["int8_qdq_fp16"] = bundle.path(int8["strongly_typed"])
    if variant == "fallback":
        if precision != "int8":
            raise PipelineError(f"--variant fallback applies to int8 engines only (asked: {precision}); "
                                "use --precision fp16 for a float engine")
        if not (int8 or {}).get("fallback"):
            raise PipelineError(f"{bundle.root}: the bundle has no int8 fallback model: use --precision fp16")
        models["int8_qdq"] = models["int8_qdq_fp16"] = bundle.path(int8["fallback"])
    for key, path in models.items():
        if not path.is_file():
            raise PipelineError(f"{path}: missing from the bundle: copy the whole bundle (or its .tar.gz) again")
    return models


def engine_options(bundle: Bundle, precision: str, dla_core: int | None = None, dla_batch: int | None = None):
    """The builder options the bundle's `tensorrt` section says (--dla-core / --dla-batch override it)."""
    from targets.tensorrt.builder import EngineOptions

    trt_options = bundle.manifest.get("tensorrt") or {}
    core = trt_options.get("dla_core", -1) if dla_core is None else dla_core
    batch = trt_options.get("dla_batch", 1) if dla_batch is None else dla_batch
    timing_cache = trt_options.get("timing_cache")
    if timing_cache:  # relative paths lie beside the engines
        timing_cache = bundle.path(ENGINES_DIR) / timing_cache if not os.path.isabs(timing_cache) else Path(timing_cache)
    try:
        return EngineOptions(
            precision=precision, image_size=int(bundle.manifest["input"]["size"]),
            min_batch=int(trt_options.get("min_batch", 1)), opt_batch=int(trt_options.get("opt_batch", 1)),
            max_batch=int(trt_options.get("max_batch", 8)),
            input_name=bundle.manifest["input"].get("name", "input"),
            workspace_mib=int(trt_options.get("workspace_mib", 2048)), dla_core=int(core), dla_batch=int(batch),
            min_dla_layers=float(trt_options.get("min_dla_layers", 0.0)),
            timing_cache=timing_cache or None)
    except (TypeError, ValueError) as error:
        raise PipelineError(f"{bundle.path('manifest.json')}: bad 'tensorrt' options ({error}): rebuild the bundle") from None


def write_calibration_cache(bundle: Bundle, trt_version: str, reporter=None) -> Path:
    """engines/calibration.cache for this TensorRT version, from the bundle's version-neutral table:
    a scale for every tensor DLA may run in INT8 (the table's `dla` section), not only the Conv inputs."""
    from targets.tensorrt.calibration_cache import (
        dla_amax_from_table,
        write_legacy_cache,
    )

    int8 = bundle.manifest.get("artifacts", {}).get("int8") or {}
    table_path = bundle.path(int8.get("calibration") or bundle.manifest.get("calibration") or "calibration.json")
    try:
        table = json.loads(table_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PipelineError(f"{table_path}: cannot read the calibration table ({error}): copy the bundle again") from None
    try:
        amax, warning = dla_amax_from_table(table)
    except PipelineError as error:
        raise PipelineError(f"{table_path}: {error}") from None
    if warning:
        golden.say(reporter, f"  warning: {warning}")
    target = bundle.path(ENGINES_DIR) / CALIBRATION_CACHE
    write_legacy_cache(amax, trt_version, target)  # atomic: temp file, then rename
    return target


def engine_folder_name(precision: str, variant: str, dla_core: int, gpu_name: str, trt_version: str,
                       dla_batch: int = 1) -> str:
    """`int8-fallback-dla0-b1-nvidia-orin-trt10.3.0`: one engine per precision, variant, DLA core and batch
    (DLA engines have static shapes), GPU and TensorRT."""
    parts = [precision]
    if variant == "fallback":
        parts.append("fallback")
    if dla_core >= 0:
        parts += [f"dla{dla_core}", f"b{dla_batch}"]
    parts.append(_slug(gpu_name) or "gpu")
    parts.append(f"trt{_slug(trt_version)}")
    return "-".join(parts)


def reusable(metadata: dict | None, trt_version: str, gpu_name: str, onnx_sha256: str,
             mark_outputs: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Whether an engine's metadata matches what would be built now, and why not."""
    if metadata is None:
        return False, "no engine yet"
    for key, wanted in (("tensorrt_version", trt_version), ("gpu_name", gpu_name), ("source_onnx_sha256", onnx_sha256)):
        if metadata.get(key) != wanted:
            return False, f"{key} differs ({metadata.get(key)!r}, now {wanted!r})"
    extra = metadata.get("extra") or {}
    marked = extra.get("mark_outputs") or extra.get("marked_outputs") or ()
    if tuple(marked) != tuple(mark_outputs):
        return False, "marked outputs differ"
    return True, "metadata matches"


def result_table(bundle: Bundle, results: dict) -> str:
    drift = results["drift"]
    rows = [
        ("top-1 %", _fmt((results.get("expected") or {}).get("top1")), _fmt(drift.get("top1"))),
        ("top-5 %", _fmt((results.get("expected") or {}).get("top5")), _fmt(drift.get("top5"))),
        ("agreement with FP32 %", _fmt(_pct((results.get("expected") or {}).get("agreement"))), _fmt(_pct(drift.get("agreement")))),
        ("mean cosine", "", _fmt(drift.get("cosine"), ".6f")),
        ("golden images", "", str(drift.get("images"))),
    ]
    latency, throughput, trtexec = results.get("latency") or {}, results.get("throughput") or {}, results.get("trtexec")
    rows.append(("latency p50 / p90 / p99 ms (batch 1)", "",
                 " / ".join(_fmt(latency.get(k)) for k in ("median_ms", "p90_ms", "p99_ms"))))
    rows.append((f"throughput img/s (batch {throughput.get('batch', '?')})", "", _fmt(throughput.get("throughput_ips"), ".1f")))
    if trtexec:
        compute = trtexec.get("gpu_compute_ms") or {}
        rows.append(("trtexec GPU compute median ms / qps (batch 1)", "",
                     f"{_fmt(compute.get('median'))} / {_fmt(trtexec.get('throughput_qps'), '.1f')}"
                     + (f" ({trtexec['error']})" if trtexec.get("error") else "")))
    if (results.get("engine") or {}).get("placement_summary"):
        rows.append(("placement", "", results["engine"]["placement_summary"]))
    jetson = (results.get("device") or {}).get("jetson") or {}
    gpu = (results.get("device") or {}).get("gpu") or {}
    rows.append(("GPU / TensorRT", "", f"{gpu.get('name', '?')} / {results['device'].get('tensorrt')}"))
    if jetson:
        rows.append(("L4T / power mode", "", f"{jetson.get('l4t_release', '?')} / {jetson.get('power_mode', '?')}"))
    divergence = results.get("divergence")
    if divergence:
        for name, cosine in divergence["cosines"].items():
            mark = "  <- first below 0.99" if name == divergence.get("first") else ""
            rows.append((f"cosine {name}", "", ("not produced" if cosine is None else f"{cosine:.4f}") + mark))
    verdict = "within budget" if results["passed"] else "PAST BUDGET"
    title = f"device-build {bundle.model} {results['precision']} ({results['variant']}): {verdict}"
    host = "host (CPU proxy)" if (results.get("expected") or {}).get("host_proxy") else "host"
    return golden.render_table(title, rows, header=("", host, "here"))


def ensure_engine(plan, options, folder: Path, gpu: dict, trt, reporter=None, extra: dict | None = None) -> Path:
    """The engine in `folder`, reused when its metadata matches, else built (engine + metadata, atomically).

    `gpu`: {"name", "compute_capability", "l4t_release"} of this device; `trt`: the tensorrt module.
    """
    from targets.tensorrt.builder import build_engine

    engine = folder / ENGINE_FILE
    ok, why = reusable(_metadata(engine), str(trt.__version__), gpu["name"], sha256_file(plan.onnx),
                       tuple(options.mark_outputs))
    if ok:
        golden.say(reporter, f"  reusing {engine} ({why})")
        return engine
    golden.say(reporter, f"  building {engine} ({why}); this takes minutes")
    folder.mkdir(parents=True, exist_ok=True)
    build_engine(plan, options, engine, metadata_extra={**(extra or {}), "mark_outputs": list(options.mark_outputs)},
                 trt=trt, device=gpu)
    return engine


def diagnose_divergence(bundle: Bundle, plan, options, folder: Path, gpu: dict, trt, reporter=None) -> dict | None:
    """Run the first golden images through an engine that marks the manifest's intermediates; compare."""
    from dataclasses import replace

    from targets.tensorrt.runner import TensorRtRunner

    order, host = intermediates(bundle)
    if not order:
        golden.say(reporter, "  the bundle has no golden intermediates: cannot say where the engine diverges")
        return None
    marked = replace(options, mark_outputs=tuple(order))
    engine = ensure_engine(plan, marked, folder.with_name(folder.name + "-marked"), gpu, trt, reporter)
    crops, _, _ = golden.load_golden(bundle)
    images = min(len(next(iter(host.values()))), len(crops), options.batches[2])
    runner = TensorRtRunner(engine)
    try:
        batch = crops[:images]
        if options.static:  # the one batch size a DLA engine takes: pad with the last image
            batch = np.concatenate([batch] + [batch[-1:]] * (options.dla_batch - images))
        outputs = {name: value[:images] for name, value in runner.run({runner.input_name: bundle.normalize(batch)}).items()}
    finally:
        _close(runner)
    first, cosines = first_divergence(host, outputs, order)
    golden.say(reporter, "  intermediate cosines: " + ", ".join(
        f"{name} {'—' if c is None else format(c, '.4f')}" for name, c in cosines.items()))
    return {"first": first, "cosines": cosines, "images": images, "threshold": DIVERGENCE_COSINE}


def _metadata(engine: Path) -> dict | None:
    path = engine.with_name(engine.name + ".json")
    if not (engine.is_file() and path.is_file()):
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable metadata: rebuild


def _without_table(results: dict) -> dict:
    return {key: value for key, value in results.items() if key != "table"}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")


def _fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return format(value, spec)


def _pct(value):
    return None if value is None or isinstance(value, str) else 100.0 * value if value <= 1.0 else value
