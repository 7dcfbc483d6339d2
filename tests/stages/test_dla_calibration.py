"""The DLA calibration cache: a scale for every tensor DLA may run in INT8, from the same table as the Q/DQ ONNX.

On a small Inception-like block (stem conv, then a max-pool branch and a conv branch concatenated,
a conv, a residual Add, global pooling and the head), with ranges measured by the project's own
calibration code (`collect_ranges`) on real ImageNet crops, and the cache written by the device code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")


def inception_block(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)

    def conv(name, source, cin, cout, stride=1):
        w = numpy_helper.from_array(rng.normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32), f"{name}.w")
        b = numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"{name}.b")
        node = helper.make_node("Conv", [source, w.name, b.name], [f"{name}_out"], name=name, pads=[1, 1, 1, 1],
                                strides=[stride, stride])
        return node, [w, b]

    nodes, weights = [], []
    for name, source, cin, cout, stride in (("stem", "input", 3, 8, 2), ("branch", "stem_relu", 8, 8, 2)):
        node, w = conv(name, source, cin, cout, stride)
        nodes += [node, helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_relu")]
        weights += w
    nodes.insert(2, helper.make_node("MaxPool", ["stem_relu"], ["pool"], name="pool", kernel_shape=[3, 3],
                                     strides=[2, 2], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Concat", ["pool", "branch_relu"], ["mixed"], name="mixed", axis=1))
    node, w = conv("project", "mixed", 16, 16)
    weights += w
    nodes += [node, helper.make_node("Add", ["project_out", "mixed"], ["residual"], name="residual"),
              helper.make_node("Relu", ["residual"], ["residual_relu"], name="residual_relu"),
              helper.make_node("GlobalAveragePool", ["residual_relu"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["features"], name="flatten")]
    head = numpy_helper.from_array(rng.normal(0, 0.3, (10, 16)).astype(np.float32), "head.w")
    nodes.append(helper.make_node("Gemm", ["features", "head.w"], ["logits"], transB=1, name="head"))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], weights + [head])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_which_tensors_share_a_range(tmp_path):
    from pipeline.stages.quantize.dla import dla_tensors, shared_ranges

    model = inception_block(tmp_path / "block.onnx")
    assert dla_tensors(model) == ["input", "stem_out", "stem_relu", "pool", "branch_out", "branch_relu", "mixed",
                                  "project_out", "residual", "residual_relu", "gap"]
    assert shared_ranges(model) == {
        "stem_out": "stem_relu",  # Conv + ReLU fuse: the Conv output takes the ReLU's range
        "pool": "mixed",  # a pool branch ending in a Concat takes the Concat's range (Concat wins over MaxPool)
        "branch_relu": "mixed", "branch_out": "mixed",  # Concat inputs share one range, through the ReLU too
    }  # project_out feeds an Add, not a ReLU: its own range; so do residual and the pooled features


@pytest.fixture(scope="module")
def table(tmp_path_factory, imagenet):
    from calibration.imagenet import open_imagenet
    from calibration.images import load_images
    from calibration.preprocess import Preprocessing
    from calibration.statistics import collect_ranges
    from pipeline.stages.quantize.dla import dla_tensors, shared_ranges
    from pipeline.stages.quantize.qdq import quantized_activations

    model = inception_block(tmp_path_factory.mktemp("dla") / "block.onnx")
    pre = Preprocessing(crop=32, crop_pct=0.875)
    crops = load_images(open_imagenet(imagenet).evaluation.records[:16], pre).crops
    batches = [pre.normalize(crops[i:i + 8]) for i in range(0, len(crops), 8)]
    share = shared_ranges(model)  # as the calibrate stage of a Jetson build does
    dla = {"tensors": list(dict.fromkeys(dla_tensors(model) + list(share))), "share": share}
    qdq = quantized_activations(model)
    table = collect_ranges(model, list(dict.fromkeys(qdq + dla["tensors"])), batches, method="percentile", threads=1)
    from dataclasses import replace

    return model, qdq, replace(table, dla=dla)


def test_the_dla_cache_has_a_scale_for_every_int8_tensor(table, tmp_path):
    from calibration.statistics import CalibrationTable
    from targets.tensorrt.calibration_cache import (
        dla_amax_from_table,
        read_legacy_cache,
        write_legacy_cache,
    )

    model, qdq, calibrated = table
    calibrated.save(tmp_path / "calibration.json")
    loaded = CalibrationTable.load(tmp_path / "calibration.json")  # the dla section survives the round trip
    assert loaded.dla == calibrated.dla
    amax, warning = dla_amax_from_table(loaded.as_dict())
    assert warning is None
    _, scales = read_legacy_cache(write_legacy_cache(amax, "10.3.0", tmp_path / "calibration.cache"))
    assert set(qdq) == {"input", "stem_relu", "mixed"}  # what the Q/DQ model quantizes (Conv inputs)
    around = {"stem_out", "branch_out", "branch_relu", "project_out", "pool", "residual", "residual_relu", "gap"}
    assert set(qdq) | around <= set(scales)  # the Conv outputs, pools, Concat and Add around them too
    one = lambda name: np.float32(scales[name])  # noqa: E731
    assert one("pool") == one("branch_relu") == one("branch_out") == one("mixed")  # Concat inputs share one
    assert one("stem_out") == one("stem_relu")  # carried across the ReLU
    # Everything else keeps its own range from the same table the Q/DQ ONNX is written from.
    for name in set(scales) - set(calibrated.dla["share"]):
        assert one(name) == np.float32(calibrated.amax[name] / 127), name
    assert calibrated.amax["stem_out"] >= calibrated.amax["stem_relu"]  # the ReLU's range is the tighter one


def test_an_older_table_without_a_dla_section_warns(table):
    from targets.tensorrt.calibration_cache import dla_amax_from_table

    _, _, calibrated = table
    data = calibrated.as_dict()
    del data["dla"]
    amax, warning = dla_amax_from_table(data)
    assert set(amax) == set(calibrated.amax) and "FP16" in warning and "rebuild the bundle" in warning
    data["dla"] = {"tensors": ["nowhere"], "share": {}}
    with pytest.raises(Exception, match="bad 'dla' section"):
        dla_amax_from_table(data)


def test_the_calibrate_stage_of_a_jetson_build_records_the_dla_section(tmp_path, imagenet):
    """produce_calibrate itself, on the block, with a minimal build context: Jetson yes, desktop GPU no."""
    import types

    from calibration.imagenet import open_imagenet
    from calibration.images import load_images
    from calibration.preprocess import Preprocessing
    from calibration.statistics import CalibrationTable
    from pipeline.config import load_config
    from pipeline.executor.local import LocalExecutor
    from pipeline.executor.requests import Images
    from pipeline.layout import ONNX_FILE, TABLE_FILE
    from pipeline.stages import calibrate, stages_for

    source = inception_block(tmp_path / ONNX_FILE)
    pre = Preprocessing(crop=32, crop_pct=0.875)
    crops = load_images(open_imagenet(imagenet).evaluation.records[:8], pre).crops
    simplify = types.SimpleNamespace(path=lambda name: source)
    for target, with_dla in (("jetson", True), ("desktop-gpu", False)):
        config = load_config(overrides={"target": target, "precision": "int8"})
        (stage,) = [s for s in stages_for(config) if s.name == "calibrate"]
        assert stage.params["dla"] is with_dla  # part of the stage's cache key
        loaded = types.SimpleNamespace(crops=crops)
        recorded: list = []
        ctx = types.SimpleNamespace(config=config, preprocessing=pre, threads=1,
                                    executor=LocalExecutor(8, types.SimpleNamespace(progress=lambda what: None)),
                                    images=lambda kind: Images(kind, (), lambda: loaded),
                                    record_skipped=lambda kind, skipped: recorded.append((kind, skipped)))
        folder = tmp_path / target
        folder.mkdir()
        record = calibrate.produce_calibrate(ctx, {"simplify": simplify}, folder)
        assert recorded == [("calibration", ())]  # decoded here: nothing a worker skipped
        table = CalibrationTable.load(folder / TABLE_FILE)
        if with_dla:
            assert record["dla_tensors"] == len(table.dla["tensors"]) == 11 and table.dla["share"]["pool"] == "mixed"
            assert {"stem_out", "pool", "residual", "gap"} <= set(table.amax)
        else:
            assert table.dla is None and set(table.amax) == {"input", "stem_relu", "mixed"}
