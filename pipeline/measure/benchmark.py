"""`python -m pipeline benchmark`: wall time and peak memory of a cold build and of a cached re-run;
on finished builds, latency (`--latency`, p50/p90/p99), throughput (`--throughput`, best batch /
streams), the camera runtime's frame path (`--frame-path`) and NNCF against our INT8 (`--nncf`).

Each build runs as a child process (`python -m pipeline build ...`) so that its peak resident memory
is its own (`os.wait4` returns the child's rusage).

Every measurement on a finished build is also merged into `build/<model>/<target>/benchmark.json`
(written atomically) for the report:

    {"format": BENCHMARK_FORMAT, "model", "target", "updated": ISO time, "machine": {...},
     "latency" | "throughput" | "frame_path" | "nncf": {"time", "machine", "seconds", "markdown",
                                                        "rows": [flat row dicts], ...}}

A section is replaced by the next run of its mode; the others are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.layout import MANIFEST, build_root
from pipeline.measure.artifacts import error_line
from pipeline.measure.machine import cpu_summary, machine_description, machine_summary

BENCHMARK_FILE = "benchmark.json"
BENCHMARK_FORMAT = "inception-edge-benchmark/1"
SECTIONS = ("latency", "throughput", "frame_path", "nncf")


def _timed_build(args: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "build", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
        raise PipelineError(f"benchmark build failed: {last}")
    return seconds, usage.ru_maxrss / 1024 / 1024  # KiB -> GiB


def fmt(value, spec: str) -> str:
    """A figure for a markdown cell: "—" for None, a string as it is."""
    if value is None:
        return "—"
    return value if isinstance(value, str) else format(value, spec)


def drift_rows(model: str, manifest: dict) -> list[str]:
    """Markdown rows of a build's drift figures, the torch reference first."""
    stages = {name: stage for name, stage in manifest["stages"].items() if stage.get("drift")}
    rows = []
    for name, stage in stages.items():
        d = stage["drift"]
        rows.append(
            f"| {model} | {name} | {stage['precision_ran']} | {d['images']} | {fmt(d['ref_top1'], '.1f')} | "
            f"{fmt(d['top1'], '.1f')} | {d['flips_lost'] if d['flips_lost'] is not None else '—'} / "
            f"{d['flips_gained'] if d['flips_gained'] is not None else '—'} | "
            f"{d['agreement']:.1%} | {d['cosine']:.6f} | {d['max_abs_rel']:.1e} | {fmt(d['sqnr_db'], '.1f')} | "
            f"{fmt(d['centred_cosine'], '.4f')} | {fmt(d['centred_sqnr_db'], '.1f')} |")
    return rows


def benchmark_builds(models: list[str], build_args: list[str], keep_in: Path | None = None) -> str:
    """Markdown tables: cold build and cached re-run per model (fresh build folders), and the drift.

    keep_in: a build folder to keep the builds in (for `--latency` / `--nncf` afterwards); each
    model's folder in it must not exist yet, so that the first build is really cold."""
    timing, drift = [], []
    for model in models:
        if keep_in is not None and (keep_in / model).exists():
            raise PipelineError(f"{keep_in / model} exists: a cold build needs a fresh folder (remove it or pick another --build-dir)")
        folder = keep_in if keep_in is not None else Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
        try:
            args = ["--model", model, "--build-dir", str(folder), *build_args]
            cold = _timed_build(args)
            cached = _timed_build(args)
            manifest = json.loads(next(folder.glob(f"{model}/*/manifest.json")).read_text())
        finally:
            if keep_in is None:
                shutil.rmtree(folder, ignore_errors=True)
        weights = "random" if manifest["weights"]["random"] else manifest["weights"]["source"]
        timing.append(f"| {model} | {weights} | {manifest['evaluation_images']} | {cold[0]:.1f} s | {cold[1]:.2f} GiB | "
                      f"{cached[0]:.2f} s | {cached[1]:.2f} GiB |")
        drift.extend(drift_rows(model, manifest))
        print(timing[-1], file=sys.stderr)
    return "\n".join([
        f"Machine: {cpu_summary()}. Build options: `{' '.join(build_args) or '(defaults)'}`.",
        "",
        "| model | weights | check images | cold build | cold peak RSS | cached re-run | re-run peak RSS |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *timing,
        "",
        "| model | stage | ran in | images | reference top-1 % | stage top-1 % | flips lost / gained | agreement | cosine | max abs / max ref | SQNR dB | centred cosine | centred SQNR dB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *drift,
    ])


def built_root(config, model: str) -> Path:
    root = build_root(config.build_dir, model, config.target)
    manifest = root / MANIFEST
    if not manifest.exists() or json.loads(manifest.read_text()).get("status") != "ok":
        raise PipelineError(f"no finished build in {root}: run `python -m pipeline build --model {model}` first "
                            "(with the same --build-dir and options)")
    return root


def _torch_factory(model: str, manifest: dict):
    """The torch network for the latency table (weights only matter for accuracy, not for speed)."""

    def make():
        import numpy as np

        from pipeline.weights import load_model

        weights = manifest["weights"]
        size = manifest["preprocessing"]["crop"]
        if weights["random"] or weights["source"] != "file":
            noise = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
            source = "random" if weights["random"] else "imagenet"
            return load_model(model, source, input_size=size, bn_batches=[noise] if source == "random" else None).module
        return load_model(model, weights["path"], input_size=size).module

    return make


def benchmark_latency(config, models: list[str], seconds: float) -> str:
    """Batch-1 latency of every artifact of finished builds, side by side, with benchmark_app."""
    from pipeline.measure.latency import LatencySettings, latency_for_build

    check_seconds(seconds)
    sections = []
    for model in models:
        root = built_root(config, model)
        manifest = json.loads((root / MANIFEST).read_text())
        table = latency_for_build(root, _torch_factory(model, manifest), LatencySettings(seconds=seconds),
                                  progress=lambda text: print(f"  {model}: {text}", file=sys.stderr))
        rows = [_latency_row(row, table.speedup(row.key)) for row in table.rows]
        write_benchmark_section(root, "latency", {
            "seconds": seconds, "markdown": table.markdown, "threads": table.threads,
            "load_average": table.load_average, "benchmark_app_gap": table.benchmark_app_gap, "rows": rows})
        sections.append(f"### {model}\n\n{table.markdown}")
    return "\n\n".join(sections)


def _latency_row(row, speedup: float | None) -> dict:
    r = row.result
    return {"key": row.key, "back_end": row.label, "artifact": row.artifact, "ran_in": row.ran_in,
            "threads": row.threads, "p50_ms": _field(r, "p50_ms"), "p90_ms": _field(r, "p90_ms"),
            "p99_ms": _field(r, "p99_ms"), "mean_ms": _field(r, "mean_ms"),
            "images_per_second": _field(r, "throughput_ips"), "iterations": _field(r, "iterations"),
            "speedup_vs_torch": speedup, "note": row.note}


def _field(result, name: str):
    """A figure of a measured row, None for a row that was not measured."""
    return None if result is None else getattr(result, name)


def benchmark_throughput(config, models: list[str], seconds: float) -> str:
    """Images per second of every artifact of finished builds at its best batch / streams, with benchmark_app."""
    from pipeline.measure.throughput import ThroughputSettings, throughput_for_build

    check_seconds(seconds)
    sections = []
    for model in models:
        root = built_root(config, model)
        table = throughput_for_build(root, ThroughputSettings(seconds=seconds),
                                     progress=lambda text: print(f"  {model}: {text}", file=sys.stderr))
        rows = []
        for row in table.rows:
            best = row.best
            rows.append({"key": row.key, "back_end": row.label, "artifact": row.artifact, "ran_in": row.ran_in,
                         "threads": row.threads, "best_batch": _field(best, "batch"),
                         "requests_in_flight": _field(best, "requests"), "streams": _field(best, "streams"),
                         "images_per_second": _field(best, "images_per_second"),
                         "images_per_second_by_batch": {str(r.batch): r.images_per_second for r in row.tried},
                         "note": row.note})
        settings = table.settings
        write_benchmark_section(root, "throughput", {
            "seconds": seconds, "markdown": table.markdown, "openvino_batches": list(settings.openvino_batches),
            "onnx_batches": list(settings.onnx_batches), "load_average": table.load_average,
            "benchmark_app_gap": table.benchmark_app_gap, "rows": rows})
        sections.append(f"### {model}\n\n{table.markdown}")
    return "\n\n".join(sections)


def benchmark_frame_path(config, models: list[str], seconds: float) -> str:
    """decode + preprocess + infer per frame through the camera runtime, for each model of each bundle precision."""
    from pipeline.measure.frame_path import PREPROCESS_SHARE_GOAL, frame_jpeg, frame_path_markdown, measure_frame_path
    from pipeline.runtime import Classifier

    check_seconds(seconds)
    roots = {model: built_root(config, model) for model in models}
    jpeg, source = frame_jpeg(Path(config.data.imagenet))
    sections = []
    for model, root in roots.items():
        bundle = root / "bundle"
        results, failures = [], {}
        for precision in _bundle_precisions(bundle):
            print(f"  {model}: frame path, {precision}", file=sys.stderr)
            try:
                with Classifier.open(bundle, precision=precision) as classifier:
                    results.append(measure_frame_path(classifier, jpeg, seconds))
            except Exception as error:  # PipelineError or a back end's own: a row that says so, not a crash
                failures[precision] = error_line(error)
        markdown = frame_path_markdown(results, machine_summary(), seconds, source, failures)
        int8 = [r for r in results if r.precision == "int8"]
        share = int8[0].preprocess_share if int8 else None
        write_benchmark_section(root, "frame_path", {
            "seconds": seconds, "markdown": markdown, "frame": source, "bundle": str(bundle),
            "preprocess_share_of_int8_infer": share, "goal": PREPROCESS_SHARE_GOAL,
            "goal_met": None if share is None else share < PREPROCESS_SHARE_GOAL,
            "rows": [_frame_row(r) for r in results] + [{"precision": precision, "note": f"failed: {error}"}
                                                        for precision, error in failures.items()]})
        sections.append(f"### {model}\n\n{markdown}")
    return "\n\n".join(sections)


def _frame_row(result) -> dict:
    p, t = result.parts, result.total
    return {"precision": result.precision, "back_end": result.backend, "frame": f"{result.frame[0]}x{result.frame[1]}",
            "decode_ms": p["decode"].p50_ms, "preprocess_ms": p["preprocess"].p50_ms, "infer_ms": p["infer"].p50_ms,
            "top_k_ms": p["top_k"].p50_ms, "total_p50_ms": t.p50_ms, "total_p90_ms": t.p90_ms,
            "total_p99_ms": t.p99_ms, "total_mean_ms": t.mean_ms, "fps": result.fps,
            "preprocess_share_of_infer": result.preprocess_share, "normalisation": result.normalisation}


def _bundle_precisions(bundle: Path) -> list[str]:
    """The precisions a bundle carries, the deployed one first."""
    if not (bundle / "manifest.json").is_file():
        raise PipelineError(f"no bundle in {bundle}: rebuild with this version of the pipeline "
                            "(`python -m pipeline build ...` writes build/<model>/<target>/bundle/)")
    from pipeline.artifact import Bundle

    manifest = Bundle.open(bundle, check_hashes=False).manifest
    return [manifest["precision"], *(p for p in manifest.get("artifacts", {}) if p != manifest["precision"])]


def check_seconds(seconds: float) -> None:
    if not seconds > 0:
        raise PipelineError(f"--seconds must be positive, got {seconds}")


# ---------------------------------------------------------------------------------------------------
# benchmark.json


def write_benchmark_section(root: Path, section: str, data: dict) -> Path:
    """Merge one section into `root/benchmark.json` (atomically); the other sections are kept."""
    from datetime import datetime, timezone

    from pipeline.cache import write_json_atomic
    from pipeline.lock import folder_lock

    if section not in SECTIONS:
        raise ValueError(f"unknown benchmark section {section!r}: use one of {SECTIONS}")
    path = Path(root) / BENCHMARK_FILE
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_description()
    # Read, merge, write under the folder's lock: two benchmarks of one build never lose each other's section,
    # and a build never rewrites the folder meanwhile. (Held for milliseconds, never while measuring.)
    with folder_lock(Path(root), say=lambda text: None):
        document = read_benchmark(path) or {}
        if document.get("format") != BENCHMARK_FORMAT:
            document = {}  # an older layout: start again rather than mix two
        manifest = json.loads((Path(root) / MANIFEST).read_text())
        document.update({"format": BENCHMARK_FORMAT, "model": manifest.get("model"), "target": manifest.get("target"),
                         "updated": now, "machine": machine})
        document[section] = {"time": now, "machine": machine, **data}
        write_json_atomic(path, document)
    return path


def read_benchmark(path: Path) -> dict | None:
    """benchmark.json, or None when it is absent or unreadable (it is then rewritten from scratch)."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None
