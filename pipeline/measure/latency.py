"""Latency of a build's artifacts, side by side in one run.

`latency_table` measures torch FP32, ONNX Runtime FP32 and INT8 (Q/DQ), OpenVINO FP32 (pinned
f32), FP16 (OpenVINO's default precision, recorded) and INT8, plus OpenVINO's own `benchmark_app` on
the INT8 IR as a reference for our loop, and renders a markdown table (p50 (median) / p90 / p99 /
mean latency, images per second) with ratios to torch FP32. `latency_for_build` finds those
artifacts in a build folder. Each runner is timed by `targets.timing.measure_latency`.

Fairness rules:
- every back end gets the same number of threads: OpenVINO's own choice under the LATENCY hint
  (`INFERENCE_NUM_THREADS` read back from a compiled IR), or `LatencySettings.threads`; torch gets it
  through `torch.set_num_threads` (restored afterwards), ONNX Runtime as `intra_op_num_threads`,
  benchmark_app through a `-load_config` file (see `pipeline.measure.benchmark_app`);
- our OpenVINO loop is lean, as benchmark_app's sync loop (`targets.openvino.OpenVinoRunner` with
  `static_batch`, timed through `bind`): the model reshaped to a static (batch, C, H, W) input as
  benchmark_app's `-shape` does, `PERFORMANCE_HINT=LATENCY`, one infer request, the input tensor set
  once (sharing the numpy buffer), then only the inference per call.

Speed is measured here and reported, never asserted by tests: timings on a busy machine are only
indicative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.errors import PipelineError
from pipeline.measure.artifacts import (
    ARTIFACT_KEYS,
    BENCHMARK_APP_KEY,
    BUILD_LAYOUT,
    ROW_LABELS,
    TORCH_KEY,
    error_line,
    missing_note,
    ms,
    shared_input_dims,
    table_footer,
)
from pipeline.measure.benchmark_app import benchmark_app_path, not_installed_note, run_benchmark_app
from pipeline.measure.machine import cores, load_average, load_lines, load_pair, machine_summary
from targets.timing import LatencyResult, measure_latency


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
            *load_lines(self.load_average),
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
                f"| {row.label} | {row.ran_in or '—'} | {row.threads or '—'} | {r.median_ms:.2f} | {ms(r.p90_ms)} | "
                f"{ms(r.p99_ms)} | {r.mean_ms:.2f} | {r.throughput_ips:.1f} | "
                f"{'—' if speedup is None else f'{speedup:.2f}x'} |"
            )
        notes = [f"{row.label}: {row.note}" for row in self.rows if row.result is not None and row.note]
        lines += table_footer(self.benchmark_app_gap, "Our OpenVINO INT8 loop vs benchmark_app (median)", notes)
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
    load_before = load_average()
    shape = tuple(image_shape) if image_shape is not None else shared_input_dims(present)
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
            rows.append(LatencyRow(key, label, _str(path), note=missing_note(path)))
            continue
        say(label)
        rows.append(_guarded(key, label, path, lambda timer=timer, path=path: timer(path)))

    int8_row = rows[-1]
    is_int8 = int8_row.ran_in is None or int8_row.ran_in.startswith("int8")
    rows.append(_benchmark_app_row(present.get("ir_int8"), paths["ir_int8"], is_int8, shape, threads, settings, say))
    return LatencyTable(tuple(rows), threads, machine_summary(), settings, load_pair(load_before, load_average()))


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


def _measure_torch(factory: Callable[[], Any], threads: int, measure) -> LatencyRow:
    import torch

    from targets.pytorch import TorchRunner

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
    from targets.onnxruntime import OnnxRuntimeRunner

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
    from targets.openvino import OpenVinoRunner

    runner = OpenVinoRunner(path, precision, threads, static_batch=settings.batch if settings.static_shape else None)
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
        return LatencyRow(key, label, _str(path), note=f"failed: {error_line(error)}")
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
        return LatencyRow(key, label, _str(requested), note=missing_note(requested))
    if benchmark_app_path() is None:
        return LatencyRow(key, label, str(ir_int8), note=not_installed_note())
    say(label)
    try:
        result = run_benchmark_app(ir_int8, shape, settings.batch, settings.seconds, settings.iterations, threads,
                                   settings.int8_precision, settings.static_shape)
    except PipelineError as error:
        return LatencyRow(key, label, str(ir_int8), note=f"failed: {error}")
    ran_in = None if result.precision is None else f"int8 + {result.precision}" if is_int8 else result.precision
    return LatencyRow(key, label, str(ir_int8), ran_in, result.threads, result.as_latency_result(settings.batch),
                      "sync API, -hint latency, -ip f32; its own clock (C++ request latency); p90/p99 not reported")


def _default_threads(xml_path: Path | None) -> int:
    try:
        from targets.openvino import default_threads

        return default_threads(xml_path)
    except ImportError:  # no OpenVINO: every core
        return cores()


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
