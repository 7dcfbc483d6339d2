"""What a build prints: the drift lines and table use the report's one representation of each metric."""

from __future__ import annotations

import re

import numpy as np
from rich.console import Console

from pipeline.drift import DriftBudget, compare
from pipeline.progress import Reporter

RNG = np.random.default_rng(0)


def _result(stage: str, images: int, noise: float):
    reference = RNG.normal(size=(images, 10))
    labels = reference.argmax(axis=1)
    return compare(stage, reference, reference + RNG.normal(scale=noise, size=reference.shape), labels, DriftBudget())


def _reporter() -> Reporter:
    return Reporter(Console(record=True, width=250, force_terminal=False))


def test_the_drift_table_says_how_many_images_each_stage_was_judged_on():
    simplify, int8 = _result("simplify", 64, 1e-6), _result("quantize", 650, 0.3)
    manifest = {"weights": {"random": False}, "evaluation_images": 650,
                "stages": {"reference": {}, "simplify": {"drift": simplify.as_dict()},
                           "quantize": {"drift": int8.as_dict(), "precision_ran": "int8+fp32"}}}
    reporter = _reporter()
    reporter.drift_table("efficientnet_lite0", manifest)
    text = reporter.console.export_text()
    assert "each stage on the first 64 or 650 held-out images" in text
    assert "650 evaluation images" not in text
    quantize_row = next(line for line in text.splitlines() if "quantize" in line)
    assert "650" in quantize_row and f"{100 * int8.agreement:.1f}%" in quantize_row
    # One representation: plain digits, never exponent notation (the report's `abs_diff`).
    assert not re.search(r"\d[eE][+-]\d", text)


def test_a_drift_line_names_its_images_and_the_max_abs_diff_in_plain_digits():
    reporter = _reporter()
    result = _result("export", 32, 1e-5)
    reporter.drift_line(result)
    line = reporter.console.export_text()
    assert "export" in line and "32 images" in line and "max abs diff 0.0000" in line
    assert not re.search(r"\d[eE][+-]\d", line)
