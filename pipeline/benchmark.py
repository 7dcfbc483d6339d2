"""`python -m pipeline benchmark`: wall time and peak memory of a cold build and of a cached re-run.

Each build runs as a child process (`python -m pipeline build ...`) so that its peak resident memory
is its own (`os.wait4` returns the child's rusage).
"""

from __future__ import annotations

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


def benchmark_builds(models: list[str], build_args: list[str]) -> str:
    """Markdown table: cold build and cached re-run per model, each in a fresh build folder."""
    rows = []
    for model in models:
        folder = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
        try:
            args = ["--model", model, "--build-dir", str(folder), *build_args]
            cold = _timed_build(args)
            cached = _timed_build(args)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append(f"| {model} | {cold[0]:.1f} s | {cold[1]:.2f} GiB | {cached[0]:.2f} s | {cached[1]:.2f} GiB |")
        print(rows[-1], file=sys.stderr)
    header = [
        f"Machine: {_cpu()}. Build options: `{' '.join(build_args)}`.",
        "",
        "| model | cold build | cold peak RSS | cached re-run | re-run peak RSS |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    return "\n".join(header + rows)
