"""`python -m pipeline benchmark`: wall time and peak memory of a cold build and of a cached re-run.

Each build runs as a child process (`python -m pipeline build ...`) so that its peak resident memory
is its own (`os.wait4` returns the child's rusage).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import PipelineError


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


def _cpu() -> str:
    from pipeline.build import _cpu_name

    return f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _fmt(value, spec: str) -> str:
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
            f"| {model} | {name} | {stage['precision_ran']} | {d['images']} | {_fmt(d['ref_top1'], '.1f')} | "
            f"{_fmt(d['top1'], '.1f')} | {d['flips_lost'] if d['flips_lost'] is not None else '—'} / "
            f"{d['flips_gained'] if d['flips_gained'] is not None else '—'} | "
            f"{d['agreement']:.1%} | {d['cosine']:.6f} | {d['max_abs_rel']:.1e} | {_fmt(d['sqnr_db'], '.1f')} | "
            f"{_fmt(d['centred_cosine'], '.4f')} | {_fmt(d['centred_sqnr_db'], '.1f')} |")
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
        f"Machine: {_cpu()}. Build options: `{' '.join(build_args) or '(defaults)'}`.",
        "",
        "| model | weights | check images | cold build | cold peak RSS | cached re-run | re-run peak RSS |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *timing,
        "",
        "| model | stage | ran in | images | reference top-1 % | stage top-1 % | flips lost / gained | agreement | cosine | max abs / max ref | SQNR dB | centred cosine | centred SQNR dB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *drift,
    ])


def _built_root(config, model: str) -> Path:
    root = Path(config.build_dir) / model / config.target
    manifest = root / "manifest.json"
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
    from pipeline.latency import LatencySettings, latency_for_build

    sections = []
    for model in models:
        root = _built_root(config, model)
        manifest = json.loads((root / "manifest.json").read_text())
        table = latency_for_build(root, _torch_factory(model, manifest), LatencySettings(seconds=seconds),
                                  progress=lambda text: print(f"  {model}: {text}", file=sys.stderr))
        sections.append(f"### {model}\n\n{table.markdown}")
    return "\n\n".join(sections)


def compare_nncf(config, models: list[str], seconds: float) -> str:
    """NNCF's own `nncf.quantize` against our Q/DQ path, same calibration images, same evaluation."""
    from pipeline.build import BuildContext
    from pipeline.cache import StageRecord
    from pipeline.latency import OpenVinoLatencyRunner, measure_latency
    from pipeline.progress import Reporter
    from pipeline.stages import cpu_stages
    from targets.nncf_quantizer import nncf_quantize_ir
    from targets.openvino import OpenVinoRunner

    rows = []
    for model in models:
        root = _built_root(config, model)
        manifest = json.loads((root / "manifest.json").read_text())
        ctx = BuildContext(config, model, Reporter(), cpu_stages(config))
        reference = StageRecord(root / "reference", json.loads((root / "reference" / "stage.json").read_text()))
        count = config.quantization.evaluation_images
        crops = ctx.calibration.crops
        batches = [ctx.preprocessing.normalize(crops[i : i + 8]) for i in range(0, len(crops), 8)]
        with tempfile.TemporaryDirectory(prefix="nncf-") as folder:
            started = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # NNCF draws its progress on stdout: keep the table clean
                xml = nncf_quantize_ir(root / "simplify" / "model.onnx", batches, len(crops), Path(folder) / "model.xml")
            quantize_seconds = time.perf_counter() - started
            candidates = {
                f"NNCF nncf.quantize (subset_size={len(crops)})": (xml, f"{quantize_seconds:.0f} s"),
                f"ours: Q/DQ ONNX ({manifest['stages']['calibrate']['facts']['method']}) -> IR": (
                    root / "openvino_int8" / "model.xml", f"{manifest['stages']['quantize']['build_seconds']:.0f} s (gate included)"),
            }
            for name, (path, took) in candidates.items():
                runner = OpenVinoRunner(path, inference_precision=ctx.deployed_openvino_hint, threads=ctx.threads)
                result = ctx.judge("openvino_int8", reference, ctx.predict(runner, count, name))
                shape = (1, 3, ctx.preprocessing.crop, ctx.preprocessing.crop)
                latency = measure_latency(lambda: OpenVinoLatencyRunner(path, ctx.deployed_openvino_hint), shape,
                                          seconds=seconds, name=name)
                d = result.as_dict()
                rows.append(
                    f"| {model} | {name} | {took} | {_fmt(d['ref_top1'], '.2f')} | {_fmt(d['top1'], '.2f')} | "
                    f"{d['flips_lost'] if d['flips_lost'] is not None else '—'} / "
                    f"{d['flips_gained'] if d['flips_gained'] is not None else '—'} | {d['agreement']:.2%} | "
                    f"{_fmt(d['sqnr_db'], '.1f')} | {_fmt(d['centred_cosine'], '.4f')} | {latency.median_ms:.1f} |")
                print(rows[-1], file=sys.stderr)
    return "\n".join([
        f"Machine: {_cpu()}. Calibration: {config.data.calibration_images} train-sample images; evaluation: "
        f"{config.quantization.evaluation_images} val images; OpenVINO precision of float layers: "
        f"{config.openvino.inference_precision}.",
        "",
        "| model | INT8 IR from | quantize time | FP32 top-1 % | INT8 top-1 % | flips lost / gained | agreement | SQNR dB | centred cosine | batch-1 median ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])
