"""OpenVINO's own `benchmark_app`, run on an IR as a reference for our timing loops, and its report parsed.

Fairness rules, so that both loops run the same compiled graph on the same threads:
- threads go through a `-load_config` file (its UI refuses `-nthreads` together with `-hint`);
- it runs with `-ip f32` (by default it feeds u8 images through an added conversion);
- `-shape` reshapes the IR to a static (batch, C, H, W) input, as our loop does.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.errors import PipelineError
from targets.timing import LatencyResult

OPENVINO_PRECISION_NAMES = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16", "f16": "f16", "float16": "f16"}


@dataclass(frozen=True)
class BenchmarkAppResult:
    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    throughput_fps: float  # benchmark_app's own figure: iterations / wall duration
    iterations: int
    duration_ms: float
    threads: int | None  # INFERENCE_NUM_THREADS it printed
    precision: str | None  # INFERENCE_PRECISION_HINT it printed, as "f32" / "bf16" / "f16"
    command: tuple[str, ...] = ()
    streams: int | None = None  # NUM_STREAMS it printed
    requests: int | None = None  # infer requests in flight ("N inference requests")

    def as_latency_result(self, batch: int) -> LatencyResult:
        return LatencyResult("benchmark_app", self.median_ms, None, None, self.mean_ms,
                             self.throughput_fps, batch, self.iterations)  # its FPS already counts images


_LATENCY_LINE = r"{}:\s+([0-9.]+)\s*(ms|us)\b"
_UNITS_MS = {"ms": 1.0, "us": 1e-3}


def parse_benchmark_app(text: str) -> BenchmarkAppResult:
    """The figures of benchmark_app's final report (latencies in ms whether it printed ms or us)."""

    def latency(label: str) -> float:
        match = re.search(_LATENCY_LINE.format(label), text)
        if match is None:
            raise PipelineError(f"benchmark_app output has no '{label}:' latency line")
        return float(match.group(1)) * _UNITS_MS[match.group(2)]

    def number(pattern: str, what: str) -> str:
        match = re.search(pattern, text)
        if match is None:
            raise PipelineError(f"benchmark_app output has no {what} line")
        return match.group(1)

    threads = re.search(r"INFERENCE_NUM_THREADS:\s*(\d+)", text)
    streams = re.search(r"NUM_STREAMS:\s*(\d+)", text)
    requests = re.search(r"(\d+) inference requests?\b", text)
    precision = re.search(r"INFERENCE_PRECISION_HINT:\s*<Type: '(\w+)'>", text) or re.search(
        r"INFERENCE_PRECISION_HINT:\s*(\w+)", text)
    return BenchmarkAppResult(
        median_ms=latency("Median"),
        mean_ms=latency("Average"),
        min_ms=latency("Min"),
        max_ms=latency("Max"),
        throughput_fps=float(number(r"Throughput:\s+([0-9.]+)\s*FPS", "'Throughput: ... FPS'")),
        iterations=int(number(r"Count:\s+(\d+)\s+iterations", "'Count: ... iterations'")),
        duration_ms=float(number(r"Duration:\s+([0-9.]+)\s*ms", "'Duration: ... ms'")),
        threads=int(threads.group(1)) if threads else None,
        precision=OPENVINO_PRECISION_NAMES.get(precision.group(1), precision.group(1)) if precision else None,
        streams=int(streams.group(1)) if streams else None,
        requests=int(requests.group(1)) if requests else None,
    )


def benchmark_app_path() -> Path | None:
    """The `benchmark_app` console script of the running Python's environment (same OpenVINO), if any."""
    path = Path(sys.executable).parent / "benchmark_app"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def not_installed_note() -> str:
    """The note of a benchmark_app row that could not run."""
    return f"skipped: benchmark_app is not installed in {Path(sys.executable).parent}"


def run_benchmark_app(
    xml_path: str | Path,
    image_shape: Sequence[int],
    batch: int = 1,
    seconds: float | None = 10.0,
    iterations: int | None = None,
    threads: int | None = None,
    inference_precision: str | None = None,
    static_shape: bool = True,
    timeout_s: float = 600.0,
    hint: str = "latency",
) -> BenchmarkAppResult:
    """Run benchmark_app (`-d CPU`) on an IR and parse its report: `hint="latency"` with the sync API
    (one request), or `hint="throughput"` with the async API (the streams and requests it chooses).

    `iterations` given: `-niter`, else `-t seconds`. Threads go through `-load_config` (benchmark_app
    only takes `-nthreads` with `-hint none`); a pinned precision through `-infer_precision`.
    """
    if hint not in ("latency", "throughput"):
        raise ValueError(f"hint must be 'latency' or 'throughput', got {hint!r}")
    app = benchmark_app_path()
    if app is None:
        raise PipelineError(f"benchmark_app is not installed in {Path(sys.executable).parent} (it comes with openvino)")
    shape = "[" + ",".join(str(d) for d in (batch, *image_shape)) + "]"
    api = "sync" if hint == "latency" else "async"
    command = [str(app), "-m", str(xml_path), "-d", "CPU", "-hint", hint, "-api", api, "-ip", "f32",
               "-shape" if static_shape else "-data_shape", shape]
    command += ["-niter", str(iterations)] if iterations is not None else ["-t", str(max(1, math.ceil(seconds or 1)))]
    if inference_precision is not None:
        command += ["-infer_precision", inference_precision]
    with tempfile.TemporaryDirectory(prefix="benchmark-app-") as folder:
        if threads is not None:
            config = Path(folder) / "config.json"
            config.write_text(json.dumps({"CPU": {"INFERENCE_NUM_THREADS": str(threads)}}))
            command += ["-load_config", str(config)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=folder)
        except subprocess.TimeoutExpired:
            raise PipelineError(f"benchmark_app did not finish within {timeout_s:.0f} s") from None
    output = done.stdout + done.stderr
    if done.returncode != 0:
        errors = [line for line in output.splitlines() if "ERROR" in line or "Exception" in line]
        raise PipelineError(f"benchmark_app failed (exit {done.returncode}): {(errors or ['no message'])[-1].strip()}")
    result = parse_benchmark_app(output)
    return BenchmarkAppResult(**{**result.__dict__, "command": tuple(command)})
