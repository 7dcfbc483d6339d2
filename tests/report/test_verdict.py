"""The report's headline (INT8 ready to ship, the recommended artifact) and its one format per metric,
on manifests made of real drift results (`pipeline.drift.compare`), no build needed."""

import re

import numpy as np
import pytest

from pipeline.drift import DriftBudget, compare
from pipeline import formats
from pipeline.report.markdown import render_markdown
from pipeline.report.sections import preprocessing_section, stage_section
from pipeline.report.verdict import budget_checks, deployed_int8_stages, headline_blocks, recommendation, verdict

RNG = np.random.default_rng(0)
REFERENCE = RNG.normal(size=(200, 10)) * 3
LABELS = REFERENCE.argmax(1)


def _drift(stage: str, noise: float, budget: DriftBudget, images: int = 200) -> dict:
    """A real drift result: the reference plus noise, judged on `budget`."""
    reference = REFERENCE[:images]
    candidate = reference + np.random.default_rng(1).normal(size=reference.shape) * noise
    return compare(stage, reference, candidate, LABELS[:images], budget).as_dict()


INT8_BUDGET = DriftBudget(min_agreement=0.95, min_sqnr_db=15.0)


def _manifest(int8_noise: float = 0.05, precision: str = "int8", stages=("openvino_fp16", "quantize", "openvino_int8")):
    drifts = {"openvino_fp16": _drift("openvino_fp16", 0.001, DriftBudget(min_agreement=0.99), images=64),
              "quantize": _drift("quantize", 0.05, INT8_BUDGET),
              "quantize_fp16": _drift("quantize_fp16", 0.05, INT8_BUDGET),
              "openvino_int8": _drift("openvino_int8", int8_noise, INT8_BUDGET)}
    return {"precision": precision, "status": "ok",
            "stages": {"reference": {"drift": None}, **{name: {"drift": drifts[name]} for name in stages}}}


def test_a_passing_int8_build_is_ready_with_each_budget_beside_its_figure():
    manifest = _manifest()
    assert deployed_int8_stages(manifest) == ["openvino_int8"]
    decision = verdict(manifest)
    assert decision["ready"] is True and decision["text"] == "INT8 ready to ship: yes"
    drift = manifest["stages"]["openvino_int8"]["drift"]
    checks = {check["figure"]: check for check in decision["stages"]["openvino_int8"]["checks"]}
    assert set(checks) == {"top-1 agreement", "SQNR"}
    assert checks["top-1 agreement"]["value"] == drift["agreement"] and checks["top-1 agreement"]["budget"] == 0.95
    assert checks["top-1 agreement"]["text"] == f"top-1 agreement {100 * drift['agreement']:.1f}% (within budget ≥ 95.0%)"
    assert checks["SQNR"]["text"] == f"SQNR {drift['sqnr_db']:.1f} dB (within budget ≥ 15.0 dB)"


def test_a_stage_over_its_budget_says_no_and_why():
    manifest = _manifest(int8_noise=3.0)  # noise as large as the logits: agreement and SQNR collapse
    drift = manifest["stages"]["openvino_int8"]["drift"]
    assert not drift["passed"] and drift["agreement"] < 0.95 and drift["sqnr_db"] < 15.0
    decision = verdict(manifest)
    assert decision["ready"] is False
    assert decision["text"] == ("INT8 ready to ship: no, because openvino_int8 is over its drift budget: "
                                f"top-1 agreement {100 * drift['agreement']:.1f}% (past budget ≥ 95.0%); "
                                f"SQNR {drift['sqnr_db']:.1f} dB (past budget ≥ 15.0 dB)")
    blocks = headline_blocks({"verdict": decision, "recommendation": {"text": "x"}})
    assert blocks[0] == ("warning", decision["text"] + ".")
    assert blocks[1][2] == [["openvino_int8", "200", "top-1 agreement", f"{100 * drift['agreement']:.1f}%", "≥ 95.0%",
                             "PAST BUDGET"], ["openvino_int8", "200", "SQNR", f"{drift['sqnr_db']:.1f} dB", "≥ 15.0 dB",
                                              "PAST BUDGET"]]


def test_the_verdict_follows_the_manifests_passed_flag():
    manifest = _manifest()
    drift = manifest["stages"]["openvino_int8"]["drift"]
    drift.update(passed=False, failures=["candidate logits hold 3 NaN/inf values"])  # no budget figure is past
    decision = verdict(manifest)
    assert decision["ready"] is False and decision["text"].endswith("candidate logits hold 3 NaN/inf values")
    assert verdict(_manifest(), random_weights=True)["ready"] is False


def test_gpu_targets_judge_the_qdq_onnx_stages():
    manifest = {"precision": "int8", "status": "ok", "stages": {
        "quantize": {"drift": _drift("quantize", 0.05, INT8_BUDGET)},
        "quantize_fp16": {"drift": _drift("quantize_fp16", 3.0, INT8_BUDGET)}}}
    assert deployed_int8_stages(manifest) == ["quantize", "quantize_fp16"]
    decision = verdict(manifest)
    assert decision["ready"] is False and "quantize_fp16 is over its drift budget" in decision["text"]
    assert "because quantize is" not in decision["text"]


def test_a_float_build_says_int8_was_not_built():
    decision = verdict(_manifest(precision="fp16", stages=("openvino_fp16",)))
    assert decision["ready"] is None and "not built" in decision["text"] and "FP16" in decision["text"]


def _rows(manifest: dict, latency: dict) -> list[dict]:
    return [{"stage": name, "artifact": f"{name}/model", "drift": stage["drift"], "checked": stage["drift"] is not None,
             "latency": {"median_ms": latency[name], "p99_ms": latency[name] * 1.5} if name in latency else None,
             "latency_note": "", "precision_ran": "f32", "size_bytes": 1000}
            for name, stage in manifest["stages"].items()]


def test_the_recommendation_is_the_fastest_artifact_within_its_budget():
    manifest = _manifest(int8_noise=3.0)  # the INT8 IR is fastest but over budget
    rows = _rows(manifest, {"openvino_fp16": 4.0, "quantize": 6.0, "openvino_int8": 1.0})
    chosen = recommendation(rows)
    fp16 = manifest["stages"]["openvino_fp16"]["drift"]
    assert chosen["stage"] == "openvino_fp16" and chosen["latency_ms"] == 4.0
    assert "4.00 ms p50" in chosen["text"] and f"top-1 {fp16['top1']:.1f}%" in chosen["text"]
    assert "on 64 images" in chosen["text"]
    passing = recommendation(_rows(_manifest(), {"openvino_fp16": 4.0, "quantize": 6.0, "openvino_int8": 1.0}))
    assert passing["stage"] == "openvino_int8" and passing["latency_ms"] == 1.0


def test_without_latency_figures_the_report_says_so():
    chosen = recommendation(_rows(_manifest(), {}))
    assert chosen["stage"] is None and "no latency figures" in chosen["text"]


def test_one_format_per_metric():
    assert [formats.abs_diff(v) for v in (1.7234, 0.10234, 1.0848e-05, 123.4)] == ["1.72", "0.102", "0.0000108", "123"]
    assert formats.pct(0.99213) == "99.2%" and formats.percent(76.25) == "76.2%"
    assert formats.sqnr("inf") == "∞ dB" and formats.sqnr(19.93) == "19.9 dB"
    manifest = _manifest(int8_noise=3.0)
    drift = manifest["stages"]["openvino_int8"]["drift"]
    report = {"stages": _rows(manifest, {}), "reference": {"images": 200}, "random_weights": False}
    images: dict = {}
    sections = [stage_section(report, images), preprocessing_section({"drift": drift})]
    tables = [block for section in sections for block in section["blocks"] if block[0] == "table"]
    for headers, rows in ((t[1], t[2]) for t in tables):
        for row in rows:
            cells = dict(zip(headers, row))
            if cells.get("agreement", "—") != "—":
                assert re.fullmatch(r"\d+\.\d%", cells["agreement"]), cells["agreement"]
            if cells.get("max abs diff", "—") != "—":
                assert "e" not in cells["max abs diff"]
    stage_rows = {row[0]: dict(zip(tables[0][1], row)) for row in tables[0][2]}
    int8 = stage_rows["openvino_int8"]
    assert int8["max abs diff"] == formats.abs_diff(drift["max_abs"]) and float(int8["max abs diff"]) == pytest.approx(
        drift["max_abs"], rel=5e-3)
    assert int8["relative max abs diff"] == formats.abs_diff(drift["max_abs_rel"])
    # The failed stage's verdict cell and the headline show the same figures the same way.
    assert int8["verdict"] == "FAIL: " + "; ".join(c["text"] for c in budget_checks(drift) if c["within"] is False)
    assert int8["verdict"][len("FAIL: "):] in verdict(manifest)["text"]
    markdown = render_markdown({}, sections)
    assert not re.search(r"\d[eE][+-]\d", markdown)  # no exponent notation anywhere


def test_charts_never_mix_image_sets():
    manifest = _manifest()  # openvino_fp16 judged on 64 images, the INT8 stages on 200
    images: dict = {}
    section = stage_section({"stages": _rows(manifest, {}), "reference": {}, "random_weights": False}, images)
    figures = {block[1]: block[2] for block in section["blocks"] if block[0] == "figure"}
    assert set(figures) == set(images) == {"stages_64.png", "stages_200.png"}
    assert figures["stages_64.png"].endswith("on 64 images: openvino_fp16")
    assert figures["stages_200.png"].endswith("on 200 images: quantize, openvino_int8")


def test_calibration_section_shows_centred_figures_for_random_weights():
    """Random weights: the comparison's SQNR and cosine columns are the centred ones, on both back ends."""
    from pipeline.report.sections import calibration_section

    ort, ov = _drift("quantize", 0.05, INT8_BUDGET), _drift("openvino_int8", 0.2, INT8_BUDGET)
    # Random weights' logits are mostly each class's mean, so their centred SQNR is far lower (here: set so).
    ort, ov = {**ort, "centred_sqnr_db": 9.1}, {**ov, "centred_sqnr_db": 7.4}
    row = {"method": "percentile", "build_method": True, "calibration_images": 512, "drift": ort, "openvino": ov}
    for random_weights, key in ((False, "sqnr_db"), (True, "centred_sqnr_db")):
        comparison = {"methods": [row], "options": [{**row, "build_method": False, "option": "bias_correction",
                                                     "value": False}],
                      "options_not_compared": {"adaround": "minutes"}, "images": 200, "kept_in_float": [],
                      "percentile": 99.99, "bins": 2048, "random_weights": random_weights}
        section = calibration_section(comparison, {})
        tables = [block for block in section["blocks"] if block[0] == "table"]
        assert len(tables) == 2  # the methods, then the options
        header, rows = tables[0][1], tables[0][2]
        cell = rows[0][header.index(("centred " if random_weights else "") + "SQNR (ORT · OV)")]
        assert cell == f"{formats.sqnr(ort[key])} · {formats.sqnr(ov[key])}"
        assert [r[0] for r in tables[1][2]] == ["this build (percentile)", "bias_correction: off"]
