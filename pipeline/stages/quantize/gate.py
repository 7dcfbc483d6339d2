"""The INT8 accuracy gate: quantize, judge on both back ends, return the worst layers to float.

Every attempt writes the Q/DQ ONNX with some Convs left in float, runs it in ONNX Runtime and, as an
OpenVINO IR converted from it, in OpenVINO, and judges both on their budgets (`drift.quantize`,
`drift.openvino_int8`, tightened by `drift.gate`). The first attempt quantizes every Conv; each next one
keeps the next group of the most sensitive layers (one-pass ranking, `pipeline.stages.quantize.sensitivity`)
in float, until both back ends pass or the layer limit is reached.

The gate decides on its own images: `quantization.decision_images` labelled train-sample/ images that
never calibrate, judged against the FP32 ONNX it quantizes (the simplified or the equalized one, each
equal to the torch reference within its stage's lossless budget). The evaluation images (val/) are read once, by the chosen model, for
the stage's drift check: what the build reports was never used to choose.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import DriftError
from pipeline.layout import LOGITS_FILE

if TYPE_CHECKING:
    from pipeline.context import BuildContext
    from pipeline.drift import DriftResult

# The ranking keeps every Conv's output of two models (and a probe per Conv) for a batch: about
# 0.75 GB per Inception-v4 image, so a small batch keeps a default build under 6 GB.
RANKING_BATCH = 2


def gate_figure(result: "DriftResult") -> tuple[str, float, bool]:
    """The one number an attempt is ranked by when none passes: (name, value, higher is better).

    The figure follows the budget: centred cosine for random weights, top-1 drop with labels,
    top-1 agreement without."""
    if result.budget.min_centred_cosine is not None:
        return "centred cosine", result.centred_cosine if result.centred_cosine is not None else -1.0, True
    if result.top1 is not None:
        return "top-1 drop (points)", result.ref_top1 - result.top1, False
    return "top-1 agreement", result.agreement, True


def run_gate(ctx: "BuildContext", fp32_onnx: Path, amax: dict, output: Path) -> dict:
    """Write the gated Q/DQ model to `output`; return the gate's record (ranking, attempts)."""
    import numpy as np

    from pipeline.drift import compare
    from pipeline.stages.quantize.qdq import describe_placement, write_qdq_model
    from pipeline.stages.quantize.sensitivity import fallback, rank_layers
    from pipeline.stages.quantize.options import qdq_options
    from pipeline.stages.quantize.overflow import host_int8_saturates_tensorrt_model
    from pipeline.executor.work import onnxruntime_spec, openvino_spec
    from targets.openvino import convert_to_ir

    q = ctx.config.quantization
    hint = ctx.deployed_openvino_hint
    # A GPU target's model on a CPU that would saturate it: ONNX Runtime's exact arithmetic, no OpenVINO.
    exact = host_int8_saturates_tensorrt_model(ctx.config)
    decision_count = len(ctx.decision_records)

    def on_decision_images(spec, what: str):  # through the executor: locally, or sharded on Ray
        return ctx.evaluate(spec, decision_count, what, kind="gate decision")

    reference = on_decision_images(onnxruntime_spec(fp32_onnx, ctx.threads), f"FP32 ONNX on {decision_count} gate decision images")
    expected = reference.logits
    labels = reference.labels if ctx.uses_imagenet_labels(expected.shape[1]) else np.full_like(reference.labels, -1)
    labelled = bool((labels >= 0).any())

    def judge(stage: str, logits: np.ndarray) -> "DriftResult":
        return compare(stage, expected, logits, labels, ctx.config.gate_budget(stage, ctx.random_weights, labelled))

    # Beside the stage's output, not in /tmp: Ray workers on other nodes open the attempts from the build folder.
    scratch = Path(tempfile.mkdtemp(prefix="int8-gate-", dir=output.parent))
    try:
        options = qdq_options(ctx.config)
        write_qdq_model(fp32_onnx, amax, scratch / "all.onnx", **options)
        rounding, adaround = _adaround(ctx, fp32_onnx, scratch / "all.onnx", output.parent) if q.adaround else (None, None)
        if rounding:  # bias correction then measures the shifts of the weights that will run
            options["weight_rounding"] = rounding
            write_qdq_model(fp32_onnx, amax, scratch / "all.onnx", **options)
        shifts = _bias_shifts(ctx, fp32_onnx, scratch / "all.onnx", output.parent) if q.bias_correction else None
        if shifts:  # rank the layers as they will run: with their corrected biases
            write_qdq_model(fp32_onnx, amax, scratch / "all.onnx", bias_shifts=shifts, **options)
        sample = ctx.preprocessing.normalize(ctx.calibration.crops[: q.sensitivity_images])
        with ctx.reporter.status(f"ranking layer sensitivity on {len(sample)} calibration images"):
            ranking = rank_layers(fp32_onnx, scratch / "all.onnx", sample, RANKING_BATCH, ctx.threads)

        def evaluate(excluded: tuple[str, ...]):
            path = scratch / f"attempt-{len(excluded)}.onnx"
            write_qdq_model(fp32_onnx, amax, path, excluded, bias_shifts=shifts, **options)
            on_ort = judge("quantize", on_decision_images(onnxruntime_spec(path, ctx.threads, exact=exact),
                                                          f"INT8 ONNX Runtime, {len(excluded)} layers in float").logits)
            name, figure, higher = gate_figure(on_ort)
            on_openvino = None
            if not exact:
                xml = convert_to_ir(path, scratch / f"attempt-{len(excluded)}.xml", "fp32")
                on_openvino = judge("openvino_int8", on_decision_images(
                    openvino_spec(xml, hint, ctx.threads), f"INT8 OpenVINO, {len(excluded)} layers in float").logits)
                _, ov_figure, _ = gate_figure(on_openvino)
                figure = min(figure, ov_figure) if higher else max(figure, ov_figure)
            judged = [result for result in (on_ort, on_openvino) if result is not None]
            passed = all(result.passed for result in judged)
            for attempt_file in scratch.glob(f"attempt-{len(excluded)}.*"):  # Inception: 170 MB each
                attempt_file.unlink()
            verdict = "within budget" if passed else "over budget: " + "; ".join(f for r in judged for f in r.failures)
            ctx.reporter.say(f"  INT8 gate, {len(excluded)} layers in float: {name} {figure:.4g} ({verdict})")
            return passed, figure, {"onnxruntime": on_ort.as_dict(),
                                    "openvino": on_openvino.as_dict() if on_openvino is not None else None,
                                    "figure": name, "higher_is_better": higher}

        budget = ctx.config.gate_budget("quantize", ctx.random_weights, labelled)
        higher_is_better = budget.min_centred_cosine is not None or not labelled
        result = fallback(evaluate, ranking, q.max_fallback_layers, q.fallback_group, higher_is_better=higher_is_better)
        record = {
            "passed": result.passed,
            "decided_on": {"images": len(expected), "digest": reference.digest(), "labelled": labelled,
                           "reference": f"{'equalized' if q.equalization else 'simplified'} FP32 ONNX in ONNX Runtime",
                           "budgets": {stage: ctx.config.gate_budget(stage, ctx.random_weights, labelled).as_dict()
                                       for stage in ("quantize", "openvino_int8")}},
            "excluded_layers": list(result.excluded),
            "bias_correction": shifts is not None,
            **({"openvino_skipped": "this CPU has no VNNI: its INT8 kernels saturate pair sums that TensorRT "
                                    "computes in int32, so ONNX Runtime judged the model in its exact arithmetic"}
               if exact else {}),
            "adaround": adaround,
            "before": result.attempts[0].as_dict(),
            "after": result.best.as_dict(),
            "attempts": [a.as_dict() for a in result.attempts],
            "ranking": [layer.as_dict() for layer in ranking],
        }
        if not result.passed:
            best = result.best
            raise DriftError(
                f"{ctx.model_name}: INT8 stays over budget with up to {len(result.attempts[-1].excluded)} layers in float; "
                f"best reached: {best.details['figure']} {best.figure:.4g} with {len(best.excluded)} layers in float "
                f"on {len(expected)} gate decision images (budgets: drift.quantize, drift.openvino_int8, drift.gate; "
                f"more fallback: quantization.max_fallback_layers)")
        summary = write_qdq_model(fp32_onnx, amax, output, result.excluded, bias_shifts=shifts, **options)
        # The stage's drift check: the chosen model, once, on the evaluation images.
        np.save(output.parent / LOGITS_FILE, ctx.evaluate(onnxruntime_spec(output, ctx.threads, exact=exact),
                                                          q.evaluation_images,
                                                          "INT8 ONNX Runtime, the chosen model").logits)
        record["placement"] = describe_placement(output)
        record["summary"] = summary.as_dict()
        return record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _bias_shifts(ctx: "BuildContext", fp32_onnx: Path, qdq_onnx: Path, folder: Path) -> dict:
    """Bias correction's shifts, measured on calibration images and kept beside the model (the bundle's
    fallback variant and the report's calibration comparison reuse them)."""
    from pipeline.stages.quantize.bias import BIAS_CORRECTION_IMAGES, SHIFTS_FILE, save_shifts, weight_rounding_shifts

    crops = ctx.calibration.crops[:BIAS_CORRECTION_IMAGES]
    size = ctx.config.data.batch_size
    batches = [ctx.preprocessing.normalize(crops[i:i + size]) for i in range(0, len(crops), size)]
    with ctx.reporter.status(f"bias correction: mean output shifts on {len(crops)} calibration images"):
        shifts = weight_rounding_shifts(fp32_onnx, qdq_onnx, batches, ctx.threads)
    save_shifts(shifts, folder / SHIFTS_FILE)
    return shifts


def _adaround(ctx: "BuildContext", fp32_onnx: Path, qdq_onnx: Path, folder: Path) -> tuple[dict, dict]:
    """AdaRound's int8 weights, learnt on calibration images and kept beside the model (the bundle's fallback
    variant and the report's calibration comparison reuse them), and the facts of the run for gate.json."""
    from pipeline.stages.quantize.adaround import ADAROUND_IMAGES, ROUNDING_FILE, adaround_weights, save_rounding

    crops = ctx.calibration.crops[:ADAROUND_IMAGES]
    size = ctx.config.data.batch_size
    batches = [ctx.preprocessing.normalize(crops[i:i + size]) for i in range(0, len(crops), size)]
    with ctx.reporter.status(f"AdaRound: weight rounding learnt per Conv on {len(crops)} calibration images"):
        rounding, facts = adaround_weights(fp32_onnx, qdq_onnx, batches, ctx.threads, seed=ctx.config.data.seed)
    ctx.reporter.say(f"  AdaRound: {facts['layers']} Convs, {facts.get('iterations', 0)} steps each, "
                     f"{facts.get('seconds', 0.0):.0f} s; {100 * facts.get('weights_changed', 0.0):.1f}% of weights "
                     f"rounded the other way; {len(facts.get('kept_nearest', []))} Convs kept nearest rounding")
    save_rounding(rounding, folder / ROUNDING_FILE)
    return rounding, facts
