"""ImageNet's full validation layout (50,000 images, `evaluation_images: all`), generated as symlinks to the test
images: the selection lists all 50,000, and evaluating streams them (memory flat in the number of images)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np

FULL_VAL = 50_000


def _full_val_layout(imagenet: Path, root: Path) -> Path:
    """A Caffe-layout root whose val/ lists 50,000 images, each a symlink to one of the test images in turn."""
    root.mkdir()
    for name in ("synsets.txt", "train-sample"):
        os.symlink((imagenet / name).resolve(), root / name)
    real = [line.split() for line in (imagenet / "val" / "val.txt").read_text().splitlines() if line.strip()]
    (root / "val").mkdir()
    lines = []
    for k in range(FULL_VAL):
        source, label = real[k % len(real)]
        name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
        os.symlink((imagenet / "val" / source).resolve(), root / "val" / name)
        lines.append(f"{name} {label}\n")
    (root / "val" / "val.txt").write_text("".join(lines))
    return root


def _tiny_classifier(path: Path) -> Path:
    """A real ONNX classifier, small enough that decoding dominates: pooled colours -> 1000 logits."""
    from onnx import TensorProto, helper, numpy_helper, save

    weights = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "weights"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        [numpy_helper.from_array(weights, "weights")])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_all_evaluates_the_full_val_layout_streaming(imagenet, tmp_path):
    from calibration import images
    from pipeline.config import ALL_IMAGES, load_config
    from pipeline.context import BuildContext
    from pipeline.executor.local import KEEP_DECODED, LocalExecutor
    from pipeline.executor.work import onnxruntime_spec
    from pipeline.plan import BuildPlan
    from pipeline.progress import Reporter
    from targets.onnxruntime import OnnxRuntimeRunner
    from targets.runner import predict

    root = _full_val_layout(imagenet, tmp_path / "imagenet")
    config = load_config(None, {"data": {"imagenet": str(root), "evaluation_images": "all"},
                                "quantization": {"evaluation_images": "all"}, "precision": "fp32"})
    plan = BuildPlan(config, "efficientnet_lite0")
    assert plan.evaluation_count == ALL_IMAGES
    ctx = BuildContext(plan, Reporter())
    evaluation = ctx.images("evaluation")
    assert len(evaluation.records) == FULL_VAL > KEEP_DECODED  # every image of the layout, selected
    assert len({r.path.name for r in evaluation.records}) == FULL_VAL

    model = _tiny_classifier(tmp_path / "tiny.onnx")
    executor = LocalExecutor(8, Reporter())

    def evaluate(count: int):
        tracemalloc.start()
        try:
            result = executor.predict(onnxruntime_spec(model, 1), evaluation, count, "evaluating", ctx.preprocessing)
            return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, small_peak = evaluate(64)
    large, large_peak = evaluate(384)
    assert len(large.logits) == 384 and large.paths[:64] == small.paths
    np.testing.assert_array_equal(large.logits[:64], small.logits)
    # Holding the crops would add 320 x 150 KB = 48 MB; streaming adds only the logits (4 KB an image).
    crop_bytes = 224 * 224 * 3
    assert large_peak - small_peak < 40 * crop_bytes, (small_peak, large_peak)
    assert "evaluation" not in ctx.__dict__  # the whole set was never decoded into memory
    # The same logits as decoding those images at once and running them in one go.
    loaded = images.load_images(evaluation.records[:64], ctx.preprocessing)
    expected = predict(OnnxRuntimeRunner(model, threads=1), loaded.crops, 8, prepare=ctx.preprocessing.normalize)
    np.testing.assert_array_equal(small.logits, expected)
    np.testing.assert_array_equal(small.labels, loaded.labels)
    # The bundle's golden images come from the head of the set alone.
    head = ctx.evaluation_head(40)
    assert head.paths == small.paths[:40] and "evaluation" not in ctx.__dict__
