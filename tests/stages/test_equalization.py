"""Cross-layer equalization (quantization.equalization): on real ONNX graphs run in ONNX Runtime, the rewrite
leaves the FP32 outputs unchanged, balances the per-channel weight ranges of every equalized pair, and leaves
pairs through a ReLU6 (Clip) as they were; the option off keeps the stage graph as it was; on, an INT8 build
passes every drift check with the equalized graph proven equal to the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pipeline.stages.quantize.equalization import conv_pairs, equalize_model  # noqa: E402
from targets.onnxruntime import OnnxRuntimeRunner  # noqa: E402

CLIP_REASON = "clip between the convs (ReLU6: not scale-equivariant)"


def _conv(name, x, w, b, out, **attrs):
    return helper.make_node("Conv", [x, w, b], [out], name=name, **attrs)


def unbalanced_graph() -> onnx.ModelProto:
    """input (3 ch) -> conv_a 1x1 (8) -> Relu -> zero Pad -> depthwise 3x3 (8) -> pointwise 1x1 (6) -> Clip(0, 6)
    -> conv_d 1x1 (4) -> output; conv_a also feeds nothing else. Output channel i of conv_a and of the depthwise
    conv carry weights scaled by 10^(i/2 - 2): ranges four decades apart, as after folding batch norm."""
    rng = np.random.default_rng(0)
    spread = (10.0 ** (np.arange(8) / 2 - 2)).astype(np.float32)
    weights = {
        "wa": rng.standard_normal((8, 3, 1, 1)).astype(np.float32) * spread.reshape(8, 1, 1, 1),
        "ba": rng.standard_normal(8).astype(np.float32) * spread,
        "wdw": rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * spread[::-1].reshape(8, 1, 1, 1),
        "bdw": rng.standard_normal(8).astype(np.float32) * 0.1,
        "wpw": rng.standard_normal((6, 8, 1, 1)).astype(np.float32),
        "bpw": rng.standard_normal(6).astype(np.float32),
        "wd": rng.standard_normal((4, 6, 1, 1)).astype(np.float32),
        "bd": np.zeros(4, np.float32),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
    }
    nodes = [
        _conv("conv_a", "input", "wa", "ba", "a"),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node("Pad", ["a_relu", "pads"], ["a_pad"], name="pad", mode="constant"),
        _conv("depthwise", "a_pad", "wdw", "bdw", "dw", group=8, kernel_shape=[3, 3]),
        _conv("pointwise", "dw", "wpw", "bpw", "pw"),
        helper.make_node("Clip", ["pw", "zero", "six"], ["pw_clip"], name="relu6"),
        _conv("conv_d", "pw_clip", "wd", "bd", "output"),
    ]
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    initializers += [numpy_helper.from_array(np.array(0, np.float32), "zero"),
                     numpy_helper.from_array(np.array(6, np.float32), "six")]
    graph = helper.make_graph(nodes, "unbalanced", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 12, 12])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 4, 12, 12])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _weights(model) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _run(model, path, x) -> np.ndarray:
    onnx.save(model, str(path))
    runner = OnnxRuntimeRunner(path, threads=1)
    try:
        return next(iter(runner.run({"input": x}).values()))
    finally:
        runner.close()


def _spread(ranges: np.ndarray) -> float:
    """max / min of per-channel ranges: 1 when balanced."""
    return float(ranges.max() / ranges.min())


def test_equalization_keeps_the_outputs_and_balances_the_ranges(tmp_path):
    before = unbalanced_graph()
    after = unbalanced_graph()
    summary = equalize_model(after)
    assert [(p.first, p.second, p.through) for p in summary.equalized] == [
        ("conv_a", "depthwise", ("Relu", "Pad")), ("depthwise", "pointwise", ())]
    assert [(p.first, p.second) for p in summary.skipped[CLIP_REASON]] == [("pointwise", "conv_d")]
    assert summary.rounds > 1 and summary.last_round_max_change < 1e-3  # a chain: the scales settle in rounds

    x = np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32)
    expected, got = _run(before, tmp_path / "before.onnx", x), _run(after, tmp_path / "after.onnx", x)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()

    w0, w1 = _weights(before), _weights(after)
    # Pair conv_a -> depthwise: output channel i of conv_a against channel i of the depthwise conv.
    a0, a1 = np.abs(w0["wa"]).max(axis=(1, 2, 3)), np.abs(w1["wa"]).max(axis=(1, 2, 3))
    pw0, pw1 = np.abs(w0["wpw"]).max(axis=(0, 2, 3)), np.abs(w1["wpw"]).max(axis=(0, 2, 3))
    dw0, dw1 = np.abs(w0["wdw"]).max(axis=(1, 2, 3)), np.abs(w1["wdw"]).max(axis=(1, 2, 3))
    assert _spread(a1) < _spread(a0) / 100 and _spread(dw1) < _spread(dw0) / 100  # were 10^3.5 apart
    assert not np.allclose(pw0, pw1)  # the pointwise conv took its share
    # The depthwise conv sits in two pairs: after the rounds channel i has one range in all three convs.
    np.testing.assert_allclose(a1, dw1, rtol=1e-3)
    np.testing.assert_allclose(dw1, pw1, rtol=1e-3)
    # The pair through the Clip keeps its weights bit for bit (conv_d; pointwise's bias, its output side).
    np.testing.assert_array_equal(w0["wd"], w1["wd"])
    np.testing.assert_array_equal(w0["bpw"], w1["bpw"])


def test_clip_pairs_and_branching_outputs_are_left_alone():
    model = unbalanced_graph()
    graph = model.graph
    # conv_a's output also read by the graph output: no pair may scale it.
    graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 8, 12, 12]))
    pairs, skipped = conv_pairs(graph)
    assert [(p.first, p.second) for p in pairs] == [("depthwise", "pointwise")]
    assert list(skipped) == [CLIP_REASON]
    untouched = unbalanced_graph()
    for node in untouched.graph.node:  # every activation a ReLU6: nothing to equalize
        if node.op_type in ("Relu",):
            node.op_type = "Clip"
            node.input.extend(["zero", "six"])
    pairs, skipped = conv_pairs(untouched.graph)
    assert [(p.first, p.second) for p in pairs] == [("depthwise", "pointwise")]
    assert len(skipped[CLIP_REASON]) == 2


@pytest.fixture(scope="module")
def lite0_fp32(tmp_path_factory):
    from tests.stages.test_quantize import export_lite0

    return export_lite0(tmp_path_factory.mktemp("equalize") / "lite0.onnx")


def test_lite0_equalized_graph_computes_the_same_logits(lite0_fp32, imagenet, tmp_path):
    """EfficientNet-Lite0 (ReLU6 everywhere): the two pairs without an activation between them (a projection conv
    read by the next block's expansion conv alone) are equalized, the 32 through a ReLU6 are not; the logits of
    16 val images stay equal."""
    from tests.stages.test_quantize import lite0_images

    model = onnx.load(lite0_fp32)
    summary = equalize_model(model)
    assert len(summary.equalized) == 2 and all(pair.through == () for pair in summary.equalized)
    assert len(summary.skipped[CLIP_REASON]) == 32
    _, images, _ = lite0_images(imagenet, calibration=1, evaluation=16)
    expected = _run(onnx.load(lite0_fp32), tmp_path / "plain.onnx", images)
    got = _run(model, tmp_path / "equalized.onnx", images)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_option_off_keeps_the_stage_graph_and_on_adds_the_lossless_equalize_stage(tmp_path):
    from pipeline.config import load_config
    from pipeline.stages import stages_for

    for target in ("cpu", "jetson"):
        off = load_config(None, {"target": target, "precision": "int8"})
        stages = {stage.name: stage for stage in stages_for(off)}
        assert "equalize" not in stages
        assert stages["calibrate"].inputs == ("simplify",) and stages["quantize"].inputs[0] == "simplify"
        # The equalization code is not part of any key when off: editing it rebuilds nothing.
        assert not any("equalization" in module for stage in stages.values() for module in stage.modules)
        assert not any("equalization" in str(stage.params) for stage in stages.values())

        on = load_config(None, {"target": target, "precision": "int8", "quantization": {"equalization": True}})
        names = [stage.name for stage in stages_for(on)]
        assert names.index("simplify") < names.index("equalize") == names.index("calibrate") - 1
        stages = {stage.name: stage for stage in stages_for(on)}
        assert stages["calibrate"].inputs == ("equalize",) and stages["quantize"].inputs[0] == "equalize"
        assert "equalize" in stages["bundle"].inputs
        assert on.budget("equalize", False) == on.budget("simplify", False)  # the lossless budget
    fp32 = load_config(None, {"precision": "fp32", "quantization": {"equalization": True}})
    assert "equalize" not in [stage.name for stage in stages_for(fp32)]  # nothing to quantize


def test_int8_build_with_equalization_passes_its_drift_checks(tmp_path, imagenet):
    """A small Lite0 INT8 build with quantization.equalization: the equalize stage is checked on the lossless
    budget, calibration and the gate read the equalized graph, and every later stage passes."""
    from pipeline.cli import main
    from tests.builds import build_with_option

    root, manifest, args = build_with_option(tmp_path, imagenet, "cpu", "equalization: true", ("quantize", "openvino_int8"))
    stages = manifest["stages"]
    assert list(stages).index("equalize") == list(stages).index("calibrate") - 1
    equalize = stages["equalize"]
    assert equalize["drift"]["passed"] and equalize["drift"]["agreement"] == 1.0
    assert equalize["facts"]["equalized_pairs"] == 2 and equalize["facts"]["skipped_pairs"] == {CLIP_REASON: 32}
    assert all(stage["drift"]["passed"] for stage in stages.values() if stage["drift"])
    calibrate = json.loads((root / "calibrate" / "stage.json").read_text())
    assert calibrate["inputs"] == {"equalize": equalize["key"]}
    # The Q/DQ model carries the equalized weights: its projection conv's weights are not the simplified ones.
    equalized, quantized = onnx.load(str(root / "equalize" / "model.onnx")), onnx.load(str(root / "quantize" / "model.onnx"))
    first = equalize["facts"]["pairs"][0]["first"]
    plain_graph = onnx.load(str(root / "simplify" / "model.onnx")).graph
    name = next(n.input[1] for n in plain_graph.node if n.name == first)
    plain_w = _weights(onnx.load(str(root / "simplify" / "model.onnx")))[name]
    assert not np.allclose(_weights(equalized)[name], plain_w)
    assert {n.name for n in quantized.graph.node} >= {n.name for n in equalized.graph.node if n.op_type == "Conv"}
    assert main(args) == 0 and json.loads((root / "manifest.json").read_text())["built_this_run"] == []
    # report --compare-calibration quantizes the equalized graph too: the build's own method reproduces its figures.
    assert main(["report", str(tmp_path / "build"), "--compare-calibration", "--latency-seconds", "0.2"]) == 0
    comparison = json.loads((root / "report" / "report.json").read_text())["calibration_comparison"]
    assert [row["method"] for row in comparison["methods"]] == ["minmax", "percentile", "entropy", "mse"]
    assert comparison["same_images_as_build"]
    own = next(row for row in comparison["methods"] if row["build_method"])
    assert own["drift"]["cosine"] == pytest.approx(stages["quantize"]["drift"]["cosine"], abs=1e-6)
    assert own["drift"]["agreement"] == stages["quantize"]["drift"]["agreement"]
