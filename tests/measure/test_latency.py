"""Latency measurement on a small real conv net (ONNX, Q/DQ ONNX, OpenVINO IRs made here, no mocks).

Speed itself is not asserted: timings depend on the machine's load. What is checked: the figures are
sane and consistent, every requested row is in the table, missing artifacts are marked, threads are
pinned as asked, and benchmark_app's report is parsed from a real run.
"""

from __future__ import annotations

import re
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("openvino")
torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.measure import latency as latency_module  # noqa: E402
from pipeline.measure.artifacts import ARTIFACT_KEYS, BENCHMARK_APP_KEY, BUILD_LAYOUT, TORCH_KEY  # noqa: E402
from pipeline.measure.benchmark_app import benchmark_app_path, parse_benchmark_app, run_benchmark_app  # noqa: E402
from pipeline.measure.latency import LatencySettings, latency_for_build, latency_table  # noqa: E402
from pipeline.measure.throughput import (  # noqa: E402
    ThroughputSettings,
    measure_onnx_throughput,
    measure_openvino_throughput,
    throughput_for_build,
)
from targets.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from targets.openvino import OpenVinoRunner, convert_to_ir  # noqa: E402
from targets.timing import LatencyResult, measure_latency, percentiles  # noqa: E402
from tests.targets.test_runner import export_onnx, random_images, small_net  # noqa: E402

SIZE = 32
FAST = LatencySettings(warmup=2, iterations=20)
needs_benchmark_app = pytest.mark.skipif(
    benchmark_app_path() is None, reason="benchmark_app is not installed beside this Python (it comes with openvino)"
)

# Captured from a real run (benchmark_app 2026.4.1 on the small net): its report prints latencies
# in microseconds when the mean is below 1 ms.
CAPTURED_US = """\
[Step 8/11] Querying optimal runtime parameters
[ INFO ]   INFERENCE_NUM_THREADS: 2
[ INFO ]   INFERENCE_PRECISION_HINT: <Type: 'bfloat16'>
[ INFO ]   PERFORMANCE_HINT: LATENCY
[Step 11/11] Dumping statistics report
[ INFO ] Execution Devices:['CPU']
[ INFO ] Count:            23091 iterations
[ INFO ] Duration:         1000.02 ms
[ INFO ] Latency:
[ INFO ]    Median:        19.95 us
[ INFO ]    Average:       40.38 us
[ INFO ]    Min:           17.30 us
[ INFO ]    Max:           6606.47 us
[ INFO ] Throughput:   23090.46 FPS
"""


def quantize_qdq(onnx_path, output, images):
    """A symmetric per-channel INT8 Q/DQ ONNX from ONNX Runtime's static quantizer."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter([{"input": images[i : i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.samples, None)

    quantize_static(str(onnx_path), str(output), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return output


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """A build folder in the pipeline's layout with every artifact of the small net."""
    root = tmp_path_factory.mktemp("latency-build")
    for relative in BUILD_LAYOUT.values():
        (root / relative).parent.mkdir(parents=True)
    onnx_fp32 = export_onnx(small_net(), root / BUILD_LAYOUT["onnx_fp32"], size=SIZE)
    onnx_int8 = quantize_qdq(onnx_fp32, root / BUILD_LAYOUT["onnx_int8"], random_images(16, SIZE))
    convert_to_ir(onnx_fp32, root / BUILD_LAYOUT["ir_fp32"], "fp32")
    convert_to_ir(onnx_fp32, root / BUILD_LAYOUT["ir_fp16"], "fp16")
    convert_to_ir(onnx_int8, root / BUILD_LAYOUT["ir_int8"], "fp32")  # the INT8 IR from our Q/DQ ONNX
    return root


def check_sane(result: LatencyResult, iterations: int | None = None) -> None:
    assert 0 < result.median_ms <= result.p90_ms <= result.p99_ms
    assert result.p50_ms == result.median_ms and result.as_dict()["p50_ms"] == result.median_ms
    assert result.mean_ms > 0 and np.isfinite(result.mean_ms)
    assert result.throughput_ips == pytest.approx(result.batch * 1000.0 / result.mean_ms)
    if iterations is not None:
        assert result.iterations == iterations


def test_percentiles_of_a_known_sample():
    # 1..100 ms: percentile q lies at rank q/100 x 99, between the closest ranks.
    assert percentiles(range(1, 101)) == pytest.approx((50.5, 90.1, 99.01))
    assert percentiles([7.0]) == (7.0, 7.0, 7.0)
    assert percentiles([4, 1, 3, 2], (0, 50, 100)) == pytest.approx((1.0, 2.5, 4.0))  # order does not matter
    # one slow call in twenty: the median ignores it, p99 sees it
    times = [10.0] * 19 + [100.0]
    p50, p90, p99 = percentiles(times)
    assert (p50, p90) == (10.0, 10.0) and p99 == pytest.approx(10.0 + 0.81 * 90.0)
    result = LatencyResult.from_times("known", times, batch=2)
    assert (result.p50_ms, result.median_ms, result.p90_ms, result.p99_ms) == (p50, p50, p90, p99)
    assert result.mean_ms == pytest.approx(14.5) and result.throughput_ips == pytest.approx(2000.0 / 14.5)
    assert result.iterations == 20
    with pytest.raises(ValueError, match="no timed iterations"):
        percentiles([])
    with pytest.raises(ValueError, match="0..100"):
        percentiles([1.0], (50, 101))


def test_measure_latency_fixed_iterations(build):
    runner = OnnxRuntimeRunner(build / BUILD_LAYOUT["onnx_fp32"], threads=1)
    result = measure_latency(runner, (1, 3, SIZE, SIZE), warmup=2, iterations=50)
    check_sane(result, iterations=50)
    assert result.batch == 1 and result.name == "onnxruntime"


def test_measure_latency_for_seconds_from_a_factory(build):
    made = []

    def factory():
        made.append(1)
        return OnnxRuntimeRunner(build / BUILD_LAYOUT["onnx_fp32"], threads=1)

    started = time.perf_counter()
    result = measure_latency(factory, (4, 3, SIZE, SIZE), warmup=1, seconds=0.2, min_iterations=5, name="ort b4")
    elapsed = time.perf_counter() - started
    assert made == [1]
    check_sane(result)
    assert result.iterations >= 5 and result.batch == 4 and result.name == "ort b4"
    # It ran for the time asked. (The sum of the timed calls can be shorter than that on a busy machine:
    # a preemption between two calls is in no call's time.)
    assert elapsed >= 0.2 and result.iterations * result.mean_ms <= elapsed * 1000


def test_measure_latency_rejects_bad_arguments(build):
    runner = OnnxRuntimeRunner(build / BUILD_LAYOUT["onnx_fp32"])
    with pytest.raises(ValueError, match="N, C, H, W"):
        measure_latency(runner, (3, SIZE, SIZE))
    with pytest.raises(ValueError, match="iterations"):
        measure_latency(runner, (1, 3, SIZE, SIZE), iterations=0)


def test_lean_openvino_loop_computes_what_the_runner_computes(build):
    xml = build / BUILD_LAYOUT["ir_fp32"]
    lean = OpenVinoRunner(xml, "f32", threads=1, static_batch=1)
    assert lean.execution_precision == "f32" and lean.threads == 1 and lean.fake_quantize == 0
    assert list(lean.compiled.inputs[0].get_shape()) == [1, 3, SIZE, SIZE]  # static, as benchmark_app's -shape
    image = random_images(1, SIZE)
    step = lean.bind(image)
    step()
    lean_logits = lean._request.get_output_tensor().data.copy()
    expected = OpenVinoRunner(xml, "f32", threads=1).run({"input": image})["logits"]
    np.testing.assert_allclose(lean_logits, expected, rtol=1e-5, atol=1e-6)
    check_sane(measure_latency(lean, (1, 3, SIZE, SIZE), warmup=1, iterations=20), iterations=20)
    assert OpenVinoRunner(build / BUILD_LAYOUT["ir_int8"], static_batch=1).fake_quantize > 0


def test_latency_table_measures_every_artifact(build):
    threads_before = torch.get_num_threads()
    table = latency_for_build(build, small_net, LatencySettings(warmup=2, iterations=20, threads=1))
    assert torch.get_num_threads() == threads_before  # torch's thread count is restored
    keys = [row.key for row in table.rows]
    assert keys == [TORCH_KEY, *ARTIFACT_KEYS, BENCHMARK_APP_KEY]
    for row in table.rows[:-1]:
        assert row.measured, f"{row.label}: {row.note}"
        check_sane(row.result, iterations=20)
        assert row.threads == 1, row.label
        assert table.speedup(row.key) == pytest.approx(table.row(TORCH_KEY).result.median_ms / row.result.median_ms)
    assert table.speedup(TORCH_KEY) == pytest.approx(1.0)
    assert table.row("ir_fp32").ran_in == "f32 (pinned)"
    assert table.row("ir_fp16").ran_in.endswith("(OpenVINO default)")
    assert table.row("ir_int8").ran_in.startswith("int8 + ")
    assert table.row("onnx_int8").ran_in.startswith("int8")

    markdown = table.markdown
    assert "| p50 (median) ms | p90 ms | p99 ms | mean ms |" in markdown
    for row in table.rows:
        assert f"| {row.label} |" in markdown
    assert "1 threads for every back end" in markdown
    bench = table.row(BENCHMARK_APP_KEY)
    if benchmark_app_path() is None:
        assert not bench.measured and "not installed" in bench.note
    else:
        assert bench.measured, bench.note
        assert bench.threads == 1  # the -load_config file reached benchmark_app
        assert bench.result.iterations == 20 and bench.result.p90_ms is None
        assert table.benchmark_app_gap is not None and "vs benchmark_app" in markdown
    assert table.as_dict()["rows"][0]["key"] == TORCH_KEY


def test_missing_artifacts_are_marked(build, tmp_path):
    partial = tmp_path / "partial"
    for key in ("onnx_fp32", "ir_fp32"):
        target = partial / BUILD_LAYOUT[key]
        target.parent.mkdir(parents=True)
        shutil.copy(build / BUILD_LAYOUT[key], target)
        if target.suffix == ".xml":
            shutil.copy((build / BUILD_LAYOUT[key]).with_suffix(".bin"), target.with_suffix(".bin"))
    table = latency_for_build(partial, None, FAST)
    assert [row.key for row in table.rows] == [TORCH_KEY, *ARTIFACT_KEYS, BENCHMARK_APP_KEY]
    measured = {row.key for row in table.rows if row.measured}
    assert measured == {"onnx_fp32", "ir_fp32"}
    assert table.row(TORCH_KEY).note == "skipped: no torch module given"
    for key in ("onnx_int8", "ir_fp16", "ir_int8", BENCHMARK_APP_KEY):
        row = table.row(key)
        assert row.note.startswith("skipped:") and "not found" in row.note, (key, row.note)
        assert f"| {row.label} | — |" in table.markdown
    assert table.speedup("onnx_fp32") is None and table.benchmark_app_gap is None
    # threads default to OpenVINO's choice under the LATENCY hint, for every back end
    assert table.row("onnx_fp32").threads == table.row("ir_fp32").threads == table.threads >= 1


def test_broken_artifact_is_a_failed_row_not_a_crash(build, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    table = latency_table({"onnx_fp32": broken, "ir_fp32": build / BUILD_LAYOUT["ir_fp32"]},
                          settings=LatencySettings(warmup=1, iterations=5, benchmark_app=False))
    assert table.row("onnx_fp32").note.startswith("failed:")
    assert table.row("ir_fp32").measured
    assert table.row(BENCHMARK_APP_KEY).note == "skipped: not requested"
    with pytest.raises(ValueError, match="unknown artifact keys"):
        latency_table({"onnx": broken})


def test_float_artifact_given_as_int8_is_said(build):
    table = latency_table({"onnx_int8": build / BUILD_LAYOUT["onnx_fp32"], "ir_int8": build / BUILD_LAYOUT["ir_fp32"]},
                          settings=LatencySettings(warmup=1, iterations=5, benchmark_app=False))
    assert table.row("onnx_int8").ran_in == "fp32" and "not an INT8 model" in table.row("onnx_int8").note
    assert not table.row("ir_int8").ran_in.startswith("int8") and "not an INT8 IR" in table.row("ir_int8").note
    assert "not an INT8 IR" in table.markdown


def test_missing_benchmark_app_is_said_in_the_table(build, monkeypatch):
    monkeypatch.setattr(latency_module, "benchmark_app_path", lambda: None)
    table = latency_table({"ir_int8": build / BUILD_LAYOUT["ir_int8"]}, settings=FAST)
    assert table.row("ir_int8").measured
    row = table.row(BENCHMARK_APP_KEY)
    assert not row.measured and "benchmark_app is not installed" in row.note
    assert "benchmark_app is not installed" in table.markdown


def test_parse_captured_benchmark_app_report():
    result = parse_benchmark_app(CAPTURED_US)
    assert result.median_ms == pytest.approx(0.01995)
    assert result.mean_ms == pytest.approx(0.04038)
    assert (result.min_ms, result.max_ms) == (pytest.approx(0.0173), pytest.approx(6.60647))
    assert result.throughput_fps == pytest.approx(23090.46)
    assert (result.iterations, result.duration_ms) == (23091, pytest.approx(1000.02))
    assert (result.threads, result.precision) == (2, "bf16")
    in_ms = parse_benchmark_app(re.sub(r"([0-9.]+) us", lambda m: f"{float(m.group(1)) / 1000:.5f} ms", CAPTURED_US))
    assert in_ms.median_ms == pytest.approx(0.01995) and in_ms.max_ms == pytest.approx(6.60647)
    with pytest.raises(PipelineError, match="Median"):
        parse_benchmark_app("[ ERROR ] something else")


@needs_benchmark_app
def test_benchmark_app_real_run_is_parsed(build):
    xml = build / BUILD_LAYOUT["ir_int8"]
    result = run_benchmark_app(xml, (3, SIZE, SIZE), iterations=200, threads=1)
    assert result.iterations == 200
    assert 0 < result.min_ms <= result.median_ms <= result.max_ms
    assert result.mean_ms > 0 and result.throughput_fps > 0 and result.duration_ms > 0
    assert result.threads == 1 and result.precision in ("f32", "bf16", "f16")
    assert "-hint" in result.command and "latency" in result.command and "-ip" in result.command
    timed = run_benchmark_app(xml, (3, SIZE, SIZE), seconds=1, inference_precision="f32")
    assert timed.precision == "f32" and timed.iterations > 0 and "-infer_precision" in timed.command


@needs_benchmark_app
def test_benchmark_app_failure_is_one_line(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<net/>")
    bad.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(PipelineError, match="benchmark_app failed"):
        run_benchmark_app(bad, (3, SIZE, SIZE), iterations=1)


# ---------------------------------------------------------------------------------------------------
# Throughput.

CAPTURED_THROUGHPUT = """\
[ INFO ]   NUM_STREAMS: 2
[ INFO ]   INFERENCE_NUM_THREADS: 2
[ INFO ]   INFERENCE_PRECISION_HINT: <Type: 'bfloat16'>
[ INFO ]   PERFORMANCE_HINT: THROUGHPUT
[Step 10/11] Measuring performance (Start inference asynchronously, 2 inference requests, limits: 2000 ms duration)
[ INFO ] Count:            252 iterations
[ INFO ] Duration:         2019.50 ms
[ INFO ] Latency:
[ INFO ]    Median:        15.94 ms
[ INFO ]    Average:       16.07 ms
[ INFO ]    Min:           14.87 ms
[ INFO ]    Max:           27.76 ms
[ INFO ] Throughput:   998.27 FPS
"""


def test_parse_captured_benchmark_app_throughput_report():
    """Captured from benchmark_app -hint throughput -shape [8,3,224,224]: its FPS counts images (252 x 8 / 2.0195 s)."""
    result = parse_benchmark_app(CAPTURED_THROUGHPUT)
    assert (result.streams, result.requests, result.threads) == (2, 2, 2)
    assert result.throughput_fps == pytest.approx(252 * 8 / 2.0195, rel=1e-3)
    assert result.as_latency_result(batch=8).throughput_ips == pytest.approx(998.27)
    assert parse_benchmark_app(CAPTURED_US).streams is None  # the sync latency report has none


def test_openvino_throughput_keeps_its_optimal_requests_busy(build):
    result, precision, threads = measure_openvino_throughput(build / BUILD_LAYOUT["ir_fp32"], batch=2,
                                                             inference_precision="f32", seconds=0.2, warmup=1)
    assert precision == "f32" and threads >= 1
    assert result.batch == 2 and result.requests >= 1 and result.streams >= 1
    assert result.images >= 2 * result.requests and result.images % 2 == 0
    assert result.images_per_second == pytest.approx(result.images / result.seconds)
    assert result.seconds >= 0.2
    with pytest.raises(PipelineError, match="not found"):
        measure_openvino_throughput(build / "missing.xml")


def test_onnx_throughput_at_one_batch(build):
    result = measure_onnx_throughput(build / BUILD_LAYOUT["onnx_fp32"], batch=4, threads=1, seconds=0.2, warmup=1)
    assert result.batch == 4 and result.requests == 1 and result.streams is None
    assert result.images >= 4 * 3 and result.images % 4 == 0  # at least min_iterations runs of 4 images
    assert result.images_per_second == pytest.approx(result.images / result.seconds)


def test_throughput_table_picks_the_best_setting_tried(build):
    settings = ThroughputSettings(seconds=0.2, warmup=1, openvino_batches=(1, 2), onnx_batches=(1, 2), threads=1)
    table = throughput_for_build(build, settings)
    assert [row.key for row in table.rows] == [*ARTIFACT_KEYS, BENCHMARK_APP_KEY]
    for key in ARTIFACT_KEYS:
        row = table.row(key)
        assert row.best is not None, (key, row.note)
        assert [r.batch for r in row.tried] == [1, 2]
        assert all(r.images_per_second > 0 for r in row.tried)
        assert row.best.images_per_second == max(r.images_per_second for r in row.tried)
        assert f"| {row.label} | {row.ran_in} |" in table.markdown
    assert table.row("ir_fp32").ran_in == "f32 (pinned)" and table.row("ir_int8").ran_in.startswith("int8 + ")
    assert table.row("onnx_fp32").threads == 1 and table.row("ir_fp32").threads == 1
    bench = table.row(BENCHMARK_APP_KEY)
    if benchmark_app_path() is None:
        assert bench.best is None and "not installed" in bench.note
    else:
        assert bench.best is not None, bench.note
        assert bench.best.batch == table.row("ir_int8").best.batch  # compared at our best INT8 batch
        assert bench.best.images_per_second > 0 and bench.threads == 1
        assert table.benchmark_app_gap is not None and "benchmark_app -hint throughput" in table.markdown
    assert table.as_dict()["rows"][0]["best"]["batch"] in (1, 2)


def test_throughput_table_marks_missing_artifacts(build, tmp_path):
    partial = tmp_path / "partial"
    target = partial / BUILD_LAYOUT["onnx_fp32"]
    target.parent.mkdir(parents=True)
    shutil.copy(build / BUILD_LAYOUT["onnx_fp32"], target)
    table = throughput_for_build(partial, ThroughputSettings(seconds=0.1, warmup=1, onnx_batches=(1,), threads=1))
    assert table.row("onnx_fp32").best is not None
    for key in ("onnx_int8", "ir_fp32", "ir_fp16", "ir_int8"):
        assert table.row(key).best is None and "not found" in table.row(key).note
    assert table.row(BENCHMARK_APP_KEY).note.startswith("skipped:")
    with pytest.raises(PipelineError, match="build folder not found"):
        throughput_for_build(tmp_path / "nothing")


def test_interleaved_timing_alternates_the_runners_in_slices(build):
    """Two real runners timed in alternating slices: each gets about its share of the time in every round, so
    their calls interleave (neither runs all its calls first), and each result is a full latency figure."""
    from targets.timing import measure_interleaved

    calls: list[str] = []

    def counted(name: str):
        runner = OnnxRuntimeRunner(build / BUILD_LAYOUT["onnx_fp32"], threads=1)
        run = runner.run

        def run_and_count(feed):
            calls.append(name)
            return run(feed)

        runner.run = run_and_count
        return runner

    results = measure_interleaved({"a": lambda: counted("a"), "b": lambda: counted("b")}, (1, 3, SIZE, SIZE),
                                  seconds=0.4, rounds=4, warmup=1)
    assert list(results) == ["a", "b"]
    for name, result in results.items():
        check_sane(result)
        assert result.name == name and result.iterations == calls.count(name) - 1  # the warm-up call is not timed
    runs = [name for index, name in enumerate(calls) if index == 0 or calls[index - 1] != name]
    assert len(runs) >= 4, "the two runners did not alternate"  # a, b, b, a, ... in slices: 4 rounds, >= 4 runs
    with pytest.raises(ValueError, match="rounds"):
        measure_interleaved({"a": lambda: counted("a")}, (1, 3, SIZE, SIZE), rounds=0)
