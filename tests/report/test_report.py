"""The quantization accuracy report on a real INT8 build of EfficientNet-Lite0 (genuine ImageNet weights).

One small INT8 CPU build (minmax ranges from 8 calibration images, judged on 256 images: a few
images change their top-1 class), built with --no-report and then reported with
--compare-calibration; the HTML page is opened in headless Chromium. A random-weight FP32 build
writes its report through `build` itself.
"""

import json
import re
import shutil
import subprocess
from html import escape
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main

# End-to-end runs over their own Lite0 builds: the full suite, not the fast tier.
pytestmark = pytest.mark.slow

MODEL = "efficientnet_lite0"
CHROMIUM = Path("/usr/bin/chromium")
SMALL_INT8 = """\
data:
  batch_size: 16
quantization:
  decision_images: 96
  sensitivity_images: 4
  max_fallback_layers: 2
drift:
  quantize: {max_top1_drop: 50.0}
  openvino_int8: {max_top1_drop: 50.0}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory, imagenet) -> Path:
    """The build folder of a finished INT8 build, reported once with --compare-calibration."""
    folder = tmp_path_factory.mktemp("report")
    (folder / "small.yaml").write_text(SMALL_INT8)
    build_dir = folder / "build"
    assert main(["build", "--model", MODEL, "--imagenet", str(imagenet), "--build-dir", str(build_dir),
                 "--config", str(folder / "small.yaml"), "--calibration-method", "minmax",
                 "--calibration-images", "8", "--int8-eval-images", "256", "--eval-images", "32", "--no-report"]) == 0
    root = build_dir / MODEL / "cpu"
    assert not (root / "report").exists()  # --no-report
    assert main(["report", str(build_dir), "--compare-calibration", "--latency-seconds", "0.2"]) == 0
    return root


def _report(root: Path) -> dict:
    return json.loads((root / "report" / "report.json").read_text())


def test_report_files_are_written_with_their_figures(built):
    folder = built / "report"
    for name in ("report.md", "report.json", "report.html", "sensitivity.png", "calibration.png"):
        assert (folder / name).is_file(), name
    # One stage chart per image set: the float stages on the 32 evaluation images, the INT8 ones on 256.
    assert {png.name for png in folder.glob("stages_*.png")} == {"stages_32.png", "stages_256.png"}
    for png in folder.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    markdown = (folder / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert {"stages_32.png", "stages_256.png", "sensitivity.png", "calibration.png"} <= set(linked)
    assert all((folder / name).is_file() for name in linked)  # every figure of the markdown lies beside it
    html = (folder / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == len(linked) and all(src.startswith("data:image/") for src in sources)  # self-contained
    assert not list(built.glob(".report.*"))  # no temporary folder left behind


def test_stage_figures_are_the_manifests(built):
    manifest = json.loads((built / "manifest.json").read_text())
    report = _report(built)
    rows = {row["stage"]: row for row in report["stages"]}
    assert set(rows) == set(manifest["stages"])
    for name, stage in manifest["stages"].items():
        assert rows[name]["drift"] == stage["drift"], name
        assert rows[name]["precision_ran"] == (stage["precision_ran"] if name != "reference" else "fp32 (torch)")
    for name in ("export", "simplify", "openvino_fp32", "openvino_fp16", "quantize", "openvino_int8"):
        artifact = built / name / manifest["stages"][name]["artifact"]
        on_disk = sum(f.stat().st_size for f in artifact.parent.glob(artifact.stem + ".*"))
        assert rows[name]["size_bytes"] == on_disk, name
        latency = rows[name]["latency"]
        assert latency is not None, rows[name]["latency_note"]
        assert 0 < latency["median_ms"] <= latency["p99_ms"] and latency["batch"] == 1
    assert "int8" in rows["openvino_int8"]["latency_note"]  # the IR really ran quantized
    reference = np.load(built / "reference" / "logits.npy")
    truth = np.load(built / "reference" / "labels.npy")
    assert report["reference"]["top1"] == pytest.approx(100.0 * np.mean(reference.argmax(1) == truth))
    quantize = manifest["stages"]["quantize"]["drift"]
    markdown = (built / "report" / "report.md").read_text()
    assert f"{quantize['ref_top1']:.1f}% → {quantize['top1']:.1f}%" in markdown
    assert f"{quantize['cosine']:.6f}" in markdown


def test_headline_decides_from_the_manifest(built, tmp_path):
    """The verdict and the recommendation at the top of all three files; a copy of the build whose
    deployed INT8 IR is marked over budget in its manifest says no, naming the figure and budget."""
    from pipeline.report import write_report

    manifest = json.loads((built / "manifest.json").read_text())
    report = _report(built)
    drift = manifest["stages"]["openvino_int8"]["drift"]
    assert drift["passed"] and report["verdict"]["ready"] is True
    assert report["verdict"]["text"] == "INT8 ready to ship: yes"
    assert list(report["verdict"]["stages"]) == ["openvino_int8"]
    checks = report["verdict"]["stages"]["openvino_int8"]["checks"]
    assert {c["budget"] for c in checks} == {v for v in drift["budget"].values() if v is not None}
    drop = drift["ref_top1"] - drift["top1"]  # SMALL_INT8's budget: max_top1_drop 50
    beside = f"top-1 drop {drop:.1f} points (within budget ≤ 50.0 points)"  # the figure beside its budget
    assert beside in [c["text"] for c in checks]
    rows = {row["stage"]: row for row in report["stages"]}
    timed = [r for r in rows.values() if r["latency"] and r["drift"] and r["drift"]["passed"]]
    fastest = min(timed, key=lambda r: r["latency"]["median_ms"])
    assert report["recommendation"]["stage"] == fastest["stage"]
    assert f"{fastest['latency']['median_ms']:.2f} ms p50" in report["recommendation"]["text"]
    markdown = (built / "report" / "report.md").read_text()
    head = markdown.split("## ")[0]  # the top section, before the stage table
    assert "INT8 ready to ship: yes." in head and report["recommendation"]["text"] in head
    assert f"| openvino_int8 | {drift['images']} | top-1 drop | {drop:.1f} points | ≤ 50.0 points | within |" in head
    assert escape("INT8 ready to ship: yes.") in (built / "report" / "report.html").read_text().split("<h2>")[0]

    copy = tmp_path / "copy"
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("bundle*"))  # report/cache.json too: no re-timing
    failed = json.loads(json.dumps(manifest))
    int8 = failed["stages"]["openvino_int8"]["drift"]
    int8["budget"]["min_sqnr_db"] = round(int8["sqnr_db"] + 10.0, 1)
    int8.update(passed=False, failures=[f"SQNR {int8['sqnr_db']:.1f} dB < {int8['budget']['min_sqnr_db']:.1f} dB"])
    (copy / "manifest.json").write_text(json.dumps(failed))
    write_report(copy, latency_seconds=0.2)
    again = _report(copy)
    expected = (f"INT8 ready to ship: no, because openvino_int8 is over its drift budget: SQNR {int8['sqnr_db']:.1f} dB "
                f"(past budget ≥ {int8['budget']['min_sqnr_db']:.1f} dB)")
    assert again["verdict"]["ready"] is False and again["verdict"]["text"] == expected
    assert again["recommendation"]["stage"] != "openvino_int8"
    assert f"> **WARNING:** {expected}." in (copy / "report" / "report.md").read_text().split("## ")[0]


def test_sensitivity_lists_the_gates_ranking(built):
    gate = json.loads((built / "quantize" / "gate.json").read_text())
    sensitivity = _report(built)["sensitivity"]
    assert sensitivity["ranking"] == gate["ranking"] and sensitivity["layers"] == len(gate["ranking"]) > 0
    assert sensitivity["kept_in_float"] == gate["excluded_layers"]


def test_calibration_methods_compared_on_the_builds_images(built):
    comparison = _report(built)["calibration_comparison"]
    assert [row["method"] for row in comparison["methods"]] == ["minmax", "percentile", "entropy", "mse"]
    assert comparison["same_images_as_build"] and comparison["images"] == 256
    own = next(row for row in comparison["methods"] if row["build_method"])
    assert own["method"] == "minmax" and own["calibration_images"] == 8
    # The build's method on the build's images reproduces the build's own INT8 figures.
    quantize = json.loads((built / "manifest.json").read_text())["stages"]["quantize"]["drift"]
    for key in ("top1", "agreement", "flips_lost", "flips_gained"):
        assert own["drift"][key] == quantize[key], key
    assert own["drift"]["cosine"] == pytest.approx(quantize["cosine"], abs=1e-6)
    others = [row["drift"]["cosine"] for row in comparison["methods"] if not row["build_method"]]
    assert all(cosine != own["drift"]["cosine"] for cosine in others)  # really different ranges
    # ... and on OpenVINO, the build's deployed INT8 IR's figures.
    deployed = json.loads((built / "manifest.json").read_text())["stages"]["openvino_int8"]["drift"]
    for key in ("top1", "agreement", "flips_lost", "flips_gained", "passed"):
        assert own["openvino"][key] == deployed[key], key
    assert own["openvino"]["sqnr_db"] == pytest.approx(deployed["sqnr_db"], abs=0.05)


def test_each_int8_option_compared_turned_the_other_way(built):
    from targets.cpu_features import int8_pairs_saturate

    comparison = _report(built)["calibration_comparison"]
    fix = int8_pairs_saturate()  # overflow_fix: auto, resolved by this machine's CPU
    assert comparison["build_options"] == {"bias_correction": True, "unsigned_activations": True, "overflow_fix": fix,
                                           "residual_adds": False, "int8_head": False, "equalization": False,
                                           "adaround": False}
    options = {row["option"]: row for row in comparison["options"]}
    assert {name: row["value"] for name, row in options.items()} == {
        "bias_correction": False, "unsigned_activations": False, "overflow_fix": not fix, "residual_adds": True,
        "int8_head": True, "equalization": True}
    assert "quantization.adaround: true" in comparison["options_not_compared"]["adaround"]  # minutes: not learnt here
    own = next(row for row in comparison["methods"] if row["build_method"])
    for name, row in options.items():  # each option really changed the Q/DQ model
        assert row["method"] == "minmax" and not row["build_method"], name
        assert row["drift"]["cosine"] != own["drift"]["cosine"] and row["openvino"]["cosine"] != own["openvino"]["cosine"], name
    markdown = (built / "report" / "report.md").read_text()
    assert "| unsigned_activations: off | 8 |" in markdown and "adaround: not compared" in markdown


def test_an_option_row_is_what_a_build_with_that_option_gives(built, tmp_path, imagenet):
    """The report's "unsigned_activations: off" row against a real build with that option (float stages cached)."""
    row = next(r for r in _report(built)["calibration_comparison"]["options"] if r["option"] == "unsigned_activations")
    build_dir = tmp_path / "build"
    shutil.copytree(built.parent.parent, build_dir, ignore=shutil.ignore_patterns("report"))
    (tmp_path / "signed.yaml").write_text(SMALL_INT8.replace("quantization:\n", "quantization:\n  unsigned_activations: false\n"))
    assert main(["build", "--model", MODEL, "--imagenet", str(imagenet), "--build-dir", str(build_dir),
                 "--config", str(tmp_path / "signed.yaml"), "--calibration-method", "minmax", "--calibration-images", "8",
                 "--int8-eval-images", "256", "--eval-images", "32", "--no-report"]) == 0
    manifest = json.loads((build_dir / MODEL / "cpu" / "manifest.json").read_text())
    assert "simplify" not in manifest["built_this_run"] and "quantize" in manifest["built_this_run"]
    for stage, figures in (("quantize", row["drift"]), ("openvino_int8", row["openvino"])):
        drift = manifest["stages"][stage]["drift"]
        for key in ("top1", "agreement", "flips_lost", "flips_gained"):
            assert figures[key] == drift[key], (stage, key)
        assert figures["sqnr_db"] == pytest.approx(drift["sqnr_db"], abs=0.05), stage


def test_changed_predictions_show_both_classes_and_the_truth(built):
    reference = np.load(built / "reference" / "logits.npy").argmax(1)
    quantized = np.load(built / "quantize" / "logits.npy").argmax(1)
    deployed = np.load(built / "check_openvino_int8" / "logits.npy").argmax(1)
    changed = set(np.flatnonzero(quantized != reference)) | set(np.flatnonzero(deployed != reference))
    assert changed, "the small minmax build should change a few of 256 predictions"
    flips = _report(built)["flips"]
    assert {row["index"] for row in flips["images"]} == {int(i) for i in changed}
    names = (built / "labels.txt").read_text().splitlines()
    html = (built / "report" / "report.html").read_text()
    for row in flips["images"]:
        assert row["fp32_name"] == names[reference[row["index"]]]
        assert row["int8"]["quantize"]["name"] == names[quantized[row["index"]]]
        assert row["label_name"] == names[row["label"]]
        thumbnail = built / "report" / f"flip_{row['index']:04d}.jpg"
        assert thumbnail.read_bytes()[:3] == b"\xff\xd8\xff"
        caption = f"true: {row['label_name']} | FP32: {row['fp32_name']} | INT8 quantize: {row['int8']['quantize']['name']}"
        assert escape(caption) in html


def test_rereport_reuses_the_cached_measurements(built):
    before = _report(built)
    from pipeline.report import write_report

    assert write_report(built, latency_seconds=0.2) == built / "report" / "report.html"
    after = _report(built)
    assert [row["latency"] for row in after["stages"]] == [row["latency"] for row in before["stages"]]
    assert after["calibration_comparison"] == before["calibration_comparison"]  # kept without the flag


def _chromium(user_dir: Path, *options: str, url: str) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={user_dir}", *options, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)")
def test_html_report_in_headless_chromium(built, tmp_path):
    page = built / "report" / "report.html"
    images = page.read_text().count("<img ")
    assert images >= 4  # three figures and at least one thumbnail
    dom = _chromium(tmp_path / "profile", "--dump-dom", "--virtual-time-budget=5000", url=page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded, "the page's script did not run"
    assert loaded.groups() == (str(images), str(images))  # every image decoded
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", url=page.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 20 and len(np.unique(pixels)) > 50  # text, tables and plots, not a blank page


def test_report_of_an_empty_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(tmp_path) in error and "no finished build" in error
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_random_weights_are_flagged_by_the_builds_own_report(tmp_path, imagenet):
    (tmp_path / "random.yaml").write_text("data:\n  batchnorm_images: 16\n  batch_size: 16\n")
    assert main(["build", "--model", MODEL, "--imagenet", str(imagenet), "--build-dir", str(tmp_path / "build"),
                 "--config", str(tmp_path / "random.yaml"), "--weights", "random", "--precision", "fp32",
                 "--eval-images", "16"]) == 0
    folder = tmp_path / "build" / MODEL / "cpu" / "report"
    report = json.loads((folder / "report.json").read_text())
    assert report["random_weights"] is True
    assert "RANDOM WEIGHTS" in (folder / "report.md").read_text()
    assert '<div class="warning">RANDOM WEIGHTS' in (folder / "report.html").read_text()
    assert report["flips"]["images"] == [] and "Not an INT8 build" in report["flips"]["note"]


def test_benchmark_table_goes_into_the_report(built):
    """Last in this file: it adds benchmark.json to the shared build."""
    from pipeline.report import write_report

    assert "python -m pipeline benchmark" in (built / "report" / "report.md").read_text()  # how to make it
    assert main(["benchmark", "--latency", "--model", MODEL, "--build-dir", str(built.parent.parent),
                 "--seconds", "0.1"]) == 0
    write_report(built, latency_seconds=0.2)
    rows = json.loads((built / "benchmark.json").read_text())["latency"]["rows"]
    report = _report(built)
    assert report["benchmark"]["latency"]["rows"] == rows
    markdown = (built / "report" / "report.md").read_text()
    for row in rows:
        assert f"| {row['back_end']} | {row['ran_in'] or '—'} |" in markdown
    assert not any("benchmark table" in line for line in report["missing"])
