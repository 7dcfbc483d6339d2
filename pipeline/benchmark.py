"""`python -m pipeline benchmark`: wall time and peak memory of a cold build and of a cached re-run.

Each build runs as a child process (`python -m pipeline build ...`) so that its peak resident memory
is its own (`os.wait4` returns the child's rusage).
"""

from __future__ import annotations

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


def benchmark_builds(models: list[str], build_args: list[str]) -> str:
    """Markdown tables: cold build and cached re-run per model (fresh build folders), and the drift."""
    timing, drift = [], []
    for model in models:
        folder = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
        try:
            args = ["--model", model, "--build-dir", str(folder), *build_args]
            cold = _timed_build(args)
            cached = _timed_build(args)
            manifest = json.loads(next(folder.glob(f"{model}/*/manifest.json")).read_text())
        finally:
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
