"""Drift of a stage's logits against the torch FP32 reference: metrics and a verdict in one object.

Top-1 agreement alone proves little on randomly initialised networks (they collapse onto a few
classes or have tiny margins), so the comparison also reports cosine and SQNR of the logits with
each class's reference mean over the evaluation set removed ("centred"), and how many distinct
classes the reference predicts.

Conventions:
- `labels` uses -1 for unlabelled images; accuracy is measured on the labelled ones only.
- All sums are accumulated in float64.
- SQNR = 10 log10(sum ref^2 / sum (cand - ref)^2) over the whole set: +inf when the candidate is
  identical. `as_dict()` writes non-finite numbers as the strings "inf" / "-inf" / "nan" so that
  reports stay strict JSON; the dataclass keeps real floats so thresholds compare correctly.
- Centred metrics are None when the reference gives the same logits for every image (nothing
  input-dependent to compare); a budget on them then fails with that reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from pipeline.errors import DriftError, PipelineError
from pipeline.formats import abs_diff, cosine, pct, percent, points, sqnr, versus


@dataclass(frozen=True)
class DriftBudget:
    """Thresholds a stage must meet; None = not checked."""

    min_agreement: float | None = None  # top-1 agreement with the reference, fraction 0..1
    min_cosine: float | None = None  # mean per-image cosine of the logits
    max_abs_rel: float | None = None  # max |cand - ref| / max |ref|
    max_top1_drop: float | None = None  # percentage points of top-1 lost (needs labels)
    min_centred_cosine: float | None = None  # cosine of the centred logits (random weights)
    min_sqnr_db: float | None = None  # SQNR of the logits
    min_centred_sqnr_db: float | None = None  # SQNR of the centred logits (random weights)

    def __post_init__(self):
        # Catch percentages given where fractions are meant (min_agreement: 99 instead of 0.99).
        agreement = self.min_agreement
        if agreement is not None and not 0.0 <= agreement <= 1.0:
            raise PipelineError(f"drift budget min_agreement is a fraction 0..1, got {agreement}")
        for name in ("min_cosine", "min_centred_cosine"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise PipelineError(f"drift budget {name} must lie in -1..1, got {value}")
        for name in ("max_abs_rel", "max_top1_drop"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise PipelineError(f"drift budget {name} must not be negative, got {value}")

    def as_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class DriftResult:
    """The comparison of one stage with the reference; truthy when it stayed within budget."""

    stage: str
    images: int
    budget: DriftBudget
    # Accuracy in percent on the labelled images; None without labels.
    labelled_images: int
    ref_top1: float | None
    ref_top5: float | None
    top1: float | None
    top5: float | None
    flips_lost: int | None  # right in the reference, wrong in the candidate
    flips_gained: int | None  # wrong in the reference, right in the candidate
    agreement: float  # fraction of images whose top-1 class is the reference's
    cosine: float  # mean per-image cosine of the logits
    min_cosine: float
    max_abs: float  # max |cand - ref|
    max_abs_rel: float  # max |cand - ref| / max |ref|
    sqnr_db: float
    centred_cosine: float | None  # cosine of the whole centred logit matrix
    centred_sqnr_db: float | None
    distinct_ref_classes: int  # classes the reference predicts: few means a collapsed network
    non_finite: int  # NaN/inf values in the candidate's logits (always a failure)
    failures: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        """One line for logs and errors."""
        if self.passed:
            return (f"{self.stage}: within budget (agreement {pct(self.agreement)}, cosine {cosine(self.cosine)}, "
                    f"SQNR {sqnr(self.sqnr_db)}, {self.images} images)")
        return f"{self.stage}: drift past budget: " + "; ".join(self.failures)

    def raise_if_failed(self) -> DriftResult:
        if not self.passed:
            raise DriftError(self.summary())
        return self

    def as_dict(self) -> dict:
        """JSON-ready (strict JSON: non-finite floats become "inf"/"-inf"/"nan")."""
        out = {key: _json_number(value) for key, value in asdict(self).items()}
        out["budget"] = self.budget.as_dict()
        out["failures"] = list(self.failures)
        out["notes"] = list(self.notes)
        out["passed"] = self.passed
        return out


def compare(
    stage: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray | None,
    budget: DriftBudget,
) -> DriftResult:
    """Compare candidate logits (N, classes) with the reference logits of the same images."""
    if reference.ndim != 2 or reference.shape != candidate.shape:
        raise ValueError(
            f"logits must both be (N, classes): reference {reference.shape}, "
            f"candidate {candidate.shape}"
        )
    if len(reference) == 0:
        raise ValueError("no images to compare")
    if not np.isfinite(reference).all():
        raise PipelineError(f"the reference logits for {stage} hold NaN/inf: rebuild the reference")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    images = len(ref)
    notes: list[str] = []

    ref_pred, cand_pred = ref.argmax(axis=1), cand.argmax(axis=1)
    agreement = float(np.mean(ref_pred == cand_pred))

    accuracy = _accuracy(ref, cand, ref_pred, cand_pred, labels, images)
    if accuracy["labelled_images"] == 0:
        notes.append("no labels: accuracy not measured")

    per_image = _cosines(ref, cand)
    max_abs = float(np.max(np.abs(cand - ref)))
    class_means = ref.mean(axis=0)  # each class's reference mean over the evaluation set
    centred, centred_cand = ref - class_means, cand - class_means
    centred_cosine = centred_sqnr_db = None
    if np.any(centred != 0.0):
        flat, flat_cand = centred.reshape(1, -1), centred_cand.reshape(1, -1)
        centred_cosine = float(_cosines(flat, flat_cand)[0])  # over the whole set, like SQNR
        centred_sqnr_db = _sqnr_db(centred, centred_cand)
    else:
        notes.append("reference gives the same logits for every image: centred metrics undefined")

    result = dict(
        stage=stage,
        images=images,
        budget=budget,
        **accuracy,
        agreement=agreement,
        cosine=float(per_image.mean()),
        min_cosine=float(per_image.min()),
        max_abs=max_abs,
        max_abs_rel=_ratio(max_abs, float(np.max(np.abs(ref)))),
        sqnr_db=_sqnr_db(ref, cand),
        centred_cosine=centred_cosine,
        centred_sqnr_db=centred_sqnr_db,
        distinct_ref_classes=int(len(np.unique(ref_pred))),
        non_finite=int(np.size(candidate) - np.count_nonzero(np.isfinite(candidate))),
        notes=tuple(notes),
    )
    return DriftResult(**result, failures=_failures(result, budget))


def _accuracy(ref, cand, ref_pred, cand_pred, labels, images) -> dict:
    none = dict.fromkeys(("ref_top1", "ref_top5", "top1", "top5", "flips_lost", "flips_gained"))
    none["labelled_images"] = 0
    if labels is None:
        return none
    labels = np.asarray(labels)
    if labels.shape != (images,):
        raise ValueError(f"labels must be ({images},), got {labels.shape}")
    known = labels >= 0
    if not known.any():
        return none
    truth = labels[known]
    ref_right = ref_pred[known] == truth
    cand_right = cand_pred[known] == truth
    return dict(
        labelled_images=int(known.sum()),
        ref_top1=100.0 * float(ref_right.mean()),
        ref_top5=_top5(ref[known], truth),
        top1=100.0 * float(cand_right.mean()),
        top5=_top5(cand[known], truth),
        flips_lost=int(np.sum(ref_right & ~cand_right)),
        flips_gained=int(np.sum(~ref_right & cand_right)),
    )


def _top5(logits: np.ndarray, truth: np.ndarray) -> float:
    k = min(5, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return 100.0 * float(np.mean(np.any(top == truth[:, None], axis=1)))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine (float64); identical rows (two zero rows too) give 1, one zero row 0."""
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite logits are reported apart
        dot = np.sum(a * b, axis=1)
        norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        norms = norm_a * norm_b
        cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    # Identical rows give exactly 1 (rounding can give 0.9999999999999998 and fail a budget of 1).
    identical = np.all(a == b, axis=1)
    return np.where(identical, 1.0, np.clip(cosine, -1.0, 1.0))


def _sqnr_db(signal: np.ndarray, candidate: np.ndarray) -> float:
    noise = float(np.sum((candidate - signal) ** 2))
    power = float(np.sum(signal**2))
    if noise == 0.0:
        return math.inf
    if power == 0.0:
        return -math.inf
    with np.errstate(divide="ignore", invalid="ignore"):  # inf/NaN noise -> -inf/NaN
        return float(10.0 * np.log10(power / noise))


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def _failures(r: dict, budget: DriftBudget) -> tuple[str, ...]:
    """Readable reasons the result misses its budget, each figure beside its budget in the representation
    the console and the report use (`pipeline.formats`). `not (x >= min)` so that NaN fails too."""
    failures = []
    if r["non_finite"]:
        failures.append(f"candidate logits hold {r['non_finite']} NaN/inf values")
    if budget.min_agreement is not None and not r["agreement"] >= budget.min_agreement:
        changed = round((1.0 - r["agreement"]) * r["images"])
        failures.append(f"agreement {versus(pct, r['agreement'], budget.min_agreement, '<')} "
                        f"({changed} of {r['images']} images changed top-1 class)")
    if budget.min_cosine is not None and not r["cosine"] >= budget.min_cosine:
        failures.append(f"mean cosine {versus(cosine, r['cosine'], budget.min_cosine, '<')}")
    if budget.max_abs_rel is not None and not r["max_abs_rel"] <= budget.max_abs_rel:
        failures.append(f"relative max abs diff {versus(abs_diff, r['max_abs_rel'], budget.max_abs_rel, '>')}")
    if budget.max_top1_drop is not None and r["top1"] is not None:
        drop = r["ref_top1"] - r["top1"]
        if not drop <= budget.max_top1_drop:
            failures.append(f"top-1 drop {versus(points, drop, budget.max_top1_drop, '>')} "
                            f"({percent(r['ref_top1'])} → {percent(r['top1'])}, {r['flips_lost']} lost, "
                            f"{r['flips_gained']} gained)")
    if budget.min_sqnr_db is not None and not r["sqnr_db"] >= budget.min_sqnr_db:
        failures.append(f"SQNR {versus(sqnr, r['sqnr_db'], budget.min_sqnr_db, '<')}")
    for key, label, threshold, render in (
        ("centred_cosine", "centred cosine", budget.min_centred_cosine, cosine),
        ("centred_sqnr_db", "centred SQNR", budget.min_centred_sqnr_db, sqnr),
    ):
        if threshold is None:
            continue
        value = r[key]
        if value is None:
            failures.append(
                f"{label} undefined: the reference gives the same logits for every image "
                "(re-estimate batch-norm statistics of random weights on real images)"
            )
        elif not value >= threshold:
            failures.append(f"{label} {versus(render, value, threshold, '<')}")
    return tuple(failures)


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
