"""Layer sensitivity ranking on EfficientNet-Lite0 (real weights, real images) and the fallback loop."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pipeline.stages.quantize.qdq import write_qdq_model  # noqa: E402
from pipeline.stages.quantize.sensitivity import LayerSensitivity, fallback, rank_layers  # noqa: E402
from tests.stages.test_quantize import logit_sqnr_db, quantized_lite0, run_logits  # noqa: E402


@pytest.fixture(scope="module")
def lite0(tmp_path_factory, imagenet):
    quantized = quantized_lite0(tmp_path_factory.mktemp("sensitivity"), imagenet)
    return {**quantized, "ranking": rank_layers(quantized["fp32"], quantized["qdq"], quantized["calibration"][:16], threads=2)}


def test_one_entry_per_quantized_conv_worst_first(lite0):
    ranking = lite0["ranking"]
    assert sorted(layer.node for layer in ranking) == sorted(lite0["summary"].quantized_nodes)
    scores = [layer.local_sqnr_db for layer in ranking]
    assert scores == sorted(scores)
    for layer in ranking:
        assert 10 < layer.local_sqnr_db < 60, layer  # one INT8 layer: tens of dB, never exact
        assert math.isfinite(layer.sqnr_db)
        assert layer.added_db == pytest.approx(min(layer.input_sqnr_db, 100.0) - layer.sqnr_db)
    first = next(layer for layer in ranking if layer.node == "/_conv_stem/Conv")
    assert first.input_sqnr_db == math.inf  # it reads the network input: no upstream error
    assert ranking[0].as_dict()["node"] == ranking[0].node


def test_ranking_is_deterministic(lite0):
    again = rank_layers(lite0["fp32"], lite0["qdq"], lite0["calibration"][:16], threads=2)
    assert again == lite0["ranking"]


def test_keeping_the_worst_layers_in_float_helps_more_than_the_best(lite0):
    """The ranking is useful: the 4 worst layers in float gain more logit SQNR than the 4 best."""
    images = lite0["evaluation"]
    reference = run_logits(lite0["fp32"], images)
    nodes = [layer.node for layer in lite0["ranking"]]

    def sqnr_without(excluded):
        path = lite0["folder"] / "fallback.onnx"
        write_qdq_model(lite0["fp32"], lite0["amax"], path, exclude_nodes=excluded)
        return logit_sqnr_db(reference, run_logits(path, images))

    everything = logit_sqnr_db(reference, run_logits(lite0["qdq"], images))
    worst, best = sqnr_without(nodes[:4]), sqnr_without(nodes[-4:])
    # Measured: 19.0 dB all quantized, 21.0 dB without the 4 worst, 19.1 dB without the 4 best.
    assert worst - everything > 1.0
    assert worst - best > 1.0


# ---------------------------------------------------------------------------- fallback with a synthetic gate


def gate(needed: set[str], figures: dict[int, float] | None = None):
    """Passes once every layer of `needed` is excluded; the figure is the count excluded (or given)."""
    calls = []

    def evaluate(excluded):
        calls.append(excluded)
        figure = figures.get(len(excluded), 0.0) if figures else float(len(excluded))
        return needed <= set(excluded), figure, {"excluded": len(excluded)}

    return evaluate, calls


RANK = [f"conv{i}" for i in range(10)]


def test_fallback_that_passes_at_once_excludes_nothing():
    evaluate, calls = gate(set())
    result = fallback(evaluate, RANK, max_layers=5, group_size=2)
    assert result.passed and result.excluded == () and calls == [()]


def test_fallback_stops_as_soon_as_the_gate_passes():
    evaluate, calls = gate({"conv2"})
    result = fallback(evaluate, RANK, max_layers=8, group_size=2)
    assert result.passed
    assert result.excluded == ("conv0", "conv1", "conv2", "conv3")
    assert [len(c) for c in calls] == [0, 2, 4]
    assert [a.passed for a in result.attempts] == [False, False, True]
    assert result.as_dict()["attempts"][0]["details"] == {"excluded": 0}


def test_fallback_respects_max_layers_and_reports_the_best_attempt():
    figures = {0: 0.90, 3: 0.95, 6: 0.97, 7: 0.96}  # agreement: higher is better
    evaluate, calls = gate({"conv9"}, figures)
    result = fallback(evaluate, RANK, max_layers=7, group_size=3)
    assert not result.passed
    assert [len(c) for c in calls] == [0, 3, 6, 7]  # the last group is cut at max_layers
    assert result.best.figure == 0.97 and len(result.excluded) == 6
    assert result.as_dict()["best_figure"] == 0.97 and result.as_dict()["initial_figure"] == 0.90


def test_fallback_lower_is_better_and_ranking_objects():
    figures = {0: 2.0, 1: 0.8, 2: 1.5}  # top-1 drop in points: lower is better
    evaluate, _ = gate({"never"}, figures)
    rank = [LayerSensitivity(name, name + "_out", 30.0, 20.0, 25.0, 5.0) for name in RANK]
    result = fallback(evaluate, rank, max_layers=2, group_size=1, higher_is_better=False)
    assert not result.passed and result.excluded == ("conv0",) and result.best.figure == 0.8


def test_fallback_with_no_room_or_a_bad_group_size():
    evaluate, calls = gate({"conv0"})
    result = fallback(evaluate, RANK, max_layers=0, group_size=4)
    assert not result.passed and calls == [()]
    with pytest.raises(ValueError, match="group_size"):
        fallback(evaluate, RANK, max_layers=3, group_size=0)
    with pytest.raises(ValueError, match="twice"):
        fallback(evaluate, ["a", "a"], max_layers=3)
