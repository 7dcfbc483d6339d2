"""Drift metrics against values computed by hand on small logit arrays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.drift import DriftBudget, compare
from pipeline.errors import DriftError, PipelineError

# 4 images, 3 classes. Reference predicts 0, 1, 2, 1; the candidate changes only image 3 (-> 0).
REFERENCE = np.array([[2, 1, 0], [0, 3, 1], [1, 0, 2], [0, 1, 0]], dtype=np.float32)
CANDIDATE = np.array([[2, 1, 0], [0, 3, 1], [1, 0, 2], [1, 0, 0]], dtype=np.float32)


def test_metrics_by_hand():
    result = compare("int8", REFERENCE, CANDIDATE, None, DriftBudget())
    assert result.images == 4
    assert result.agreement == 0.75
    assert result.cosine == pytest.approx(0.75)  # three identical rows (1) and one orthogonal (0)
    assert result.min_cosine == 0.0
    assert result.max_abs == 1.0
    assert result.max_abs_rel == pytest.approx(1 / 3)
    # signal 4+1 + 9+1 + 1+4 + 1 = 21, noise 1+1 = 2
    assert result.sqnr_db == pytest.approx(10 * math.log10(21 / 2))
    assert result.distinct_ref_classes == 3
    assert result.passed and bool(result)  # an empty budget checks nothing


def test_centred_metrics_by_hand():
    reference = np.array([[3, 1], [1, 3]], dtype=np.float32)  # class means 2, 2
    candidate = np.array([[4, 1], [1, 3]], dtype=np.float32)
    result = compare("fp16", reference, candidate, None, DriftBudget())
    # centred: reference [[1,-1],[-1,1]], candidate [[2,-1],[-1,1]]: dot 5, norms 2 and sqrt(7)
    assert result.centred_cosine == pytest.approx(5 / (2 * math.sqrt(7)))
    assert result.centred_sqnr_db == pytest.approx(10 * math.log10(4 / 1))
    assert result.sqnr_db == pytest.approx(10 * math.log10(20 / 1))


def test_accuracy_flips_and_unlabelled_images():
    labels = np.array([0, 1, -1, 1])  # image 2 unlabelled
    result = compare("int8", REFERENCE, CANDIDATE, labels, DriftBudget())
    assert result.labelled_images == 3
    assert result.ref_top1 == pytest.approx(100.0)
    assert result.top1 == pytest.approx(200 / 3)
    assert (result.flips_lost, result.flips_gained) == (1, 0)
    assert result.ref_top5 == result.top5 == 100.0  # 3 classes: top-5 holds them all

    swapped = compare("int8", CANDIDATE, REFERENCE, labels, DriftBudget())
    assert (swapped.flips_lost, swapped.flips_gained) == (0, 1)


def test_top5_with_more_classes():
    reference = np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], dtype=np.float32)
    candidate = reference[:, ::-1].copy()
    labels = np.array([5, 5])
    result = compare("x", reference, candidate, labels, DriftBudget())
    # image 0: class 5 is last in the reference, first in the candidate; image 1: the reverse
    assert (result.ref_top5, result.top5) == (50.0, 50.0)
    assert (result.ref_top1, result.top1) == (50.0, 50.0)
    assert (result.flips_lost, result.flips_gained) == (1, 1)


def test_budget_failures_read_well():
    budget = DriftBudget(
        min_agreement=1.0, min_cosine=0.99, max_abs_rel=0.1, max_top1_drop=1.0, min_sqnr_db=20.0
    )
    result = compare("int8", REFERENCE, CANDIDATE, np.array([0, 1, 2, 1]), budget)
    assert not result.passed and not result
    assert result.failures == (
        "agreement 75.0% < 100.0% (1 of 4 images changed top-1 class)",
        "mean cosine 0.750000 < 0.990000",
        "relative max abs diff 0.333 > 0.100",
        "top-1 drop 25.0 points > 1.0 points (100.0% → 75.0%, 1 lost, 0 gained)",
        "SQNR 10.2 dB < 20.0 dB",
    )
    with pytest.raises(DriftError, match="int8: drift past budget: agreement 75.0%"):
        result.raise_if_failed()


def test_a_figure_just_past_its_budget_never_prints_equal_to_it():
    # 98.96% rounds to the budget's 99.0%: the reason shows the decimals that tell them apart.
    reference = np.tile([2.0, 1.0, 0.0, 0.0], (10000, 1))
    candidate = reference.copy()
    candidate[:104] = [1.0, 2.0, 0.0, 0.0]  # 104 of 10000 images change their top-1 class
    result = compare("x", reference, candidate, None, DriftBudget(min_agreement=0.99))
    assert result.failures == ("agreement 98.96% < 99.00% (104 of 10000 images changed top-1 class)",)


def test_budget_met_passes():
    budget = DriftBudget(min_agreement=0.75, min_cosine=0.75, max_abs_rel=0.34, min_sqnr_db=10.0)
    result = compare("int8", REFERENCE, CANDIDATE, None, budget)
    assert result.passed and result.failures == ()
    assert result.raise_if_failed() is result
    assert "within budget" in result.summary()


def test_without_labels_top1_budget_is_skipped_with_a_note():
    budget = DriftBudget(max_top1_drop=0.0)
    for labels in (None, np.full(4, -1)):
        result = compare("int8", REFERENCE, CANDIDATE, labels, budget)
        assert result.passed
        assert result.top1 is result.ref_top1 is result.flips_lost is None
        assert "no labels: accuracy not measured" in result.notes


def test_identical_logits_are_json_safe():
    result = compare("onnx", REFERENCE, REFERENCE.copy(), None, DriftBudget(min_sqnr_db=60.0))
    assert result.passed
    assert result.sqnr_db == math.inf and result.centred_sqnr_db == math.inf
    assert result.cosine == result.centred_cosine == 1.0
    data = result.as_dict()
    assert data["sqnr_db"] == "inf" and data["passed"] is True
    assert data["budget"] == {"min_sqnr_db": 60.0}
    json.dumps(data, allow_nan=False)  # strict JSON


def test_collapsed_reference_has_undefined_centred_metrics():
    reference = np.tile(np.array([[0.5, 0.2, 0.1]], dtype=np.float32), (5, 1))
    result = compare("int8", reference, reference + 0.01, None, DriftBudget(min_centred_cosine=0.9))
    assert result.agreement == 1.0  # passes trivially ...
    assert result.centred_cosine is None and result.distinct_ref_classes == 1
    assert not result.passed  # ... but the centred check says why it proves nothing
    assert result.failures[0].startswith("centred cosine undefined: the reference gives the same")


def test_non_finite_candidate_always_fails():
    candidate = CANDIDATE.copy()
    candidate[1, 1] = np.nan
    candidate[2, 0] = np.inf
    result = compare("fp16", REFERENCE, candidate, None, DriftBudget(min_sqnr_db=-100.0))
    assert not result.passed
    assert "candidate logits hold 2 NaN/inf values" in result.failures
    json.dumps(result.as_dict(), allow_nan=False)


def test_float64_accumulation():
    # Large logits in float32 lose the small difference when squared and summed in float32.
    rng = np.random.default_rng(0)
    reference = (rng.standard_normal((64, 1000)) * 1000).astype(np.float32)
    candidate = reference + np.float32(1e-2)
    result = compare("x", reference, candidate, None, DriftBudget())
    expected = 10 * math.log10(np.sum(reference.astype(np.float64) ** 2) / (64 * 1000 * 1e-4))
    assert result.sqnr_db == pytest.approx(expected, abs=0.01)


def test_bad_inputs():
    with pytest.raises(PipelineError, match="fraction 0..1, got 99"):
        DriftBudget(min_agreement=99)
    with pytest.raises(ValueError, match="reference \\(4, 3\\), candidate \\(3, 3\\)"):
        compare("x", REFERENCE, CANDIDATE[:3], None, DriftBudget())
    with pytest.raises(ValueError, match="labels must be"):
        compare("x", REFERENCE, CANDIDATE, np.zeros(3), DriftBudget())
    with pytest.raises(PipelineError, match="reference logits for x hold NaN"):
        compare("x", np.full((2, 3), np.nan), CANDIDATE[:2], None, DriftBudget())
