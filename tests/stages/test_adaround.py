"""AdaRound on EfficientNet-Lite0 (real weights, real images): the learnt INT8 weights stay within one step of
nearest rounding and inside the INT8 range, reconstruct each Conv's FP32 output on held-out calibration images at
least as well as nearest rounding, and only replace weight initializers of the Q/DQ model; with the option off
the Q/DQ model is the one nearest rounding writes, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import numpy_helper  # noqa: E402

from calibration.statistics import TensorReader  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.stages.quantize.adaround import (QMAX, QMIN, _int8_layers, _layer_output, adaround_weights,  # noqa: E402
                                                apply_rounding)
from pipeline.stages.quantize.bias import _conv  # noqa: E402
from pipeline.stages.quantize.qdq import write_qdq_model  # noqa: E402
from tests.stages.test_quantize import quantized_lite0  # noqa: E402

# A plain 3x3 stride-2 conv (the stem), depthwise 3x3 and 5x5 convs, expansion and projection 1x1 convs
# (with and without a ReLU6 after them): every kind of Conv Lite0 has.
LAYERS = ("/_conv_stem/Conv", "/_blocks.0/_depthwise_conv/Conv", "/_blocks.0/_project_conv/Conv",
          "/_blocks.1/_expand_conv/Conv", "/_blocks.4/_depthwise_conv/Conv", "/_blocks.5/_project_conv/Conv")


def batches(images, size: int = 8) -> list[np.ndarray]:
    return [images[i:i + size] for i in range(0, len(images), size)]


@pytest.fixture(scope="module")
def lite0(tmp_path_factory, imagenet):
    quantized = quantized_lite0(tmp_path_factory.mktemp("adaround"), imagenet)
    rounding, facts = adaround_weights(quantized["fp32"], quantized["qdq"], batches(quantized["calibration"][:32]),
                                       threads=2, iterations=300, only=LAYERS)
    return {**quantized, "rounding": rounding, "facts": facts, "held_out": quantized["calibration"][32:64]}


def int8_weights(model) -> dict[str, np.ndarray]:
    """Conv node name -> its int8 weight initializer in a Q/DQ model."""
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dequantize = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: initializers[dequantize[n.input[1]].input[0]] for n in model.graph.node
            if n.op_type == "Conv" and n.input[1] in dequantize and dequantize[n.input[1]].input[0] in initializers}


def test_learnt_weights_are_int8_within_one_step_of_nearest(lite0):
    nearest = int8_weights(onnx.load(str(lite0["qdq"])))
    assert set(lite0["rounding"]) == set(LAYERS) and lite0["facts"]["layers"] == len(LAYERS)
    changed = 0
    for name, learnt in lite0["rounding"].items():
        assert learnt.dtype == np.int8 and learnt.shape == nearest[name].shape
        assert learnt.min() >= QMIN and learnt.max() <= QMAX
        step = np.abs(learnt.astype(np.int32) - nearest[name].astype(np.int32))
        assert step.max() <= 1
        changed += int((step > 0).sum())
    assert changed > 0  # it does round some weights the other way


def test_layer_output_error_on_held_out_images_is_not_above_nearest(lite0):
    """Per Conv, on 32 calibration images it never saw: mean squared error of f(conv(x, s*q) + b) against the FP32
    f(conv(x, W) + b), f the Conv's own ReLU6 where it has one, over whole feature maps."""
    fp32, qdq = onnx.load(str(lite0["fp32"])), onnx.load(str(lite0["qdq"]))
    layers = _int8_layers(qdq, fp32)
    reader = TensorReader(Path(lite0["fp32"]), list(dict.fromkeys(layers[n]["node"].input[0] for n in LAYERS)), 2)
    errors = {name: [0.0, 0.0] for name in LAYERS}
    for batch in batches(lite0["held_out"]):
        values = dict(zip(reader.names, reader.run(batch)))
        for name in LAYERS:
            layer = layers[name]
            x = torch.from_numpy(values[layer["node"].input[0]])
            scale = torch.from_numpy(layer["scale"]).reshape(-1, 1, 1, 1)

            def output(weight):
                out = _conv(x, weight, layer["node"]) + torch.from_numpy(layer["bias"]).reshape(1, -1, 1, 1)
                low, high = layer["activation"] or (-np.inf, np.inf)
                return out.clamp(min=float(low), max=float(high)) if layer["activation"] else out

            target = output(torch.from_numpy(layer["weight"]))
            for index, q in enumerate((layer["nearest"], lite0["rounding"][name])):
                errors[name][index] += float((output(scale * torch.from_numpy(q.astype(np.float32))) - target)
                                             .pow(2).mean())
    for name, (nearest, learnt) in errors.items():
        assert learnt <= nearest * 1.0001, f"{name}: AdaRound {learnt:.3g} against nearest {nearest:.3g}"
    assert sum(learnt / nearest for nearest, learnt in errors.values()) < 0.8 * len(errors)  # a real gain


def test_sampled_output_matches_the_onnx_conv(lite0):
    """The im2col matmul the optimisation runs equals the Conv (pads, strides, groups) at those positions."""
    from pipeline.stages.quantize.adaround import _sample_patches

    fp32, qdq = onnx.load(str(lite0["fp32"])), onnx.load(str(lite0["qdq"]))
    layers = _int8_layers(qdq, fp32)
    reader = TensorReader(Path(lite0["fp32"]), [layers[n]["node"].input[0] for n in LAYERS[:2]], 2)
    values = dict(zip(reader.names, reader.run(lite0["held_out"][:2])))
    for name in LAYERS[:2]:
        layer = layers[name]
        x = values[layer["node"].input[0]]
        full = _conv(torch.from_numpy(x), torch.from_numpy(layer["weight"]), layer["node"]).flatten(2)  # (N, C, L)
        generator = np.random.default_rng(1)
        patches, target = (torch.from_numpy(a) for a in _sample_patches(x, layer, 5, generator))
        picked = np.random.default_rng(1).integers(0, full.shape[2], size=(2, 5))
        expected = torch.stack([full[i, :, picked[i]].T for i in range(2)]).reshape(10, -1)
        got = _layer_output(patches, torch.from_numpy(layer["weight"]), torch.zeros(full.shape[1]), None)
        assert torch.allclose(got, expected, atol=1e-4)
        bias = torch.from_numpy(layer["bias"])
        assert torch.allclose(target, _layer_output(patches, torch.from_numpy(layer["weight"]), bias, layer["activation"]),
                              atol=1e-5)  # the FP32 target: with bias and the Conv's ReLU6


def test_rounded_model_differs_in_int8_weights_only_and_option_off_is_nearest(lite0, tmp_path):
    plain_bytes = Path(lite0["qdq"]).read_bytes()
    # Off (None or empty) the writer gives nearest rounding's model, byte for byte; so does "rounding" that holds
    # nearest rounding's own values (replacing initializers touches nothing else).
    nearest = {name: w for name, w in int8_weights(onnx.load(str(lite0["qdq"]))).items() if name in LAYERS}
    for i, rounding in enumerate((None, {}, nearest)):
        write_qdq_model(lite0["fp32"], lite0["amax"], tmp_path / f"off{i}.onnx", weight_rounding=rounding)
        assert (tmp_path / f"off{i}.onnx").read_bytes() == plain_bytes
    write_qdq_model(lite0["fp32"], lite0["amax"], tmp_path / "ada.onnx", weight_rounding=lite0["rounding"])
    plain, rounded = onnx.load(str(lite0["qdq"])), onnx.load(str(tmp_path / "ada.onnx"))
    assert [(n.op_type, list(n.input)) for n in plain.graph.node] == [(n.op_type, list(n.input)) for n in rounded.graph.node]
    plain_init = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer}
    rounded_init = {i.name: numpy_helper.to_array(i) for i in rounded.graph.initializer}
    assert plain_init.keys() == rounded_init.keys()
    learnt = int8_weights(rounded)
    for name in LAYERS:
        assert np.array_equal(learnt[name], lite0["rounding"][name])
    differing = [name for name in plain_init if not np.array_equal(plain_init[name], rounded_init[name])]
    assert differing and all(rounded_init[name].dtype == np.int8 for name in differing)


def test_stale_weights_are_refused(lite0):
    model = onnx.load(str(lite0["qdq"]))
    name = LAYERS[0]
    far = lite0["rounding"][name].astype(np.int32)
    far[0, 0, 0, 0] += 3
    with pytest.raises(PipelineError, match="more than one step"):
        apply_rounding(model, {name: np.clip(far, QMIN, QMAX).astype(np.int8)}, [name])
    with pytest.raises(PipelineError, match="shape"):
        apply_rounding(model, {name: lite0["rounding"][name][:1]}, [name])


@pytest.mark.slow
def test_int8_build_with_adaround_ships_the_learnt_weights_and_corrects_biases_with_them(tmp_path, imagenet,
                                                                                      monkeypatch):
    """A small Lite0 INT8 build with quantization.adaround: the shipped Q/DQ model carries quantize/adaround.npz's
    weights, and bias correction's saved shifts are those of these weights, not of nearest rounding. (Fewer steps
    and samples than a real build: this checks where the weights go, not how good they are; 800 steps of the
    shipped setting take minutes on 2 cores.)"""
    import functools

    from calibration.statistics import CalibrationTable
    from pipeline.stages.quantize import adaround

    monkeypatch.setattr(adaround, "adaround_weights",
                        functools.partial(adaround.adaround_weights, iterations=200, positions=16))
    from pipeline.config import load_config
    from pipeline.context import BuildContext
    from pipeline.plan import BuildPlan
    from pipeline.progress import Reporter
    from pipeline.stages.quantize.bias import BIAS_CORRECTION_IMAGES, saved_shifts, weight_rounding_shifts
    from pipeline.stages.quantize.options import qdq_options
    from tests.builds import build_with_option

    root, manifest, _ = build_with_option(tmp_path, imagenet, "cpu", "adaround: true", ("quantize", "openvino_int8"))
    assert all(stage["drift"]["passed"] for stage in manifest["stages"].values() if stage["drift"])
    gate = json.loads((root / "quantize" / "gate.json").read_text())
    assert gate["adaround"]["layers"] == 49 and gate["bias_correction"]
    with np.load(root / "quantize" / "adaround.npz") as data:
        rounding = {name: data[name] for name in data.files}
    shipped = int8_weights(onnx.load(str(root / "quantize" / "model.onnx")))
    assert all(np.array_equal(shipped[name], rounding[name]) for name in shipped)
    # Recompute the shifts on the build's first calibration images from a Q/DQ model with the learnt weights.
    config = load_config(tmp_path / "option.yaml", {"data": {"imagenet": str(imagenet)}, "build_dir": str(tmp_path / "build"),
                                                    "models": ["efficientnet_lite0"], "target": "cpu"})
    ctx = BuildContext(BuildPlan(config, "efficientnet_lite0"), Reporter(quiet=True))
    crops = ctx.calibration.crops[:BIAS_CORRECTION_IMAGES]
    images = [ctx.preprocessing.normalize(crops[i:i + 8]) for i in range(0, len(crops), 8)]
    amax = CalibrationTable.load(root / "calibrate" / "calibration.json").amax
    fp32 = root / "simplify" / "model.onnx"
    options = qdq_options(config)  # as the build wrote it (overflow_fix: auto follows this CPU)
    write_qdq_model(fp32, amax, tmp_path / "learnt.onnx", weight_rounding=rounding, **options)
    write_qdq_model(fp32, amax, tmp_path / "nearest.onnx", **options)
    saved = saved_shifts(root / "quantize")
    learnt = weight_rounding_shifts(fp32, tmp_path / "learnt.onnx", images, 2)
    nearest = weight_rounding_shifts(fp32, tmp_path / "nearest.onnx", images, 2)
    assert set(saved) == set(learnt)
    for name, shift in saved.items():
        assert np.allclose(shift, learnt[name], atol=1e-5)
    assert any(not np.allclose(saved[name], nearest[name], atol=1e-5) for name in saved)
