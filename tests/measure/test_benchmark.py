"""`python -m pipeline benchmark --throughput / --frame-path / --latency` on a real EfficientNet-Lite0 INT8 build.

Everything runs for real (ONNX Runtime, OpenVINO, the camera runtime, a JPEG made from an ImageNet val
image). No speed is asserted: only that the rows are complete and sane, that the setting reported as
best is among those tried, and that benchmark.json holds every section.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

from pipeline.cli import main  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.measure import benchmark  # noqa: E402
from pipeline.measure.frame_path import FRAME_PARTS, PREPROCESS_SHARE_GOAL, frame_jpeg, measure_frame_path  # noqa: E402
from pipeline.measure.nncf import compare_nncf  # noqa: E402
from pipeline.measure.throughput import ThroughputSettings  # noqa: E402

# End-to-end runs over their own Lite0 builds: the full suite, not the fast tier.
pytestmark = pytest.mark.slow

MODEL = "efficientnet_lite0"
SECONDS = 0.5
# Small counts; budgets relaxed because 32 images judge INT8 coarsely (speed and rows are the point here).
SMALL_BUILD = """\
data:
  calibration_images: 32
  evaluation_images: 8
quantization:
  evaluation_images: 32
  sensitivity_images: 4
bundle:
  golden_images: 8
  include_wheel: false
drift:
  quantize: {max_top1_drop: 100.0}
  openvino_int8: {max_top1_drop: 100.0}
"""


@pytest.fixture(scope="module")
def lite0(tmp_path_factory, imagenet):
    """A finished INT8 CPU build of Lite0 with its bundle, and the config `benchmark` reads it with."""
    folder = tmp_path_factory.mktemp("benchmark")
    config_file = folder / "small.yaml"
    config_file.write_text(SMALL_BUILD)
    build_dir = folder / "build"
    assert main(["build", "--model", MODEL, "--imagenet", str(imagenet), "--build-dir", str(build_dir),
                 "--config", str(config_file), "--no-report"]) == 0
    config = load_config(config_file, {"build_dir": str(build_dir), "data": {"imagenet": str(imagenet)}})
    return config, build_dir / MODEL / "cpu"


def _sections(root: Path) -> dict:
    return json.loads((root / benchmark.BENCHMARK_FILE).read_text())


def test_throughput_rows_are_sane_and_best_is_among_those_tried(lite0):
    config, root = lite0
    markdown = benchmark.benchmark_throughput(config, [MODEL], SECONDS)
    assert markdown.startswith(f"### {MODEL}") and "best batch" in markdown
    section = _sections(root)["throughput"]
    assert section["seconds"] == SECONDS and section["markdown"] in markdown
    rows = {row["key"]: row for row in section["rows"]}
    tried = {"onnx_fp32": ThroughputSettings.onnx_batches, "onnx_int8": ThroughputSettings.onnx_batches,
             "ir_fp32": ThroughputSettings.openvino_batches, "ir_fp16": ThroughputSettings.openvino_batches,
             "ir_int8": ThroughputSettings.openvino_batches}
    for key, batches in tried.items():
        row = rows[key]
        assert row["images_per_second"] is not None, (key, row["note"])
        by_batch = row["images_per_second_by_batch"]
        assert sorted(map(int, by_batch)) == sorted(batches)
        assert all(value > 0 for value in by_batch.values())
        assert row["best_batch"] in batches and row["images_per_second"] == max(by_batch.values())
        assert row["requests_in_flight"] >= 1
        assert row["back_end"] in markdown
    assert rows["ir_int8"]["ran_in"].startswith("int8 + ") and rows["onnx_int8"]["ran_in"].startswith("int8")
    assert rows["ir_fp32"]["ran_in"] == "f32 (pinned)"
    assert rows["ir_int8"]["streams"] >= 1 and rows["onnx_fp32"]["streams"] is None
    app = rows["benchmark_app_int8"]
    if app["images_per_second"] is None:
        assert app["note"].startswith("skipped:") or app["note"].startswith("failed:")
    else:
        assert app["best_batch"] == rows["ir_int8"]["best_batch"] and app["images_per_second"] > 0


def test_frame_path_parts_through_the_runtime(lite0):
    config, root = lite0
    markdown = benchmark.benchmark_frame_path(config, [MODEL], SECONDS)
    section = _sections(root)["frame_path"]
    assert "1280x720 JPEG" in section["frame"] and "val/ILSVRC2012_val_" in section["frame"]
    (row,) = section["rows"]  # the CPU bundle carries its deployed INT8 IR
    assert row["precision"] == "int8" and row["back_end"].startswith("openvino")
    assert row["frame"] == "1280x720" and row["normalisation"] == "inside the compiled model"
    for part in ("decode_ms", "preprocess_ms", "infer_ms", "top_k_ms", "total_p50_ms", "total_mean_ms"):
        assert 0 < row[part] < 10_000, part
    assert row["total_p50_ms"] <= row["total_p90_ms"] <= row["total_p99_ms"]
    assert row["fps"] == pytest.approx(1000.0 / row["total_mean_ms"])
    assert row["preprocess_share_of_infer"] == pytest.approx(row["preprocess_ms"] / row["infer_ms"])
    assert section["preprocess_share_of_int8_infer"] == row["preprocess_share_of_infer"]
    assert section["goal"] == PREPROCESS_SHARE_GOAL
    assert section["goal_met"] == (row["preprocess_share_of_infer"] < PREPROCESS_SHARE_GOAL)
    assert "of the INT8 inference time: goal (< 10%)" in markdown


def test_frame_path_classifies_the_frame_it_times(lite0, imagenet):
    """The JPEG is a real val image, and the parts timed are the ones `classify` runs: same top-1."""
    from pipeline.runtime import Classifier

    _, root = lite0
    jpeg, source = frame_jpeg(imagenet)
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert frame.shape == (720, 1280, 3)
    first = source.split("val/")[1]
    label = next(int(line.split()[1]) for line in (imagenet / "val" / "val.txt").read_text().splitlines()
                 if line.split()[0] == first)
    with Classifier.open(root / "bundle") as classifier:
        result = measure_frame_path(classifier, jpeg, seconds=0.1, warmup=1, min_iterations=3)
        via_parts = classifier.top(classifier.logits_of_crops(classifier.crop(frame)[None])[0], 5)
        assert [p.index for p in via_parts] == [p.index for p in classifier.classify(frame)]
    assert tuple(result.parts) == FRAME_PARTS and result.frame == (1280, 720)
    assert all(r.iterations >= 3 for r in result.parts.values()) and result.total.iterations >= 3
    assert label in [p.index for p in via_parts]  # a genuine model on a real image: the label is in its top-5


def test_latency_section_has_percentiles_and_sections_merge(lite0):
    config, root = lite0
    before = _sections(root) if (root / benchmark.BENCHMARK_FILE).exists() else {}
    markdown = benchmark.benchmark_latency(config, [MODEL], 0.2)
    assert "p50 (median) ms | p90 ms | p99 ms" in markdown
    document = _sections(root)
    assert document["format"] == benchmark.BENCHMARK_FORMAT
    assert (document["model"], document["target"]) == (MODEL, "cpu")
    assert document["machine"]["cores"] >= 1 and document["machine"]["cpu"]
    for name in before:  # sections written by the other tests are kept
        if name in benchmark.SECTIONS and name != "latency":
            assert document[name] == before[name]
    rows = {row["key"]: row for row in document["latency"]["rows"]}
    for key in ("torch_fp32", "onnx_fp32", "onnx_int8", "ir_fp32", "ir_fp16", "ir_int8"):
        row = rows[key]
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], (key, row["note"])
        assert row["images_per_second"] > 0
    assert document["latency"]["time"] == document["updated"]


def test_benchmark_json_is_written_atomically_and_replaces_a_broken_file(lite0, tmp_path):
    _, root = lite0
    copy = tmp_path / "build" / MODEL / "cpu"
    copy.mkdir(parents=True)
    shutil.copy(root / "manifest.json", copy / "manifest.json")
    (copy / benchmark.BENCHMARK_FILE).write_text("{ half a file")
    path = benchmark.write_benchmark_section(copy, "nncf", {"rows": [{"a": 1}]})
    document = json.loads(path.read_text())
    assert document["nncf"]["rows"] == [{"a": 1}] and document["model"] == MODEL
    benchmark.write_benchmark_section(copy, "throughput", {"rows": []})
    document = json.loads(path.read_text())
    assert set(document) >= {"nncf", "throughput", "machine", "updated", "format"}
    assert sorted(os.listdir(copy)) == ["benchmark.json", "manifest.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="unknown benchmark section"):
        benchmark.write_benchmark_section(copy, "speed", {})


def test_a_benchmark_section_waits_for_whoever_holds_the_build_folder(tmp_path):
    import threading
    import time

    from pipeline.lock import folder_lock

    root = tmp_path / "build" / "m" / "cpu"
    root.mkdir(parents=True)
    (root / "manifest.json").write_text('{"model": "m", "target": "cpu"}')
    holding, released = threading.Event(), threading.Event()

    def hold():  # another writer of the folder (a build, a report, a second benchmark) for half a second
        with folder_lock(root):
            holding.set()
            time.sleep(0.5)
            released.set()

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait()
    benchmark.write_benchmark_section(root, "latency", {"rows": []})
    assert released.is_set()  # it merged its section only once the holder was done
    thread.join()
    assert json.loads((root / benchmark.BENCHMARK_FILE).read_text())["latency"]["rows"] == []


def test_cli_frame_path_and_clear_errors(lite0, imagenet, tmp_path, capsys, monkeypatch):
    config, root = lite0
    build_dir = root.parent.parent
    monkeypatch.setenv("IMAGENET_DIR", str(imagenet))
    assert main(["benchmark", "--model", MODEL, "--build-dir", str(build_dir), "--frame-path", "--seconds", "0.2"]) == 0
    assert "| int8 | openvino" in capsys.readouterr().out

    # no finished build there
    assert main(["benchmark", "--model", MODEL, "--build-dir", str(tmp_path / "empty"), "--throughput"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no finished build" in error and "python -m pipeline build" in error

    # a finished build without a bundle (made before bundles existed)
    old = tmp_path / "old" / MODEL / "cpu"
    old.mkdir(parents=True)
    shutil.copy(root / "manifest.json", old / "manifest.json")
    assert main(["benchmark", "--model", MODEL, "--build-dir", str(tmp_path / "old"), "--frame-path"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no bundle" in error and "rebuild" in error

    assert main(["benchmark", "--model", MODEL, "--build-dir", str(build_dir), "--throughput", "--seconds", "0"]) == 2
    assert "--seconds must be positive" in capsys.readouterr().err


def test_frame_jpeg_without_imagenet_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="no ImageNet val images.*IMAGENET_DIR.*not an ImageNet folder"):
        frame_jpeg(tmp_path)


def test_a_precision_that_fails_is_a_row_not_a_crash(lite0, tmp_path):
    """A bundle listing a second model whose file is missing: the deployed INT8 row is measured, the other says why."""
    config, root = lite0
    copy = tmp_path / "build" / MODEL / "cpu"
    copy.mkdir(parents=True)
    shutil.copy(root / "manifest.json", copy / "manifest.json")
    shutil.copytree(root / "bundle", copy / "bundle")
    manifest_path = copy / "bundle" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"]["fp32"] = {"file": "models/fp32_missing.xml", "kind": "openvino"}
    manifest_path.write_text(json.dumps(manifest))
    config = load_config(None, {"build_dir": str(tmp_path / "build"), "data": {"imagenet": config.data.imagenet}})
    markdown = benchmark.benchmark_frame_path(config, [MODEL], 0.1)
    rows = _sections(copy)["frame_path"]["rows"]
    assert [row["precision"] for row in rows] == ["int8", "fp32"]
    assert rows[0]["infer_ms"] > 0
    assert rows[1]["note"].startswith("failed:") and "fp32_missing" in rows[1]["note"]
    assert "| fp32 | — |" in markdown and "goal (< 10%)" in markdown


def test_nncf_comparison_writes_its_section(lite0):
    pytest.importorskip("nncf")
    config, root = lite0
    markdown = compare_nncf(config, [MODEL], 0.2)
    rows = _sections(root)["nncf"]["rows"]
    assert [row["int8_ir_from"].split(" ")[0] for row in rows] == ["NNCF", "ours:"]
    for row in rows:
        assert row["int8_top1"] is not None and 0 < row["agreement"] <= 1
        assert 0 < row["batch1_p50_ms"] <= row["batch1_p90_ms"] <= row["batch1_p99_ms"]
        assert row["int8_ir_from"] in markdown
