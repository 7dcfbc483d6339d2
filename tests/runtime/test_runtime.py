"""The camera runtime (`pipeline.runtime.Classifier`) for real: OpenVINO on a CPU bundle, ONNX Runtime on a
desktop-gpu bundle (ONNX models), from the session's two small EfficientNet-Lite0 builds (genuine ImageNet weights), on real
ImageNet val images.

The runtime runs in a subprocess where torch is made unimportable (`sys.modules["torch"] = None`), as on a
camera device. TensorRT tests skip here: TensorRT is not importable on development machines.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from tests.builds import small_build

ROOT = Path(__file__).resolve().parents[2]
MODEL = "efficientnet_lite0"


# -- bundles: the session's small CPU build (OpenVINO IR bundle) and desktop-gpu build (ONNX bundle) --------

def shared_build(tmp_path_factory, imagenet, target: str) -> Path:
    """The session's small Lite0 build of `target` (tests/builds.py), shared with the run and deepstream tests."""
    return small_build(tmp_path_factory, imagenet, target).root


def golden_paths(build: Path, bundle: Path) -> list[str]:
    count = len(np.load(bundle / "golden" / "labels.npy"))
    return (build / "reference" / "images.txt").read_text().split()[:count]


@pytest.fixture(scope="module")
def cpu_build(tmp_path_factory, imagenet) -> Path:
    return shared_build(tmp_path_factory, imagenet, "cpu")


@pytest.fixture(scope="module")
def gpu_build(tmp_path_factory, imagenet) -> Path:
    return shared_build(tmp_path_factory, imagenet, "desktop-gpu")


@pytest.fixture(scope="module")
def cpu_bundle(cpu_build) -> Path:
    return cpu_build / "bundle"


@pytest.fixture(scope="module")
def onnx_bundle(gpu_build) -> Path:
    return gpu_build / "bundle"


# -- the runtime in a process without torch --------------------------------------------------------------

NO_TORCH = """
import sys, json
sys.modules["torch"] = None          # `import torch` raises ImportError from here on
sys.modules["onnx"] = None
sys.modules["onnxsim"] = None
import numpy as np
from pipeline.runtime import Classifier
from pipeline.runtime.sources import read_image
bundle, backend, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
with Classifier.open(bundle, backend=None if backend == "auto" else backend) as classifier:
    frames = [read_image(p) for p in paths]
    crops, labels, reference = classifier.bundle.golden()
    out = {
        "backend": classifier.backend_name,
        "golden_top1": classifier.logits_of_crops(crops, rgb=True).argmax(1).tolist(),
        "reference_top1": reference.argmax(1).tolist(),
        "frames_bgr": [p[0].index for p in classifier.classify_batch(frames, top_k=3)],
        "frames_rgb": [classifier.classify(f[..., ::-1].copy(), rgb=True)[0].index for f in frames],
        "frames_rgb_as_bgr": [classifier.classify(f[..., ::-1].copy())[0].index for f in frames],
        "first": [list(p) for p in classifier.classify(frames[0], top_k=5)],
        "heavy": sorted(m for m in ("torch", "onnx", "onnxsim", "calibration", "pipeline.build", "pipeline.stages",
                                   "pipeline.stages.quantize.qdq") if sys.modules.get(m) is not None),
    }
print(json.dumps(out))
"""


def _run_without_torch(bundle: Path, backend: str, paths: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle), backend, *paths], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target, backend", [("cpu", "auto"), ("desktop-gpu", "auto"), ("desktop-gpu", "onnxruntime")])
def test_runtime_without_torch_agrees_with_the_drift_check(target, backend, tmp_path_factory, imagenet):
    build = shared_build(tmp_path_factory, imagenet, target)
    bundle = build / "bundle"
    paths = golden_paths(build, bundle)
    result = _run_without_torch(bundle, backend, paths)
    assert result["heavy"] == []
    assert result["backend"].startswith("openvino" if target == "cpu" else "onnxruntime")
    reference = np.array(result["reference_top1"])
    golden = np.array(result["golden_top1"])
    # The deployed artifact on the reference crops gives the pipeline's check result (agreement >= its budget).
    assert np.mean(golden == reference) >= 0.95
    # Frames through the runtime's own preprocessing (BGR, as OpenCV decodes them).
    frames = np.array(result["frames_bgr"])
    assert np.mean(frames == reference) >= 0.9
    assert result["frames_rgb"] == result["frames_bgr"]  # RGB frames, declared as RGB: the same answers
    # RGB frames passed as BGR: colours swapped, some answers change (the flag really matters).
    assert result["frames_rgb_as_bgr"] != result["frames_bgr"]
    index, name, probability = result["first"][0]
    assert 0.0 < probability <= 1.0 and name and [p[2] for p in result["first"]] == sorted(
        (p[2] for p in result["first"]), reverse=True)


def test_every_precision_of_the_onnx_bundle_reproduces_the_golden_reference(onnx_bundle):
    from pipeline.runtime import Classifier

    for precision in ("fp32", "fp16", "int8"):
        with Classifier.open(onnx_bundle, precision=precision) as classifier:
            crops, labels, reference = classifier.bundle.golden()
            logits = classifier.logits_of_crops(crops, rgb=True)
        tolerance = classifier.bundle.manifest["tolerance"][precision]["max_abs"]
        assert np.max(np.abs(logits - reference)) <= tolerance, precision
        assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.95, precision


def test_names_come_from_the_labels_and_probabilities_sum_to_one(cpu_bundle, cpu_build):
    from pipeline.runtime import Classifier
    from pipeline.runtime.sources import read_image

    with Classifier.open(cpu_bundle) as classifier:
        frame = read_image(golden_paths(cpu_build, cpu_bundle)[0])
        predictions = classifier.classify(frame, top_k=1000)
        assert classifier.classify(frame, top_k=5) == predictions[:5]
        labels = (cpu_bundle / "labels.txt").read_text().splitlines()
    assert len(predictions) == 1000
    assert abs(sum(p.probability for p in predictions) - 1.0) < 1e-6
    assert all(p.name == labels[p.index] for p in predictions[:5])


@pytest.mark.parametrize("target", ["cpu", "desktop-gpu"])
def test_async_results_equal_sync_results(target, tmp_path_factory, imagenet):
    from pipeline.runtime import Classifier
    from pipeline.runtime.sources import read_image

    build = shared_build(tmp_path_factory, imagenet, target)
    bundle = build / "bundle"
    frames = [read_image(p) for p in golden_paths(build, bundle)[:12]]
    with Classifier.open(bundle) as classifier:
        sync = [classifier.classify(f, top_k=3) for f in frames]
        results: dict[int, list] = {}
        for i, frame in enumerate(frames):
            classifier.classify_async(frame, lambda predictions, i=i: results.__setitem__(i, predictions), top_k=3)
        classifier.wait()
    assert sorted(results) == list(range(len(frames)))
    for i, predictions in enumerate(sync):
        assert [p.index for p in results[i]] == [p.index for p in predictions]
        assert np.allclose([p.probability for p in results[i]], [p.probability for p in predictions], atol=1e-5)


def test_async_callback_errors_surface_in_wait(cpu_bundle, cpu_build):
    from pipeline.runtime import Classifier
    from pipeline.runtime.sources import read_image

    frame = read_image(golden_paths(cpu_build, cpu_bundle)[0])

    def broken(predictions):
        raise ValueError("callback failed")

    with Classifier.open(cpu_bundle) as classifier:
        classifier.classify_async(frame, broken)
        with pytest.raises(ValueError, match="callback failed"):
            classifier.wait()


def test_batches_equal_single_frames(cpu_bundle, cpu_build):
    from pipeline.runtime import Classifier
    from pipeline.runtime.sources import read_image

    frames = [read_image(p) for p in golden_paths(cpu_build, cpu_bundle)[:6]]
    frames.append(np.ascontiguousarray(np.concatenate([frames[0], frames[1]], axis=1)))  # another size, 227x454
    with Classifier.open(cpu_bundle) as classifier:
        batch = classifier.logits(frames)
        single = np.concatenate([classifier.logits([f]) for f in frames])
    assert np.array_equal(batch.argmax(1), single.argmax(1))
    assert np.max(np.abs(batch - single)) < 0.05 * np.max(np.abs(single))


@pytest.mark.parametrize("frame, message", [
    (None, "is None"),
    (np.zeros((224, 224, 3), np.float32), "must be uint8"),
    (np.zeros((224, 224), np.uint8), "HxWx3"),
    (np.zeros((224, 224, 4), np.uint8), "HxWx3"),
    (np.zeros((0, 224, 3), np.uint8), "empty"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_frames_give_one_clear_error(cpu_bundle, frame, message):
    from pipeline.runtime import Classifier

    with Classifier.open(cpu_bundle) as classifier:
        with pytest.raises(PipelineError, match=message):
            classifier.classify(frame)


def test_bad_top_k_and_empty_batch(cpu_bundle):
    from pipeline.runtime import Classifier

    with Classifier.open(cpu_bundle) as classifier:
        with pytest.raises(PipelineError, match="top_k"):
            classifier.classify(np.zeros((300, 400, 3), np.uint8), top_k=0)
        with pytest.raises(PipelineError, match="at least one frame"):
            classifier.classify_batch([])


def test_a_missing_model_file_is_named(cpu_bundle, tmp_path):
    from pipeline.runtime import Classifier

    broken = tmp_path / "bundle"
    shutil.copytree(cpu_bundle, broken)
    (broken / "models" / "model.bin").unlink()
    with pytest.raises(PipelineError, match=r"model\.bin"):
        Classifier.open(broken)


def test_unknown_and_unavailable_back_ends(cpu_bundle, onnx_bundle):
    from pipeline.runtime import Classifier

    with pytest.raises(PipelineError, match="unknown back end 'tflite'"):
        Classifier.open(cpu_bundle, backend="tflite")
    with pytest.raises(PipelineError, match="no OpenVINO IR"):
        Classifier.open(onnx_bundle, backend="openvino")
    with pytest.raises(PipelineError, match="not an ONNX model"):
        Classifier.open(cpu_bundle, backend="onnxruntime")
    with pytest.raises(PipelineError, match="no usable TensorRT engine"):
        Classifier.open(onnx_bundle, backend="tensorrt")


def test_a_missing_back_end_library_is_a_clear_error(onnx_bundle):
    script = ("import sys; sys.modules['onnxruntime'] = None\n"
              "from pipeline.runtime import Classifier\n"
              "from pipeline.errors import PipelineError\n"
              "try:\n    Classifier.open(sys.argv[1])\nexcept PipelineError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", script, str(onnx_bundle)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "ONNX Runtime back end is not installed" in done.stdout, done.stderr


def test_an_engine_this_machine_cannot_run_is_passed_over(onnx_bundle, tmp_path):
    """An engine under engines/ (as device-build leaves it) without TensorRT here: ONNX Runtime runs instead."""
    from pipeline.runtime import Classifier

    if _tensorrt_imports():
        pytest.skip("TensorRT imports here: the fallback without TensorRT cannot be shown")
    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, bundle)
    engine = bundle / "engines" / "int8-orin-trt10.3.0" / "model.engine"
    engine.parent.mkdir(parents=True)
    engine.write_bytes(b"an engine built elsewhere")
    with Classifier.open(bundle) as classifier:
        assert classifier.backend_name.startswith("onnxruntime")
    with pytest.raises(PipelineError, match="TensorRT is not importable here"):
        Classifier.open(bundle, backend="tensorrt")


def _tensorrt_imports() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _tensorrt_imports(), reason="TensorRT is not importable here")
def test_tensorrt_back_end_agrees_with_onnx_runtime(onnx_bundle):
    """On a machine with TensorRT and a GPU: build the engine with device-build, classify through it."""
    from pipeline.cli import main
    from pipeline.runtime import Classifier

    assert main(["device-build", str(onnx_bundle), "--no-trtexec", "--seconds", "1"]) == 0
    with Classifier.open(onnx_bundle) as trt_classifier, Classifier.open(onnx_bundle, backend="onnxruntime") as ort:
        assert trt_classifier.backend_name.startswith("tensorrt")
        crops, _, reference = trt_classifier.bundle.golden()
        trt_top1 = trt_classifier.logits_of_crops(crops, rgb=True).argmax(1)
        assert np.mean(trt_top1 == ort.logits_of_crops(crops, rgb=True).argmax(1)) >= 0.95


def test_preprocessing_drift_of_the_deployment_path(cpu_build, gpu_build):
    from pipeline.runtime.evaluate import preprocessing_drift

    for build in (cpu_build, gpu_build):
        bundle = build / "bundle"
        paths = golden_paths(build, bundle)
        result = preprocessing_drift(bundle, paths)
        assert result.stage == "deployment_preprocessing" and result.images == len(paths)
        assert result.budget.min_agreement == 0.95
        assert result.passed, result.summary()
        assert 0.95 <= result.cosine < 1.0  # OpenCV's resize is not PIL's: close, not identical
    # Images past the golden set have no reference crop: left out.
    paths = golden_paths(cpu_build, cpu_build / "bundle")
    assert preprocessing_drift(cpu_build / "bundle", paths + paths[:5]).images == len(paths)
    with pytest.raises(PipelineError, match="cannot read"):
        preprocessing_drift(cpu_build / "bundle", [str(cpu_build / "labels.txt")])
    with pytest.raises(PipelineError, match="got none"):
        preprocessing_drift(cpu_build / "bundle", [])


def test_geometry_equals_the_reference_transform():
    from calibration.preprocess import Preprocessing
    from pipeline.runtime.preprocess import Cropper

    reference = Preprocessing(crop=224)
    cropper = Cropper(reference.resize, 224)
    for height, width in ((720, 1280), (227, 227), (500, 375), (333, 500), (256, 256), (1080, 1920)):
        frame = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
        from PIL import Image

        expected = reference.crop_uint8(Image.fromarray(frame))
        assert cropper(frame).shape == expected.shape == (224, 224, 3)
        new_h, new_w, top, left = cropper.geometry(height, width)
        assert (new_w, new_h) == _pil_size(reference, width, height)


def _pil_size(reference, width, height):
    if width <= height:
        return reference.resize, int(reference.resize * height / width)
    return int(reference.resize * width / height), reference.resize


def test_numpy_normaliser_equals_the_bundle_normalisation(cpu_bundle):
    from pipeline.artifact import Bundle
    from pipeline.runtime.preprocess import Normalizer

    bundle = Bundle.open(cpu_bundle)
    crops = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    pre = bundle.manifest["preprocessing"]
    normalize = Normalizer(pre["mean"], pre["std"])
    assert np.allclose(normalize(crops, rgb=True), bundle.normalize(crops), atol=1e-5)
    assert np.allclose(normalize(crops[..., ::-1], rgb=False), bundle.normalize(crops), atol=1e-5)


def test_runtime_sources_parse_as_python_3_10():
    for file in sorted((ROOT / "pipeline" / "runtime").glob("*.py")):
        ast.parse(file.read_text(), filename=str(file), feature_version=(3, 10))
        assert "tomllib" not in file.read_text()
