"""Inference speed of a build's artifacts, side by side in one run: latency, throughput, frame path.

`measure_latency` times one runner: warm-up calls, then timed calls (a fixed count, or for a number
of seconds), and returns p50 (median) / p90 / p99 / mean latency and images per second (batch x 1000
/ mean). `latency_table` measures torch FP32, ONNX Runtime FP32 and INT8 (Q/DQ), OpenVINO FP32 (pinned
f32), FP16 (OpenVINO's default precision, recorded) and INT8, plus OpenVINO's own `benchmark_app` on
the INT8 IR as a reference for our loop, and renders a markdown table with ratios to torch FP32.
`latency_for_build` finds those artifacts in a build folder.

`throughput_for_build` measures images per second of the same artifacts at their best setting:
OpenVINO under the THROUGHPUT hint, its optimal number of requests kept in flight by an
`AsyncInferQueue`, batch 1 and batch 8; ONNX Runtime (one request at a time) at batch 1, 4 and 8;
and `benchmark_app -hint throughput` on the INT8 IR at our best INT8 batch.

`measure_frame_path` times a camera application's path through the runtime's `Classifier`: JPEG
decode, preprocessing (resize + center crop), inference, top-k, and the whole `classify` call.

Fairness rules:
- every back end gets the same number of threads: OpenVINO's own choice under the LATENCY hint
  (`INFERENCE_NUM_THREADS` read back from a compiled IR), or `LatencySettings.threads`; torch gets it
  through `torch.set_num_threads` (restored afterwards), ONNX Runtime as `intra_op_num_threads`,
  benchmark_app through a `-load_config` file (its UI refuses `-nthreads` together with `-hint`);
- our OpenVINO loop is lean, as benchmark_app's sync loop: the model reshaped to a static
  (batch, C, H, W) input as benchmark_app's `-shape` does, `PERFORMANCE_HINT=LATENCY`, one infer
  request, the input tensor set once (sharing the numpy buffer), then `infer()` with no arguments;
- benchmark_app runs with `-ip f32` (by default it feeds u8 images through an added conversion), so
  both loops run the same compiled graph.

Speed is measured here and reported, never asserted by tests: timings on a busy machine are only
indicative.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline.errors import PipelineError

ARTIFACT_KEYS = ("onnx_fp32", "onnx_int8", "ir_fp32", "ir_fp16", "ir_int8")
# Where a build keeps each artifact, relative to its root (`<build_dir>/<model>/<target>`).
BUILD_LAYOUT = {
    "onnx_fp32": "simplify/model.onnx",
    "onnx_int8": "quantize/model.onnx",
    "ir_fp32": "openvino_fp32/model.xml",
    "ir_fp16": "openvino_fp16/model.xml",
    "ir_int8": "openvino_int8/model.xml",
}
TORCH_KEY = "torch_fp32"
BENCHMARK_APP_KEY = "benchmark_app_int8"
ROW_LABELS = {
    TORCH_KEY: "torch FP32 (eager)",
    "onnx_fp32": "ONNX Runtime FP32",
    "onnx_int8": "ONNX Runtime INT8 (Q/DQ)",
    "ir_fp32": "OpenVINO FP32 IR",
    "ir_fp16": "OpenVINO FP16 IR",
    "ir_int8": "OpenVINO INT8 IR",
    BENCHMARK_APP_KEY: "OpenVINO benchmark_app, INT8 IR",
}
OPENVINO_PRECISION_NAMES = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16", "f16": "f16", "float16": "f16"}


# ---------------------------------------------------------------------------------------------------
# One runner.


@dataclass(frozen=True)
class LatencyResult:
    name: str
    median_ms: float
    p90_ms: float | None  # None where the tool does not report it (benchmark_app)
    p99_ms: float | None
    mean_ms: float
    throughput_ips: float  # images per second: batch x 1000 / mean latency (sequential calls)
    batch: int
    iterations: int

    @classmethod
    def from_times(cls, name: str, times_ms: Sequence[float], batch: int) -> "LatencyResult":
        median, p90, p99 = percentiles(times_ms, (50, 90, 99))
        mean = float(np.mean(np.asarray(times_ms, dtype=np.float64)))
        return cls(name, median, p90, p99, mean, batch * 1000.0 / mean, batch, len(times_ms))

    @property
    def p50_ms(self) -> float:
        """The 50th percentile: the median, under the name the p90/p99 columns use."""
        return self.median_ms

    def as_dict(self) -> dict:
        return {**self.__dict__, "p50_ms": self.p50_ms}


def percentiles(times_ms: Sequence[float], quantiles: Sequence[float] = (50, 90, 99)) -> tuple[float, ...]:
    """Percentiles of timings, linearly interpolated between the closest ranks (numpy's default):
    with n sorted times t[0..n-1], percentile q lies at rank q/100 x (n - 1)."""
    times = np.asarray(times_ms, dtype=np.float64)
    if times.size == 0:
        raise ValueError("no timed iterations")
    if any(not 0 <= q <= 100 for q in quantiles):
        raise ValueError(f"percentiles must lie in 0..100, got {tuple(quantiles)}")
    return tuple(float(v) for v in np.percentile(times, list(quantiles)))


def measure_latency(
    target: Any,
    input_shape: Sequence[int],
    warmup: int = 5,
    iterations: int | None = None,
    seconds: float = 10.0,
    min_iterations: int = 10,
    name: str | None = None,
    seed: int = 0,
) -> LatencyResult:
    """Time `target` on one fixed random input of `input_shape` (N, C, H, W), N being the batch.

    `target` is a runner (`pipeline.runners.Runner`) or a zero-argument factory that returns one.
    A runner with a `bind(x) -> step` method (the lean OpenVINO loop) is timed through `step()`;
    any other through `run({input_name: x})`. `iterations` given: exactly that many timed calls;
    otherwise calls until `seconds` have passed and at least `min_iterations` were made.
    """
    if warmup < 0:
        raise ValueError(f"warmup must not be negative, got {warmup}")
    if iterations is not None and iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, C, H, W), got {tuple(input_shape)}")
    # A runner object has `run`; a factory (a function, or a runner class) is called once.
    runner = target if hasattr(target, "run") and not isinstance(target, type) else target()
    x = np.random.default_rng(seed).standard_normal(tuple(input_shape)).astype(np.float32)
    if hasattr(runner, "bind"):
        step = runner.bind(x)
    else:
        feed = {runner.input_name: x}
        run = runner.run

        def step():
            return run(feed)

    for _ in range(warmup):
        step()
    times: list[float] = []
    clock = time.perf_counter
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise, not the model's latency
    try:
        started = clock()
        while True:
            t0 = clock()
            step()
            t1 = clock()
            times.append((t1 - t0) * 1000.0)
            if iterations is not None:
                if len(times) >= iterations:
                    break
            elif len(times) >= min_iterations and t1 - started >= seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return LatencyResult.from_times(name or getattr(runner, "name", "runner"), times, int(input_shape[0]))


# ---------------------------------------------------------------------------------------------------
# The lean OpenVINO loop.


class OpenVinoLatencyRunner:
    """An IR compiled for latency as benchmark_app compiles it, timed without per-call overhead.

    `inference_precision=None` keeps OpenVINO's choice (bf16 on CPUs that have it) and records it in
    `execution_precision`; a precision asked for and not honoured is refused, as in
    `targets.openvino.OpenVinoRunner`.
    """

    def __init__(
        self,
        xml_path: str | Path,
        inference_precision: str | None = None,
        threads: int | None = None,
        batch: int = 1,
        static_shape: bool = True,
    ):
        import openvino as ov

        from targets.openvino import DEVICE, INFERENCE_PRECISIONS

        if inference_precision is not None and inference_precision not in INFERENCE_PRECISIONS:
            raise PipelineError(f"inference precision must be one of {INFERENCE_PRECISIONS}, got {inference_precision!r}")
        xml_path = Path(xml_path)
        for path in (xml_path, xml_path.with_suffix(".bin")):
            if not path.is_file():
                raise PipelineError(f"OpenVINO IR file not found: {path}")
        core = ov.Core()
        model = core.read_model(str(xml_path))
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise PipelineError(f"{xml_path} must have one input and one output")
        self.fake_quantize = sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize")
        if static_shape:
            model.reshape({model.inputs[0]: static_input_shape(model.inputs[0].get_partial_shape(), batch)})
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if inference_precision is not None:
            config["INFERENCE_PRECISION_HINT"] = inference_precision
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, DEVICE, config)
        self.input_name = self.compiled.inputs[0].get_any_name()
        self.output_name = self.compiled.outputs[0].get_any_name()
        self.execution_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if inference_precision is not None and self.execution_precision != inference_precision:
            raise PipelineError(
                f"this CPU cannot run {xml_path.name} in {inference_precision}: OpenVINO would run it in "
                f"{self.execution_precision}"
            )
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self.pinned = inference_precision is not None
        self.name = f"openvino {self.execution_precision}"
        self._request = self.compiled.create_infer_request()
        self._bound: np.ndarray | None = None

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        """Set `x` as the request's input once (shared, no copy); the returned step only infers."""
        import openvino as ov

        self._bound = np.ascontiguousarray(x, dtype=np.float32)  # keep the shared buffer alive
        self._request.set_input_tensor(ov.Tensor(self._bound, shared_memory=True))
        request = self._request

        def step():
            request.start_async()  # C++ infer, no Python-side output dictionary
            request.wait()

        return step

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self._request.infer({self.input_name: inputs[self.input_name]}, share_inputs=True)
        return {self.output_name: result[self.output_name]}


def static_input_shape(partial_shape, batch: int) -> list[int]:
    """(batch, C, H, W) from an IR input's partial shape whose only dynamic dimension is the batch."""
    dims = list(partial_shape)
    rest = [d.get_length() if d.is_static else None for d in dims[1:]]
    if None in rest:
        raise PipelineError(f"input shape {partial_shape} has dynamic dimensions besides the batch")
    return [batch, *rest]


def openvino_default_threads(xml_path: str | Path | None = None) -> int:
    """INFERENCE_NUM_THREADS that OpenVINO chooses under the LATENCY hint (for `xml_path`, or a probe)."""
    import openvino as ov

    core = ov.Core()
    if xml_path is not None:
        model = core.read_model(str(xml_path))
    else:
        import openvino.opset13 as ops

        parameter = ops.parameter([1, 8, 8, 8], np.float32, name="input")
        model = ov.Model([ops.relu(parameter)], [parameter], "probe")
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    return int(compiled.get_property("INFERENCE_NUM_THREADS"))


# ---------------------------------------------------------------------------------------------------
# benchmark_app.


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


# ---------------------------------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class LatencySettings:
    batch: int = 1
    warmup: int = 5
    seconds: float = 10.0  # per artifact, unless `iterations` is given
    iterations: int | None = None  # a fixed number of timed calls per artifact
    min_iterations: int = 10
    threads: int | None = None  # None: OpenVINO's choice under the LATENCY hint, for every back end
    int8_precision: str | None = None  # OpenVINO's precision for the INT8 IR's float layers; None: its default
    static_shape: bool = True  # reshape IRs to a static input, as benchmark_app's -shape does
    benchmark_app: bool = True


@dataclass(frozen=True)
class LatencyRow:
    key: str
    label: str
    artifact: str | None
    ran_in: str | None = None  # the precision that really ran
    threads: int | None = None
    result: LatencyResult | None = None
    note: str = ""  # why a row was not measured, or what to know about it

    @property
    def measured(self) -> bool:
        return self.result is not None


@dataclass(frozen=True)
class LatencyTable:
    rows: tuple[LatencyRow, ...]
    threads: int
    machine: str
    settings: LatencySettings = field(default_factory=LatencySettings)
    load_average: tuple[float, float] | None = None  # 1-minute load average before and after measuring

    def row(self, key: str) -> LatencyRow:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(key)

    def speedup(self, key: str) -> float | None:
        """torch FP32 median / this row's median (how many times faster than torch)."""
        base, row = self.row(TORCH_KEY).result, self.row(key).result
        if base is None or row is None:
            return None
        return base.median_ms / row.median_ms

    @property
    def benchmark_app_gap(self) -> float | None:
        """(our OpenVINO INT8 median - benchmark_app's median) / benchmark_app's median."""
        ours, reference = self.row("ir_int8").result, self.row(BENCHMARK_APP_KEY).result
        if ours is None or reference is None:
            return None
        return ours.median_ms / reference.median_ms - 1.0

    @property
    def markdown(self) -> str:
        s = self.settings
        how = f"{s.iterations} timed runs" if s.iterations is not None else f"{s.seconds:g} s"
        lines = [
            f"Machine: {self.machine}. Batch {s.batch}, {self.threads} threads for every back end, "
            f"{s.warmup} warm-up runs, then {how} per artifact.",
            *_load_lines(self.load_average),
            "",
            "| back end | ran in | threads | p50 (median) ms | p90 ms | p99 ms | mean ms | images/s | speed-up vs torch FP32 |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in self.rows:
            r = row.result
            if r is None:
                lines.append(f"| {row.label} | — | | | | | | | {row.note} |")
                continue
            speedup = self.speedup(row.key)
            lines.append(
                f"| {row.label} | {row.ran_in or '—'} | {row.threads or '—'} | {r.median_ms:.2f} | {_ms(r.p90_ms)} | "
                f"{_ms(r.p99_ms)} | {r.mean_ms:.2f} | {r.throughput_ips:.1f} | "
                f"{'—' if speedup is None else f'{speedup:.2f}x'} |"
            )
        gap = self.benchmark_app_gap
        if gap is not None:
            lines += ["", f"Our OpenVINO INT8 loop vs benchmark_app (median): {gap:+.1%}."]
        notes = [f"{row.label}: {row.note}" for row in self.rows if row.result is not None and row.note]
        if notes:
            lines += ["", *(f"- {note}" for note in notes)]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "machine": self.machine,
            "load_average": self.load_average,
            "threads": self.threads,
            "settings": dict(self.settings.__dict__),
            "benchmark_app_gap": self.benchmark_app_gap,
            "rows": [
                {"key": r.key, "label": r.label, "artifact": r.artifact, "ran_in": r.ran_in, "threads": r.threads,
                 "note": r.note, "result": r.result.as_dict() if r.result else None, "speedup_vs_torch": self.speedup(r.key)}
                for r in self.rows
            ],
        }


def latency_table(
    artifacts: Mapping[str, str | Path | None],
    torch_module_factory: Callable[[], Any] | None = None,
    settings: LatencySettings = LatencySettings(),
    image_shape: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Measure every artifact (keys of `ARTIFACT_KEYS`, file paths) and torch FP32, one after the other.

    `torch_module_factory()` returns the FP32 torch module (built only when its turn comes, freed
    after). A missing file or factory gives a row that says so; an artifact that fails to load gives
    a row with the error. `image_shape` (C, H, W) defaults to the artifacts' own input shape.
    """
    unknown = set(artifacts) - set(ARTIFACT_KEYS)
    if unknown:
        raise ValueError(f"unknown artifact keys {sorted(unknown)}: use {ARTIFACT_KEYS}")
    paths = {key: Path(artifacts[key]) if artifacts.get(key) else None for key in ARTIFACT_KEYS}
    present = {key: path for key, path in paths.items() if path is not None and path.is_file()}
    say = progress or (lambda message: None)
    load_before = _load_average()
    shape = tuple(image_shape) if image_shape is not None else _image_shape(present)
    if shape is None:
        raise PipelineError("no artifact found to read the input shape from: give image_shape=(C, H, W)")
    input_shape = (settings.batch, *shape)

    threads = settings.threads
    if threads is None:
        irs = [present[k] for k in ("ir_int8", "ir_fp32", "ir_fp16") if k in present]
        threads = _default_threads(irs[0] if irs else None)

    def measure(runner) -> LatencyResult:
        return measure_latency(runner, input_shape, warmup=settings.warmup, iterations=settings.iterations,
                               seconds=settings.seconds, min_iterations=settings.min_iterations)

    rows: list[LatencyRow] = []

    # torch FP32, on the same number of threads.
    label = ROW_LABELS[TORCH_KEY]
    if torch_module_factory is None:
        rows.append(LatencyRow(TORCH_KEY, label, None, note="skipped: no torch module given"))
    else:
        say(label)
        rows.append(_guarded(TORCH_KEY, label, None, lambda: _measure_torch(torch_module_factory, threads, measure)))

    # Every file artifact, in table order: how to time it once it exists.
    timers = {
        "onnx_fp32": lambda path: _measure_onnx("onnx_fp32", path, threads, "fp32", measure),
        "onnx_int8": lambda path: _measure_onnx("onnx_int8", path, threads, "int8 Q/DQ + fp32", measure),
        "ir_fp32": lambda path: _measure_openvino("ir_fp32", path, "f32", threads, settings, measure),
        "ir_fp16": lambda path: _measure_openvino("ir_fp16", path, None, threads, settings, measure),
        "ir_int8": lambda path: _measure_openvino("ir_int8", path, settings.int8_precision, threads, settings, measure),
    }
    for key, timer in timers.items():
        label, path = ROW_LABELS[key], paths[key]
        if key not in present:
            rows.append(LatencyRow(key, label, _str(path), note=_missing_note(key, path)))
            continue
        say(label)
        rows.append(_guarded(key, label, path, lambda timer=timer, path=path: timer(path)))

    int8_row = rows[-1]
    is_int8 = int8_row.ran_in is None or int8_row.ran_in.startswith("int8")
    rows.append(_benchmark_app_row(present.get("ir_int8"), paths["ir_int8"], is_int8, shape, threads, settings, say))
    load_after = _load_average()
    load = None if load_before is None or load_after is None else (load_before, load_after)
    return LatencyTable(tuple(rows), threads, _machine(), settings, load)


def latency_for_build(
    build_root: str | Path,
    torch_module_factory: Callable[[], Any] | None = None,
    settings: LatencySettings = LatencySettings(),
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """`latency_table` on the artifacts of a build folder (`<build_dir>/<model>/<target>`, BUILD_LAYOUT)."""
    build_root = Path(build_root)
    if not build_root.is_dir():
        raise PipelineError(f"build folder not found: {build_root}")
    artifacts = {key: build_root / relative for key, relative in BUILD_LAYOUT.items()}
    return latency_table(artifacts, torch_module_factory, settings, progress=progress)


# ---------------------------------------------------------------------------------------------------
# Throughput: images per second at each back end's best setting.


@dataclass(frozen=True)
class ThroughputSettings:
    seconds: float = 10.0  # per setting tried
    warmup: int = 3  # untimed requests per request slot before timing
    openvino_batches: tuple[int, ...] = (1, 8)  # THROUGHPUT hint, OpenVINO's streams, each batch size
    onnx_batches: tuple[int, ...] = (1, 4, 8)  # ONNX Runtime runs one request at a time: batching is its lever
    threads: int | None = None  # None: every core (OpenVINO's own split into streams)
    int8_precision: str | None = None  # as LatencySettings.int8_precision
    benchmark_app: bool = True


@dataclass(frozen=True)
class ThroughputResult:
    name: str
    batch: int
    requests: int  # infer requests kept in flight (OpenVINO: OPTIMAL_NUMBER_OF_INFER_REQUESTS; ONNX Runtime: 1)
    streams: int | None  # OpenVINO's NUM_STREAMS; None where the back end has no such notion
    images: int  # images inferred in the timed window
    seconds: float
    images_per_second: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def measure_openvino_throughput(
    xml_path: str | Path,
    batch: int = 1,
    inference_precision: str | None = None,
    threads: int | None = None,
    seconds: float = 10.0,
    warmup: int = 3,
    seed: int = 0,
) -> tuple[ThroughputResult, str, int]:
    """An IR under the THROUGHPUT hint, reshaped to a static batch, kept busy through `AsyncInferQueue`
    with OpenVINO's optimal number of requests; every request's input is set once (shared buffer).

    Returns (result, the precision that ran, the threads OpenVINO used)."""
    import openvino as ov

    from targets.openvino import DEVICE

    xml_path = Path(xml_path)
    for path in (xml_path, xml_path.with_suffix(".bin")):
        if not path.is_file():
            raise PipelineError(f"OpenVINO IR file not found: {path}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    core = ov.Core()
    model = core.read_model(str(xml_path))
    shape = static_input_shape(model.inputs[0].get_partial_shape(), batch)
    model.reshape({model.inputs[0]: shape})
    config: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT"}
    if inference_precision is not None:
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, DEVICE, config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if inference_precision is not None and precision != inference_precision:
        raise PipelineError(f"this CPU cannot run {xml_path.name} in {inference_precision}: OpenVINO would run it in {precision}")
    requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    streams = int(compiled.get_property("NUM_STREAMS"))
    queue = ov.AsyncInferQueue(compiled, requests)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for index in range(len(queue)):
        queue[index].set_input_tensor(ov.Tensor(x, shared_memory=True))
    for _ in range(warmup * requests):
        queue.start_async()
    queue.wait_all()
    started, count = time.perf_counter(), 0
    while count < requests or time.perf_counter() - started < seconds:
        queue.start_async()  # blocks until a request is free: the queue stays full
        count += 1
    queue.wait_all()
    elapsed = time.perf_counter() - started
    result = ThroughputResult(f"openvino {precision}", batch, requests, streams, count * batch, elapsed,
                              count * batch / elapsed)
    return result, precision, int(compiled.get_property("INFERENCE_NUM_THREADS"))


def measure_onnx_throughput(path: str | Path, batch: int = 1, threads: int | None = None, seconds: float = 10.0,
                            warmup: int = 3) -> ThroughputResult:
    """ONNX Runtime at one batch size: one request at a time, all threads on it (its only lever is the batch)."""
    from pipeline.runners import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(path, threads=threads)
    shape = _input_dims(Path(path))
    if shape is None:
        raise PipelineError(f"{path}: the input's channel and image dimensions must be fixed")
    timed = measure_latency(runner, (batch, *shape), warmup=warmup, seconds=seconds, min_iterations=3)
    total_s = timed.mean_ms * timed.iterations / 1000.0
    return ThroughputResult("onnxruntime", batch, 1, None, timed.iterations * batch, total_s,
                            timed.iterations * batch / total_s)


@dataclass(frozen=True)
class ThroughputRow:
    key: str
    label: str
    artifact: str | None
    ran_in: str | None = None
    threads: int | None = None
    tried: tuple[ThroughputResult, ...] = ()  # every setting measured, in the order tried
    note: str = ""

    @property
    def best(self) -> ThroughputResult | None:
        return max(self.tried, key=lambda r: r.images_per_second) if self.tried else None

    def as_dict(self) -> dict:
        best = self.best
        return {"key": self.key, "label": self.label, "artifact": self.artifact, "ran_in": self.ran_in,
                "threads": self.threads, "note": self.note, "tried": [r.as_dict() for r in self.tried],
                "best": best.as_dict() if best else None}


@dataclass(frozen=True)
class ThroughputTable:
    rows: tuple[ThroughputRow, ...]
    machine: str
    settings: ThroughputSettings = field(default_factory=ThroughputSettings)
    load_average: tuple[float, float] | None = None

    def row(self, key: str) -> ThroughputRow:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(key)

    @property
    def benchmark_app_gap(self) -> float | None:
        """(our OpenVINO INT8 images/s at benchmark_app's batch) / benchmark_app's images/s - 1."""
        ours, reference = self.row("ir_int8"), self.row(BENCHMARK_APP_KEY).best
        if reference is None:
            return None
        same_batch = [r for r in ours.tried if r.batch == reference.batch]
        return same_batch[0].images_per_second / reference.images_per_second - 1.0 if same_batch else None

    @property
    def markdown(self) -> str:
        s = self.settings
        lines = [
            f"Machine: {self.machine}. Throughput: {s.seconds:g} s per setting; OpenVINO under the THROUGHPUT "
            f"hint with `AsyncInferQueue` (its optimal number of requests), batch {' / '.join(map(str, s.openvino_batches))}; "
            f"ONNX Runtime one request at a time, batch {' / '.join(map(str, s.onnx_batches))}. Best setting shown.",
            *_load_lines(self.load_average),
            "",
            "| back end | ran in | threads | best batch | requests in flight | streams | images/s | every setting tried (batch: images/s) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in self.rows:
            best = row.best
            if best is None:
                lines.append(f"| {row.label} | — | | | | | | {row.note} |")
                continue
            tried = ", ".join(f"{r.batch}: {r.images_per_second:.1f}" for r in row.tried)
            lines.append(f"| {row.label} | {row.ran_in or '—'} | {row.threads or '—'} | {best.batch} | {best.requests} | "
                         f"{best.streams if best.streams is not None else '—'} | {best.images_per_second:.1f} | {tried} |")
        gap = self.benchmark_app_gap
        if gap is not None:
            lines += ["", f"Our OpenVINO INT8 queue vs benchmark_app -hint throughput (same batch): {gap:+.1%}."]
        notes = [f"{row.label}: {row.note}" for row in self.rows if row.best is not None and row.note]
        if notes:
            lines += ["", *(f"- {note}" for note in notes)]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"machine": self.machine, "load_average": self.load_average, "settings": dict(self.settings.__dict__),
                "benchmark_app_gap": self.benchmark_app_gap, "rows": [row.as_dict() for row in self.rows]}


def throughput_for_build(
    build_root: str | Path,
    settings: ThroughputSettings = ThroughputSettings(),
    progress: Callable[[str], None] | None = None,
) -> ThroughputTable:
    """Images per second of every artifact of a build folder (BUILD_LAYOUT) at its best batch / streams,
    and benchmark_app `-hint throughput` on the INT8 IR at the batch our best INT8 setting used."""
    build_root = Path(build_root)
    if not build_root.is_dir():
        raise PipelineError(f"build folder not found: {build_root}")
    say = progress or (lambda message: None)
    load_before = _load_average()
    onnx_threads = settings.threads or _cores()
    precisions = {"ir_fp32": "f32", "ir_fp16": None, "ir_int8": settings.int8_precision}
    rows: list[ThroughputRow] = []
    for key, relative in BUILD_LAYOUT.items():
        label, path = ROW_LABELS[key], build_root / relative
        if not path.is_file():
            rows.append(ThroughputRow(key, label, str(path), note=_missing_note(key, path)))
            continue
        say(f"{label} (throughput)")
        if path.suffix == ".xml":
            measure = lambda path=path, key=key: _openvino_throughput_row(key, path, precisions[key], settings)
        else:
            measure = lambda path=path, key=key: _onnx_throughput_row(key, path, onnx_threads, settings)
        rows.append(_guarded_throughput(key, label, path, measure))
    rows.append(_benchmark_app_throughput_row(rows[-1], build_root / BUILD_LAYOUT["ir_int8"], settings, say))
    load_after = _load_average()
    load = None if load_before is None or load_after is None else (load_before, load_after)
    return ThroughputTable(tuple(rows), _machine(), settings, load)


def _openvino_throughput_row(key: str, path: Path, precision: str | None, settings: ThroughputSettings) -> ThroughputRow:
    tried, ran_in, threads = [], None, None
    for batch in settings.openvino_batches:
        result, ran_in, threads = measure_openvino_throughput(path, batch, precision, settings.threads,
                                                              settings.seconds, settings.warmup)
        tried.append(result)
    ran_in = f"{ran_in} " + ("(pinned)" if precision else "(OpenVINO default)")
    int8 = key == "ir_int8" and _fake_quantize_count(path) > 0
    return ThroughputRow(key, ROW_LABELS[key], str(path), f"int8 + {ran_in}" if int8 else ran_in, threads, tuple(tried))


def _onnx_throughput_row(key: str, path: Path, threads: int, settings: ThroughputSettings) -> ThroughputRow:
    tried = tuple(measure_onnx_throughput(path, batch, threads, settings.seconds, settings.warmup)
                  for batch in settings.onnx_batches)
    return ThroughputRow(key, ROW_LABELS[key], str(path), "int8 Q/DQ + fp32" if key == "onnx_int8" else "fp32",
                         threads, tried)


def _fake_quantize_count(xml_path: Path) -> int:
    import openvino as ov

    return sum(1 for op in ov.Core().read_model(str(xml_path)).get_ops() if op.get_type_name() == "FakeQuantize")


def _guarded_throughput(key: str, label: str, path: Path, measure: Callable[[], ThroughputRow]) -> ThroughputRow:
    """A failure becomes the row's note instead of ending the whole table."""
    try:
        return measure()
    except Exception as error:  # PipelineError, or a runtime's own exception type
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ThroughputRow(key, label, str(path), note=f"failed: {first}")


def _benchmark_app_throughput_row(int8_row: ThroughputRow, xml: Path, settings: ThroughputSettings, say) -> ThroughputRow:
    key, label = BENCHMARK_APP_KEY, ROW_LABELS[BENCHMARK_APP_KEY]
    if not settings.benchmark_app:
        return ThroughputRow(key, label, str(xml), note="skipped: not requested")
    if int8_row.best is None:
        return ThroughputRow(key, label, str(xml), note=f"skipped: our INT8 IR row has no result ({int8_row.note})")
    if benchmark_app_path() is None:
        return ThroughputRow(key, label, str(xml), note=f"skipped: benchmark_app is not installed in {Path(sys.executable).parent}")
    say(f"{label} (throughput)")
    batch = int8_row.best.batch
    try:
        shape = _input_dims(xml)
        result = run_benchmark_app(xml, shape, batch, settings.seconds, threads=settings.threads,
                                   inference_precision=settings.int8_precision, hint="throughput")
    except PipelineError as error:
        return ThroughputRow(key, label, str(xml), note=f"failed: {error}")
    # benchmark_app's FPS counts images (iterations x batch / duration).
    measured = ThroughputResult("benchmark_app", batch, result.requests or 0, result.streams,
                                result.iterations * batch, result.duration_ms / 1000.0, result.throughput_fps)
    ran_in = None if result.precision is None else f"int8 + {result.precision}"
    return ThroughputRow(key, label, str(xml), ran_in, result.threads, (measured,),
                         "async API, -hint throughput, -ip f32, at our best INT8 batch; its own clock")



# ---------------------------------------------------------------------------------------------------
# The camera runtime's frame path: decode + preprocess + infer, per frame.

FRAME_PARTS = ("decode", "preprocess", "infer", "top_k")
PREPROCESS_SHARE_GOAL = 0.10  # issue 6: preprocessing a 1280x720 frame costs under 10% of INT8 inference


@dataclass(frozen=True)
class FramePathResult:
    """Per-frame cost of one `pipeline.runtime.Classifier`, each part timed on its own in one loop
    (`parts`, keyed by FRAME_PARTS) and the whole path timed as applications call it (`total`:
    `cv2.imdecode` then `Classifier.classify`)."""

    precision: str
    backend: str
    frame: tuple[int, int]  # width, height of the decoded frame
    parts: dict[str, LatencyResult]
    total: LatencyResult
    normalisation: str  # where mean/std is applied: inside the compiled model, or numpy within "infer"

    @property
    def fps(self) -> float:
        return self.total.throughput_ips

    @property
    def preprocess_share(self) -> float:
        """Preprocessing time / inference time (medians)."""
        return self.parts["preprocess"].median_ms / self.parts["infer"].median_ms

    def as_dict(self) -> dict:
        return {"precision": self.precision, "backend": self.backend, "frame": list(self.frame),
                "normalisation": self.normalisation, "parts": {k: v.as_dict() for k, v in self.parts.items()},
                "total": self.total.as_dict(), "fps": self.fps, "preprocess_share": self.preprocess_share}


def measure_frame_path(classifier: Any, jpeg: bytes, seconds: float = 10.0, warmup: int = 5,
                       min_iterations: int = 10, top_k: int = 5) -> FramePathResult:
    """Time a camera application's path for one JPEG frame through `classifier` (a runtime Classifier).

    Parts, in the order `Classifier.classify` runs them: decode (`cv2.imdecode`, BGR), preprocess
    (`Classifier.crop`: frame check, OpenCV resize + center crop), infer (`Classifier.logits_of_crops`:
    normalisation in the graph or one numpy step, then the back end), top_k (softmax + top-k). Then
    `seconds` more of the real call, `classify(cv2.imdecode(jpeg))`, for the total and the frame rate.
    """
    import cv2

    buffer = np.frombuffer(jpeg, dtype=np.uint8)
    frame = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if frame is None:
        raise PipelineError("the frame-path JPEG does not decode")
    clock = time.perf_counter

    def parts_once() -> list[float]:
        t0 = clock()
        decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        t1 = clock()
        crop = classifier.crop(decoded)
        t2 = clock()
        logits = classifier.logits_of_crops(crop[None])
        t3 = clock()
        classifier.top(logits[0], top_k)
        t4 = clock()
        return [(b - a) * 1000.0 for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4))]

    def whole_once() -> float:
        t0 = clock()
        classifier.classify(cv2.imdecode(buffer, cv2.IMREAD_COLOR), top_k=top_k)
        return (clock() - t0) * 1000.0

    for _ in range(warmup):
        parts_once()
        whole_once()
    part_times = _timed_loop(parts_once, seconds, min_iterations)
    total_times = _timed_loop(whole_once, seconds, min_iterations)
    columns = list(zip(*part_times))
    parts = {name: LatencyResult.from_times(name, column, 1) for name, column in zip(FRAME_PARTS, columns)}
    backend = classifier.backend
    normalisation = ("numpy, within infer" if hasattr(backend, "normalize")
                     else "inside the compiled model" if getattr(backend, "wants_bgr", False) else "within infer")
    return FramePathResult(str(classifier.precision), str(getattr(classifier, "backend_name", backend)),
                           (int(frame.shape[1]), int(frame.shape[0])), parts,
                           LatencyResult.from_times("frame path", total_times, 1), normalisation)


def _timed_loop(step: Callable[[], Any], seconds: float, min_iterations: int) -> list:
    """Results of `step()` until `seconds` have passed and `min_iterations` were made (no GC inside)."""
    results = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter()
        while len(results) < min_iterations or time.perf_counter() - started < seconds:
            results.append(step())
    finally:
        if gc_was_enabled:
            gc.enable()
    return results


def frame_path_markdown(results: Sequence[FramePathResult], machine: str, seconds: float, source: str,
                        failures: Mapping[str, str] | None = None) -> str:
    """The frame-path table, and the preprocessing share of the INT8 inference time against the goal.

    `failures`: precision -> why it could not be measured (a row that says so)."""
    lines = [
        f"Machine: {machine}. Frame: {source}; {seconds:g} s of timed frames per part loop and per end-to-end loop "
        "(`Classifier.classify` on the decoded frame), batch 1, medians in ms.",
        "",
        "| precision | back end | decode ms | preprocess ms | infer ms | top-k ms | total ms (p50 / p90 / p99) | FPS | "
        "preprocess / infer | normalisation |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        p, t = r.parts, r.total
        lines.append(f"| {r.precision} | {r.backend} | {p['decode'].median_ms:.2f} | {p['preprocess'].median_ms:.2f} | "
                     f"{p['infer'].median_ms:.2f} | {p['top_k'].median_ms:.3f} | {t.median_ms:.2f} / {_ms(t.p90_ms)} / "
                     f"{_ms(t.p99_ms)} | {r.fps:.1f} | {r.preprocess_share:.1%} | {r.normalisation} |")
    for precision, error in (failures or {}).items():
        lines.append(f"| {precision} | — | | | | | | | | failed: {error} |")
    int8 = [r for r in results if r.precision == "int8"]
    if int8:
        share = int8[0].preprocess_share
        verdict = "met" if share < PREPROCESS_SHARE_GOAL else "NOT met"
        lines += ["", f"Preprocessing (resize + crop of the {int8[0].frame[0]}x{int8[0].frame[1]} frame) costs "
                      f"{share:.1%} of the INT8 inference time: goal (< {PREPROCESS_SHARE_GOAL:.0%}) {verdict}."]
    else:
        why = "its INT8 model failed" if "int8" in (failures or {}) else "no INT8 model in this bundle"
        lines += ["", f"The preprocessing share of the INT8 inference time is not measured: {why}."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Helpers.


def _measure_torch(factory: Callable[[], Any], threads: int, measure) -> LatencyRow:
    import torch

    from pipeline.runners import TorchRunner

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        made = factory()
        module = made if isinstance(made, torch.nn.Module) else getattr(made, "module", made)  # LoadedModel too
        runner = TorchRunner(module)
        result = measure(runner)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    return LatencyRow(TORCH_KEY, ROW_LABELS[TORCH_KEY], None, "fp32", used, result)


def _measure_onnx(key: str, path: Path, threads: int, ran_in: str, measure) -> tuple:
    from pipeline.runners import OnnxRuntimeRunner

    import onnx

    runner = OnnxRuntimeRunner(path, threads=threads)
    graph = onnx.load(str(path), load_external_data=False).graph
    quantized = any(node.op_type in ("QuantizeLinear", "QLinearConv") for node in graph.node)
    note = ""
    if not quantized:
        ran_in = "fp32"
        if key == "onnx_int8":
            note = "this ONNX has no QuantizeLinear nodes: it is not an INT8 model"
    return ran_in, threads, measure(runner), note


def _measure_openvino(key: str, path: Path, precision: str | None, threads: int, settings: LatencySettings, measure) -> tuple:
    runner = OpenVinoLatencyRunner(path, precision, threads, settings.batch, settings.static_shape)
    ran_in = runner.execution_precision + (" (pinned)" if precision else " (OpenVINO default)")
    notes = [] if settings.static_shape else ["dynamic batch kept"]
    if runner.fake_quantize:
        ran_in = f"int8 + {ran_in}"
    elif key == "ir_int8":
        notes.append("this IR has no FakeQuantize nodes: it is not an INT8 IR")
    return ran_in, runner.threads, measure(runner), "; ".join(notes)


def _guarded(key: str, label: str, path: Path | None, measure: Callable[[], Any]) -> LatencyRow:
    """Run one measurement; a failure becomes the row's note instead of ending the whole table."""
    try:
        outcome = measure()
    except PipelineError as error:
        return LatencyRow(key, label, _str(path), note=f"failed: {error}")
    except Exception as error:  # runtimes raise their own exception types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return LatencyRow(key, label, _str(path), note=f"failed: {first}")
    if isinstance(outcome, LatencyRow):
        return outcome
    ran_in, threads, result, note = outcome
    return LatencyRow(key, label, _str(path), ran_in, threads, result, note)


def _benchmark_app_row(ir_int8: Path | None, requested: Path | None, is_int8: bool, shape, threads: int,
                       settings: LatencySettings, say) -> LatencyRow:
    key, label = BENCHMARK_APP_KEY, ROW_LABELS[BENCHMARK_APP_KEY]
    if not settings.benchmark_app:
        return LatencyRow(key, label, _str(requested), note="skipped: not requested")
    if ir_int8 is None:
        return LatencyRow(key, label, _str(requested), note=_missing_note("ir_int8", requested))
    if benchmark_app_path() is None:
        return LatencyRow(key, label, str(ir_int8),
                          note=f"skipped: benchmark_app is not installed in {Path(sys.executable).parent}")
    say(label)
    try:
        result = run_benchmark_app(ir_int8, shape, settings.batch, settings.seconds, settings.iterations, threads,
                                   settings.int8_precision, settings.static_shape)
    except PipelineError as error:
        return LatencyRow(key, label, str(ir_int8), note=f"failed: {error}")
    ran_in = None if result.precision is None else f"int8 + {result.precision}" if is_int8 else result.precision
    return LatencyRow(key, label, str(ir_int8), ran_in, result.threads, result.as_latency_result(settings.batch),
                      "sync API, -hint latency, -ip f32; its own clock (C++ request latency); p90/p99 not reported")


def _image_shape(present: Mapping[str, Path]) -> tuple[int, ...] | None:
    """(C, H, W) of the first readable artifact's input (all of them come from the same network)."""
    for path in present.values():
        try:
            dims = _input_dims(path)
        except Exception:  # an unreadable artifact gets its own "failed" row later
            continue
        if dims is not None:
            return dims
    return None


def _input_dims(path: Path) -> tuple[int, ...] | None:
    if path.suffix == ".xml":
        import openvino as ov

        dims = list(ov.Core().read_model(str(path)).inputs[0].get_partial_shape())[1:]
        return tuple(d.get_length() for d in dims) if all(d.is_static for d in dims) else None
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    dims = [i for i in graph.input if i.name not in initializers][0].type.tensor_type.shape.dim[1:]
    return tuple(d.dim_value for d in dims) if all(d.HasField("dim_value") for d in dims) else None


def _default_threads(xml_path: Path | None) -> int:
    try:
        return openvino_default_threads(xml_path)
    except ImportError:
        return _cores()


def _missing_note(key: str, path: Path | None) -> str:
    if path is None:
        return "skipped: not given"
    return f"skipped: {path} not found"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = _cores()
    versions = []
    for module in ("torch", "onnxruntime", "openvino"):
        loaded = sys.modules.get(module)
        version = getattr(loaded, "__version__", None) if loaded else None
        if module == "openvino" and loaded is not None:
            version = loaded.get_version().split("-")[0]
        if version:
            versions.append(f"{module} {version}")
    return f"{cpu}, {cores} cores" + (f"; {', '.join(versions)}" if versions else "")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _load_lines(load_average: tuple[float, float] | None) -> list[str]:
    """The load average before and after measuring, and a warning when the machine was busy."""
    if load_average is None:
        return []
    before, after = load_average
    line = f"1-minute load average: {before:.2f} before, {after:.2f} after measuring."
    cores = _cores()
    if max(before, after) > cores + 0.5:  # our own run accounts for about `cores`
        line += (f" The machine was busy (more runnable threads than its {cores} cores): "
                 "multi-threaded timings are then dominated by scheduling, only indicative.")
    return [line]


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
