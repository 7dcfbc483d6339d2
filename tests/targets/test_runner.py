"""Torch and ONNX Runtime runners on a small real conv net (exported here, no mocks)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from targets.onnxruntime import OnnxRuntimeRunner
from targets.pytorch import TorchRunner
from targets.runner import predict

torch = pytest.importorskip("torch")
nn = torch.nn

CLASSES = 10


class SmallNet(nn.Module):
    """conv-bn-relu, strided conv-bn-relu, max pool, global average pool, linear: any input size."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, eps=1e-3)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(32, eps=1e-3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.mean(dim=(2, 3)))


def small_net(seed: int = 0) -> SmallNet:
    """Seeded weights and non-trivial batch-norm statistics (0/1 stats make outputs too uniform)."""
    torch.manual_seed(seed)
    net = SmallNet()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def export_onnx(net: nn.Module, path: Path, size: int = 32) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript exporter: opset 17
        torch.onnx.export(
            net,
            torch.zeros(1, 3, size, size),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def random_images(count: int, size: int = 32, seed: int = 1) -> np.ndarray:
    """Noise around a per-image colour, so that globally pooled features differ between images."""
    rng = np.random.default_rng(seed)
    colour = rng.uniform(-1.0, 1.0, (count, 3, 1, 1))
    return (colour + 0.5 * rng.standard_normal((count, 3, size, size))).astype(np.float32)


def max_rel_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(candidate - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def net():
    return small_net()


@pytest.fixture(scope="module")
def onnx_path(net, tmp_path_factory):
    return export_onnx(net, tmp_path_factory.mktemp("onnx") / "small.onnx")


def test_importing_runners_imports_no_runtime():
    code = (
        "import sys, targets.runner, targets.pytorch, targets.onnxruntime; "
        "print([m for m in ('torch', 'onnxruntime', 'openvino') if m in sys.modules])"
    )
    project = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=project
    )
    assert out.stdout.strip() == "[]"


def test_torch_and_onnxruntime_agree(net, onnx_path):
    torch_runner = TorchRunner(net)
    ort_runner = OnnxRuntimeRunner(onnx_path, threads=1)
    assert (torch_runner.input_name, torch_runner.output_name) == ("input", "logits")
    assert (ort_runner.input_name, ort_runner.output_name) == ("input", "logits")
    assert torch_runner.name == "torch fp32" and ort_runner.name == "onnxruntime"

    images = random_images(6)
    reference = torch_runner.run({"input": images})["logits"]
    candidate = ort_runner.run({"input": images})["logits"]
    assert reference.shape == (6, CLASSES) and reference.dtype == np.float32
    assert candidate.dtype == np.float32
    assert max_rel_error(candidate, reference) < 1e-5
    assert np.array_equal(reference.argmax(1), candidate.argmax(1))
    # The net is not trivially constant: different images, different predictions.
    assert np.ptp(reference, axis=0).max() > 0.1


def test_predict_in_batches_equals_one_shot(net, onnx_path):
    images = random_images(7)
    for runner in (TorchRunner(net), OnnxRuntimeRunner(onnx_path)):
        one_shot = runner.run({"input": images})["logits"]
        seen = []
        batched = predict(runner, images, 3, progress=lambda *counts: seen.append(counts))
        assert seen == [(3, 7), (6, 7), (7, 7)]
        np.testing.assert_allclose(batched, one_shot, rtol=1e-5, atol=1e-6)


def test_predict_accepts_float64_and_non_contiguous_images(onnx_path):
    runner = OnnxRuntimeRunner(onnx_path)
    images = random_images(4)
    expected = predict(runner, images)
    flipped = np.asarray(images[:, :, :, ::-1][:, :, :, ::-1], dtype=np.float64)  # a strided view
    np.testing.assert_allclose(predict(runner, flipped), expected, rtol=1e-6)


def test_wrong_input_name_is_reported(net):
    with pytest.raises(ValueError, match="no input named 'input'"):
        TorchRunner(net).run({"image": random_images(1)})


def test_torch_runner_refuses_non_fp32_module():
    with pytest.raises(PipelineError, match="float32"):
        TorchRunner(small_net().double())


def test_onnxruntime_missing_or_corrupt_model(tmp_path):
    with pytest.raises(PipelineError, match="not found: .*absent.onnx"):
        OnnxRuntimeRunner(tmp_path / "absent.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf")
    with pytest.raises(PipelineError, match="corrupt.onnx") as error:
        OnnxRuntimeRunner(corrupt)
    assert "\n" not in str(error.value)


def real_images(imagenet: Path, count: int, size: int) -> np.ndarray:
    from PIL import Image

    from calibration.preprocess import Preprocessing

    preprocess = Preprocessing(crop=size)
    files = sorted((imagenet / "val").glob("*.JPEG"))[:count]
    return np.stack([preprocess(Image.open(path)) for path in files])


def test_torch_and_onnxruntime_agree_on_real_images(net, onnx_path, imagenet):
    images = real_images(imagenet, 4, size=32)  # the export fixed H, W at 32
    reference = predict(TorchRunner(net), images)
    candidate = predict(OnnxRuntimeRunner(onnx_path), images)
    assert max_rel_error(candidate, reference) < 1e-5


def test_every_back_end_keeps_the_runner_contract(net, onnx_path, tmp_path):
    """Open, run named arrays, describe what ran, close: the same lifecycle on torch, ONNX Runtime, OpenVINO."""
    pytest.importorskip("openvino")
    from targets.openvino import OpenVinoRunner, convert_to_ir
    from targets.tensorrt.runner import TensorRtRunner

    xml = convert_to_ir(onnx_path, tmp_path / "small.xml")
    images = random_images(2)
    for runner in (TorchRunner(net), OnnxRuntimeRunner(onnx_path), OpenVinoRunner(xml, inference_precision="f32")):
        with runner:
            logits = runner.run({runner.input_name: images})[runner.output_name]
            described = runner.describe()
        assert logits.shape == (2, CLASSES), runner.name
        assert described["execution_precision"] in ("fp32", "f32"), (runner.name, described)
        assert described["runtime"].split()[0] in ("torch", "onnxruntime", "openvino"), described
    # TensorRT cannot run here: its runner at least offers the whole contract.
    for method in ("run", "describe", "close", "__enter__", "__exit__"):
        assert callable(getattr(TensorRtRunner, method)), method


def test_fp16_typed_models_run_without_graph_optimizations_on_the_cpu(onnx_path):
    from targets.onnxruntime import CPU, CUDA, graph_optimizations

    assert graph_optimizations(fp16_typed=False) and not graph_optimizations(fp16_typed=True)
    assert graph_optimizations(fp16_typed=True, provider=CUDA)  # the rule is the CPU provider's
    runner = OnnxRuntimeRunner(onnx_path, fp16_typed=True)
    assert runner.name.endswith("(graph optimizations off)") and runner.provider == CPU
    # exact: a Q/DQ model in its own arithmetic (no INT8 kernels), on any provider
    assert not graph_optimizations(fp16_typed=False, exact=True) and not graph_optimizations(False, CUDA, exact=True)
    assert OnnxRuntimeRunner(onnx_path, exact=True).name.endswith("(graph optimizations off)")
    assert runner.describe()["execution_precision"] == "fp16 (host proxy)"
