"""Users' own classifiers for the tests of `--model PATH.onnx` and `--model package.module:function`:
an ONNX file written by hand with onnx.helper (no framework of ours made it) and a PyTorch factory.

Random weights collapse onto one class (design.md), which would let every drift check pass trivially: the
ONNX classifier's head is standardised on the features of real images (each feature's mean and spread over
a few train-sample/ images), so its logits vary from image to image and many classes are predicted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = 10
SIZE = 64  # the hand-written file's input side


def _conv_weights(rng, out_channels: int, in_channels: int) -> np.ndarray:
    return (rng.standard_normal((out_channels, in_channels, 3, 3)) / np.sqrt(9 * in_channels)).astype(np.float32)


def write_onnx_classifier(path: Path, images: np.ndarray, layout: str = "NCHW", channels: str = "RGB",
                          batch: int | str = "N", size: int | str = SIZE, seed: int = 0,
                          input_name: str = "pixels", output_name: str = "scores", opset: int = 17) -> Path:
    """Conv/Relu x3, GlobalAveragePool, Gemm: a 10-class classifier taking `layout` / `channels` float images.

    `images`: N x 3 x H x W RGB (the project's input) the head is standardised on."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {"w1": _conv_weights(rng, 16, 3), "w2": _conv_weights(rng, 32, 16), "w3": _conv_weights(rng, 48, 32)}
    biases = {f"b{i}": (0.1 * rng.standard_normal(w.shape[0])).astype(np.float32) for i, w in enumerate(weights.values(), 1)}
    nodes, tensor = [], input_name
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [tensor], ["nchw"], perm=[0, 3, 1, 2]))
        tensor = "nchw"
    for i in (1, 2, 3):
        nodes += [helper.make_node("Conv", [tensor, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[2, 2]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        tensor = f"r{i}"
    nodes += [helper.make_node("GlobalAveragePool", [tensor], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["features"], axis=1)]
    dims = [batch, 3, size, size] if layout == "NCHW" else [batch, size, size, 3]
    image = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims)
    initializers = [numpy_helper.from_array(v, k) for k, v in {**weights, **biases}.items()]

    def model(graph_nodes, output):
        graph = helper.make_graph(graph_nodes, "own_classifier", [image], [output], initializers + extra)
        made = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnx.helper")
        made.ir_version = 8
        return made

    extra: list = []
    features = model(nodes, helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 48]))
    x = images[:, ::-1] if channels == "BGR" else images
    x = x.transpose(0, 2, 3, 1) if layout == "NHWC" else x
    found = _run(features, np.ascontiguousarray(x, np.float32), batch)
    mean, spread = found.mean(axis=0), found.std(axis=0) + 1e-3
    head = rng.standard_normal((CLASSES, 48)).astype(np.float32)
    gemm_w = (head / spread).astype(np.float32)  # logits = head @ ((features - mean) / spread)
    gemm_b = (-gemm_w @ mean).astype(np.float32)
    extra = [numpy_helper.from_array(gemm_w, "head_w"), numpy_helper.from_array(gemm_b, "head_b")]
    nodes.append(helper.make_node("Gemm", ["features", "head_w", "head_b"], [output_name], transB=1))
    made = model(nodes, helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, CLASSES]))
    onnx.checker.check_model(made)
    onnx.save(made, str(path))
    return path


def _run(model, x: np.ndarray, batch) -> np.ndarray:
    from targets.onnxruntime import open_session

    session = open_session(model.SerializeToString(), what="the hand-written classifier")
    step = batch if isinstance(batch, int) else len(x)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + step]})[0] for i in range(0, len(x), step)])


def imagenet_inputs(imagenet: Path, count: int = 32, size: int = SIZE) -> np.ndarray:
    """`count` train-sample/ images as the project's input (N x 3 x size x size, torchvision's mean / std)."""
    from PIL import Image

    from calibration.preprocess import Preprocessing

    pre = Preprocessing(size, 0.875, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    files = sorted((imagenet / "train-sample").rglob("*.JPEG"))[:: 1000 // count][:count]
    return np.stack([pre(Image.open(file)) for file in files])


def tiny_classifier():
    """A PyTorch factory (`--model tests.own_models:tiny_classifier`): a small CNN, 10 classes, seeded weights.

    Its batch-norm statistics are set to those of ImageNet-like inputs (mean and spread of the features of
    images normalised by torchvision's mean / std), so that its logits vary from image to image."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(32), nn.Linear(32, CLASSES))
    with torch.no_grad():  # the batch norm's statistics of smooth random images (colour blobs)
        noise = torch.nn.functional.interpolate(torch.randn(64, 3, 8, 8), size=64, mode="bilinear")
        features = network[:6](noise)
        network[6].running_mean.copy_(features.mean(0))
        network[6].running_var.copy_(features.var(0) + 1e-4)
    return network.eval()


def not_a_module():
    """A factory that returns something other than an nn.Module (the error test)."""
    return {"weights": [1, 2, 3]}
