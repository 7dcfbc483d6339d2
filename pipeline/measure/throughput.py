"""Throughput: images per second of a build's artifacts at each back end's best setting.

`throughput_for_build` measures OpenVINO under the THROUGHPUT hint, its optimal number of requests
kept in flight by an `AsyncInferQueue`, batch 1 and batch 8; ONNX Runtime (one request at a time) at
batch 1, 4 and 8; and `benchmark_app -hint throughput` on the INT8 IR at our best INT8 batch.

Speed is measured here and reported, never asserted by tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import PipelineError
from pipeline.measure.artifacts import (BENCHMARK_APP_KEY, BUILD_LAYOUT, ROW_LABELS, error_line, input_dims, missing_note,
                                        table_footer)
from pipeline.measure.benchmark_app import benchmark_app_path, not_installed_note, run_benchmark_app
from pipeline.measure.machine import cores, load_average, load_lines, load_pair, machine_summary
from targets.timing import measure_latency


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

    from targets.openvino import compile_ir, execution_precision, read_ir

    xml_path = Path(xml_path)
    model = read_ir(xml_path)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    compiled = compile_ir(model, xml_path.name, inference_precision, threads, performance="THROUGHPUT",
                          static_batch=batch)
    precision = execution_precision(compiled)
    shape = list(compiled.inputs[0].get_shape())
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
    from targets.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(path, threads=threads)
    shape = input_dims(Path(path))
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
            *load_lines(self.load_average),
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
        notes = [f"{row.label}: {row.note}" for row in self.rows if row.best is not None and row.note]
        lines += table_footer(self.benchmark_app_gap,
                              "Our OpenVINO INT8 queue vs benchmark_app -hint throughput (same batch)", notes)
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
    load_before = load_average()
    onnx_threads = settings.threads or cores()
    precisions = {"ir_fp32": "f32", "ir_fp16": None, "ir_int8": settings.int8_precision}
    rows: list[ThroughputRow] = []
    for key, relative in BUILD_LAYOUT.items():
        label, path = ROW_LABELS[key], build_root / relative
        if not path.is_file():
            rows.append(ThroughputRow(key, label, str(path), note=missing_note(path)))
            continue
        say(f"{label} (throughput)")
        if path.suffix == ".xml":
            measure = lambda path=path, key=key: _openvino_throughput_row(key, path, precisions[key], settings)
        else:
            measure = lambda path=path, key=key: _onnx_throughput_row(key, path, onnx_threads, settings)
        rows.append(_guarded_throughput(key, label, path, measure))
    rows.append(_benchmark_app_throughput_row(rows[-1], build_root / BUILD_LAYOUT["ir_int8"], settings, say))
    return ThroughputTable(tuple(rows), machine_summary(), settings, load_pair(load_before, load_average()))


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
    from targets.openvino import read_ir

    return sum(1 for op in read_ir(xml_path).get_ops() if op.get_type_name() == "FakeQuantize")


def _guarded_throughput(key: str, label: str, path: Path, measure: Callable[[], ThroughputRow]) -> ThroughputRow:
    """A failure becomes the row's note instead of ending the whole table."""
    try:
        return measure()
    except Exception as error:  # PipelineError, or a runtime's own exception type
        return ThroughputRow(key, label, str(path), note=f"failed: {error_line(error)}")


def _benchmark_app_throughput_row(int8_row: ThroughputRow, xml: Path, settings: ThroughputSettings, say) -> ThroughputRow:
    key, label = BENCHMARK_APP_KEY, ROW_LABELS[BENCHMARK_APP_KEY]
    if not settings.benchmark_app:
        return ThroughputRow(key, label, str(xml), note="skipped: not requested")
    if int8_row.best is None:
        return ThroughputRow(key, label, str(xml), note=f"skipped: our INT8 IR row has no result ({int8_row.note})")
    if benchmark_app_path() is None:
        return ThroughputRow(key, label, str(xml), note=not_installed_note())
    say(f"{label} (throughput)")
    batch = int8_row.best.batch
    try:
        shape = input_dims(xml)
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
