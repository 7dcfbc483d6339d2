"""INT8 that x86 CPUs without VNNI cannot saturate (`quantization.overflow_fix`, the CPU target): how the CPU is
read, how `auto` resolves, what the rewrite writes, and, on EfficientNet-Lite0, that ONNX Runtime's and
OpenVINO's INT8 kernels then compute what the Q/DQ model says on any CPU."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.stages.quantize.overflow import overflow_fix  # noqa: E402
from pipeline.stages.quantize.qdq import write_qdq_model  # noqa: E402
from targets.cpu_features import cpu_flags, int8_pairs_saturate  # noqa: E402
from tests.stages.test_quantize import block_graph, lite0_images, logit_sqnr_db, minmax_amax, run_logits  # noqa: E402


def test_the_cpu_is_read_from_cpuinfo(tmp_path):
    def cpuinfo(text: str):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return cpu_flags(path)

    avx2 = cpuinfo("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert avx2 == {"fpu", "sse2", "avx", "avx2", "fma"}  # the first CPU's
    assert int8_pairs_saturate(avx2)  # AVX2 without VNNI: pair sums in int16
    for vnni in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert not int8_pairs_saturate(avx2 | {vnni})
    assert cpuinfo("processor\t: 0\nFeatures\t: fp asimd asimddp\n") is None  # ARM: no x86 flags
    assert not int8_pairs_saturate(frozenset())
    assert cpu_flags(tmp_path / "missing") is None


def test_auto_follows_this_cpu_and_only_the_cpu_target_takes_it():
    def resolved(choice: str, target: str = "cpu") -> bool:
        return overflow_fix(load_config(None, {"target": target, "quantization": {"overflow_fix": choice}}))

    assert resolved("auto") == int8_pairs_saturate() and resolved("enable") and not resolved("disable")
    for target in ("jetson", "desktop-gpu"):  # TensorRT's INT8 accumulates in int32
        assert not resolved("enable", target)
    with pytest.raises(PipelineError, match="'quantization.overflow_fix' must be one of auto, enable, disable"):
        load_config(None, {"quantization": {"overflow_fix": "on"}})


def _max_pair_steps(q: np.ndarray) -> int:
    """The largest |q_i + q_j| of neighbouring int8 weights of one output channel, in either layout."""
    q = q.astype(np.int32)
    return max(int(np.abs(flat[:, :-1] + flat[:, 1:]).max()) for flat in
               (q.reshape(len(q), -1), np.moveaxis(q, 1, -1).reshape(len(q), -1)))


def test_neighbouring_weights_fit_a_pair_sum_and_the_rest_is_unchanged(tmp_path):
    """Every non-depthwise Conv's neighbouring int8 weights of one sign add up to at most 127 steps, so 255 * 128 fits int16
    with AdaRound's one step more; activations and the Convs that already fit keep their scales."""
    from pipeline.stages.quantize.overflow import PAIR_LEVELS, pair_safe_scales

    path = tmp_path / "block.onnx"
    onnx.save(block_graph(), str(path))
    images = np.random.default_rng(1).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    amax = minmax_amax(path, images)
    full, safe = tmp_path / "full.onnx", tmp_path / "safe.onnx"
    write_qdq_model(path, amax, full, unsigned=True)
    summary = write_qdq_model(path, amax, safe, unsigned=True, overflow_fix=True)
    model, plain = onnx.load(str(safe)), onnx.load(str(full))
    onnx.checker.check_model(model)
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    plain_arrays = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer}
    assert {name for name, a in arrays.items() if a.dtype != np.int8} == {
        name for name, a in plain_arrays.items() if a.dtype != np.int8}  # same pairs, same scale names
    dequantize = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    widened = 0
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        pair, weight = dequantize[conv.input[0]], dequantize[conv.input[1]]
        np.testing.assert_array_equal(arrays[pair.input[1]], plain_arrays[pair.input[1]])  # activations: 8 bits
        q, scale, plain_scale = arrays[weight.input[0]], arrays[weight.input[1]], plain_arrays[weight.input[1]]
        assert _max_pair_steps(q) <= PAIR_LEVELS + 1, conv.name
        assert np.all(scale >= plain_scale * (1 - 1e-6)) and np.all(scale <= 2 * plain_scale * 127 / PAIR_LEVELS)
        if not np.allclose(scale, plain_scale):
            widened += 1
            assert _max_pair_steps(plain_arrays[weight.input[0]]) > PAIR_LEVELS + 1  # it did not fit before
        else:
            np.testing.assert_array_equal(q, plain_arrays[weight.input[0]])
    assert widened == summary.overflow_fix_convs > 0
    # The scale of a channel: its largest neighbour sum over 126 steps, or its largest weight over 127.
    w = np.zeros((2, 2, 1, 2), np.float32)
    w[0, 0, 0] = [1.0, 1.0]  # neighbours in (I, kh, kw) order
    w[1, :, 0, 0] = [-1.0, -0.5]  # neighbours in (kh, kw, I) order, negative
    np.testing.assert_allclose(pair_safe_scales(w), [2.0 / 126, 1.5 / 126], rtol=1e-6)
    np.testing.assert_allclose(pair_safe_scales(np.array([[[[1.0]]], [[[0.0]]]], np.float32)), [1 / 127, 1.0])
    # Weights of opposite signs cannot add up (the inputs are never negative): the largest weight decides.
    np.testing.assert_allclose(pair_safe_scales(np.array([[[[1.0, -1.0, 1.0]]]], np.float32)), [1 / 127], rtol=1e-6)
    reference, quantized = run_logits(path, images), run_logits(safe, images)
    assert logit_sqnr_db(reference, quantized) > 15


def test_lite0s_int8_kernels_compute_the_qdq_model_with_the_fix(small_cpu_build, imagenet, tmp_path):
    """The small build's table, 32 val images: with the fix, ONNX Runtime's and OpenVINO's INT8 kernels give the
    Q/DQ model's exact logits on this CPU, whatever it is; without it, on a CPU whose pair sums saturate, they do
    not (measured on an AMD EPYC without VNNI: 7 dB against 20 dB exact)."""
    from calibration.statistics import CalibrationTable
    from targets.onnxruntime import OnnxRuntimeRunner
    from targets.openvino import OpenVinoRunner, convert_to_ir
    from targets.runner import predict

    fp32 = small_cpu_build.root / "simplify" / "model.onnx"
    amax = CalibrationTable.load(small_cpu_build.root / "calibrate" / "calibration.json").amax
    _, images, _ = lite0_images(imagenet, calibration=1, evaluation=32)
    figures = {}
    for fix in (True, False):
        path = tmp_path / f"fix-{fix}.onnx"
        write_qdq_model(fp32, amax, path, unsigned=True, overflow_fix=fix)
        # The model's own arithmetic: each DequantizeLinear and Conv in float, no INT8 kernel to saturate.
        exact = predict(OnnxRuntimeRunner(path, threads=2, exact=True), images, 16)
        runner = OpenVinoRunner(convert_to_ir(path, tmp_path / f"fix-{fix}.xml"), inference_precision="f32", threads=2)
        figures[fix] = {"onnxruntime": logit_sqnr_db(exact, run_logits(path, images)),
                        "openvino": logit_sqnr_db(exact, predict(runner, images, 8))}
    assert min(figures[True].values()) > 25, figures  # the kernels compute the model (fixed-point requantization aside)
    if not int8_pairs_saturate():
        pytest.skip(f"this CPU has VNNI (no int16 pair sums): the full-range model cannot saturate here {figures}")
    assert max(figures[False].values()) < 15, figures  # saturated: the IR computes something else
