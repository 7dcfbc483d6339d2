"""INT8 builds end to end: calibration, the Q/DQ ONNX in ONNX Runtime, the OpenVINO INT8 IR, the gate.

EfficientNet-Lite0 carries genuine ImageNet weights: it is the acceptance case (at most 1.0 point of
top-1 lost on all of val/ on both back ends) and the case that needs fallback (minmax ranges with a
0.2-point budget).
"""

import json
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main

STAGES = ["reference", "export", "simplify", "openvino_fp32", "openvino_fp16", "calibrate", "quantize", "openvino_int8", "bundle"]


def _manifest(build_dir: Path, model: str = "efficientnet_lite0") -> dict:
    return json.loads((build_dir / model / "cpu" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def lite0_int8(tmp_path_factory, imagenet):
    """The default INT8 build: 512 calibration images from train-sample/, judged on all 650 of val/."""
    build_dir = tmp_path_factory.mktemp("int8") / "build"
    assert main(["build", "--model", "efficientnet_lite0", "--imagenet", str(imagenet), "--build-dir", str(build_dir)]) == 0
    return build_dir


@pytest.mark.slow
def test_lite0_int8_loses_at_most_one_point_on_both_back_ends(lite0_int8):
    manifest = _manifest(lite0_int8)
    assert list(manifest["stages"]) == STAGES
    assert manifest["deployed"]["artifact"] == "openvino_int8/model.xml"
    for stage in ("quantize", "openvino_int8"):
        drift = manifest["stages"][stage]["drift"]
        assert drift["images"] == 650 and drift["labelled_images"] == 650
        assert drift["ref_top1"] > 80.0  # genuine weights, right preprocessing
        assert drift["ref_top1"] - drift["top1"] <= 1.0, (stage, drift)
        assert drift["agreement"] >= 0.95
        assert drift["flips_lost"] is not None and drift["flips_gained"] is not None
    assert manifest["stages"]["openvino_int8"]["precision_ran"].startswith("int8")


@pytest.mark.slow
def test_calibration_table_covers_every_quantized_tensor(lite0_int8):
    from pipeline.stages.quantize.qdq import describe_placement, quantized_activations

    root = lite0_int8 / "efficientnet_lite0" / "cpu"
    table = json.loads((root / "calibrate" / "calibration.json").read_text())
    assert table["method"] == "percentile" and table["images"] == 512
    tensors = quantized_activations(root / "simplify" / "model.onnx")
    assert set(table["tensors"]) == set(tensors)
    assert all(entry["amax"] > 0 for entry in table["tensors"].values())
    placement = describe_placement(root / "quantize" / "model.onnx")
    assert placement["zero_points_all_zero"] and placement["weight_scales_per_channel"]
    assert placement["weight_dtypes"] == ["int8"]  # activations: int8, uint8 after a ReLU6 (CPU target)
    assert placement["zero_point_dtypes"] == ["int8", "uint8"]
    assert not placement["add_input_quantized"] and not placement["gemm_input_quantized"]
    assert not placement["graph_output_quantized"] and not placement["bias_quantized"]
    gate = json.loads((root / "quantize" / "gate.json").read_text())
    assert gate["passed"] and gate["excluded_layers"] == []
    assert len(gate["ranking"]) == len(tensors)


@pytest.mark.slow
def test_rerun_of_an_int8_build_is_cached(lite0_int8, imagenet):
    assert main(["build", "--model", "efficientnet_lite0", "--imagenet", str(imagenet), "--build-dir", str(lite0_int8)]) == 0
    assert _manifest(lite0_int8)["built_this_run"] == []


def _int8_build(tmp_path, imagenet, yaml_text, *extra):
    (tmp_path / "int8.yaml").write_text(yaml_text)
    return main(["build", "--model", "efficientnet_lite0", "--imagenet", str(imagenet), "--build-dir",
                 str(tmp_path / "build"), "--config", str(tmp_path / "int8.yaml"), *extra])


@pytest.mark.slow
def test_gate_returns_the_most_sensitive_layers_to_float(tmp_path, imagenet):
    """minmax ranges over 64 images, no bias correction: about 16.5 dB of logit SQNR; asked for 20.5 dB on its
    decision images, the gate needs fallback (the worst layers in float raise SQNR, see docs/int8.md)."""
    yaml_text = (
        "data:\n  calibration_images: 64\n"
        "quantization:\n  method: minmax\n  bias_correction: false\n  fallback_group: 4\n  max_fallback_layers: 24\n"
        "  decision_images: 160\n"
        "  overflow_fix: enable\n"  # the same model on every CPU: its INT8 kernels then compute it exactly
        "drift:\n  gate: {min_sqnr_db: 20.5}\n"
    )
    assert _int8_build(tmp_path, imagenet, yaml_text) == 0
    manifest = _manifest(tmp_path / "build")
    excluded = manifest["deployed"]["int8_layers_in_float"]
    assert excluded, "this case needs fallback: the first attempt must have been over budget"
    gate = json.loads((tmp_path / "build" / "efficientnet_lite0" / "cpu" / "quantize" / "gate.json").read_text())
    assert gate["before"]["passed"] is False and gate["after"]["passed"] is True
    assert gate["excluded_layers"] == excluded
    # The layers kept in float are the worst of the one-pass ranking, in its order.
    assert excluded == [layer["node"] for layer in gate["ranking"][: len(excluded)]]
    backends = ("onnxruntime", "openvino")  # what the gate saw on its own images
    assert min(gate["before"]["details"][b]["sqnr_db"] for b in backends) < 20.5
    assert min(gate["after"]["details"][b]["sqnr_db"] for b in backends) >= 20.5
    assert gate["decided_on"]["images"] == 160 and gate["decided_on"]["budgets"]["quantize"]["min_sqnr_db"] == 20.5
    # The excluded Convs really read float weights in the Q/DQ model.
    import onnx

    model = onnx.load(str(tmp_path / "build" / "efficientnet_lite0" / "cpu" / "quantize" / "model.onnx"))
    produced_by = {out: node.op_type for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.name in excluded:
            assert produced_by.get(node.input[1]) != "DequantizeLinear"


@pytest.mark.slow
def test_gate_that_cannot_meet_its_budget_fails_naming_the_best_result(tmp_path, imagenet, capsys):
    yaml_text = (
        "data:\n  calibration_images: 32\n"
        "quantization:\n  method: minmax\n  max_fallback_layers: 2\n  evaluation_images: 64\n"
        "drift:\n  quantize: {min_sqnr_db: 60.0}\n"
    )
    assert _int8_build(tmp_path, imagenet, yaml_text) == 3
    err = capsys.readouterr().err
    assert "INT8 stays over budget with up to 2 layers in float" in err and "best reached" in err
    root = tmp_path / "build" / "efficientnet_lite0" / "cpu"
    assert not (root / "quantize" / "stage.json").exists()
    assert json.loads((root / "manifest.json").read_text())["status"].startswith("failed")


def imagenet_with_val_labels_swapped(imagenet: Path, folder: Path) -> Path:
    """The same images (linked, not copied), every val/ label moved to the next class."""
    (folder / "val").mkdir(parents=True)
    (folder / "synsets.txt").symlink_to(imagenet / "synsets.txt")
    (folder / "train-sample").symlink_to(imagenet / "train-sample")
    lines = []
    for line in (imagenet / "val" / "val.txt").read_text().split("\n"):
        if line.strip():
            name, label = line.split()
            (folder / "val" / name).symlink_to(imagenet / "val" / name)
            lines.append(f"{name} {(int(label) + 1) % 1000}\n")
    (folder / "val" / "val.txt").write_text("".join(lines))
    return folder


def test_the_gate_never_decides_on_the_images_it_reports_on(tmp_path, imagenet, capsys):
    """The same build on val/ labels moved one class over: the reference's accuracy changes, the gate's
    every figure and decision does not (it decides on train-sample/ images that never calibrate)."""
    import numpy as np

    config = tmp_path / "gate.yaml"
    config.write_text(
        "data: {calibration_images: 32, evaluation_images: 16}\n"
        "quantization: {method: minmax, evaluation_images: 32, decision_images: 48, sensitivity_images: 4,\n"
        "               max_fallback_layers: 2, fallback_group: 2}\n"
        "drift:\n  gate: {min_cosine: 1.0}\n")  # never met: two attempts, each figure printed
    runs = {}
    for name, root in (("real", imagenet), ("swapped", imagenet_with_val_labels_swapped(imagenet, tmp_path / "swapped"))):
        args = ["build", "--model", "efficientnet_lite0", "--imagenet", str(root), "--config", str(config),
                "--build-dir", str(tmp_path / name), "--no-report"]
        assert main(args) == 3
        err = " ".join(capsys.readouterr().err.split())
        runs[name] = ([part.split(" (")[0] for part in err.split("INT8 gate, ")[1:]],
                      err[err.index("INT8 stays over budget"):].split(" (budgets")[0],
                      np.load(tmp_path / name / "efficientnet_lite0" / "cpu" / "reference" / "labels.npy"))
    (gates, verdict, labels), (gates_swapped, verdict_swapped, labels_swapped) = runs["real"], runs["swapped"]
    assert not np.array_equal(labels, labels_swapped)  # the reported images' labels did change
    assert len(gates) == 2 and "0 layers in float" in gates[0] and "2 layers in float" in gates[1]
    assert gates == gates_swapped and verdict == verdict_swapped
    assert "on 48 gate decision images" in verdict


def test_residual_adds_and_the_int8_head_through_every_int8_stage(tmp_path, imagenet):
    """quantization.residual_adds and int8_head on a small desktop-gpu build: the calibration table ranges the
    residual Conv outputs and the head's inputs, every residual Add of the Q/DQ ONNX and of its FP16-typed copy
    reads two pairs, the pool and the Gemm read pairs and the Gemm int8 weights, and both stages pass their
    drift checks."""
    import onnx

    from tests.builds import build_with_option

    root, manifest, _ = build_with_option(tmp_path, imagenet, "desktop-gpu", "residual_adds: true, int8_head: true",
                                       ("quantize", "quantize_fp16"))
    assert manifest["stages"]["quantize"]["drift"]["passed"] and manifest["stages"]["quantize_fp16"]["drift"]["passed"]
    table = json.loads((root / "calibrate" / "calibration.json").read_text())["tensors"]
    for stage in ("quantize", "quantize_fp16"):
        graph = onnx.load(str(root / stage / "model.onnx")).graph
        producers = {out: node.op_type for node in graph.node for out in node.output}
        adds = [n for n in graph.node if n.op_type == "Add" and all(producers.get(i) != "Constant" for i in n.input)
                and len({producers.get(i) for i in n.input} - {None}) > 0]
        residual = [n for n in adds if all(producers.get(i) == "DequantizeLinear" for i in n.input)]
        assert len(residual) == 9, (stage, len(residual))  # Lite0's 9 residual blocks
        head = [n for n in graph.node if n.op_type in ("Gemm", "GlobalAveragePool")]
        assert [n.op_type for n in head] == ["GlobalAveragePool", "Gemm"], stage
        assert all(producers[name] == "DequantizeLinear" for n in head for name in n.input[:1 + (n.op_type == "Gemm")])
    assert {"/relu6_1/Clip_output_0", "/Flatten_output_0"} <= set(table)  # the head's two inputs, ranged
    # The 9 residual Conv outputs: each its own pair, each ranged by the calibration table.
    branches = [n.input[0] for n in onnx.load(str(root / "quantize" / "model.onnx")).graph.node
                if n.op_type == "QuantizeLinear" and n.name.endswith("_residual_QuantizeLinear")]
    assert len(branches) == 9 and all(name.endswith("_project_conv/Conv_output_0") and name in table for name in branches)


@pytest.fixture
def frames(tmp_path, imagenet) -> Path:
    """A camera's own frames: 72 unlabelled images in two subfolders, and one corrupt file."""
    folder = tmp_path / "frames"
    sources = sorted((imagenet / "train-sample").glob("*/*.JPEG"))[:72]
    for index, source in enumerate(sources):
        target = folder / f"camera{index % 2}" / f"frame{index:03d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (folder / "camera0" / "frame999.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


@pytest.mark.slow
def test_label_free_build_from_the_users_own_frames(tmp_path, imagenet, frames, capsys):
    # bf16 flips about one frame in 16 at FP16: this test is about INT8, so it checks FP16 in f32.
    (tmp_path / "f32.yaml").write_text("openvino:\n  inference_precision: f32\n")
    args = ["build", "--model", "efficientnet_lite0", "--frames", str(frames), "--imagenet", str(imagenet),
            "--build-dir", str(tmp_path / "build"), "--eval-images", "32", "--int8-eval-images", "32",
            "--calibration-images", "16", "--config", str(tmp_path / "f32.yaml")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "frame999.jpg" in err  # the corrupt frame is skipped and named, never a crash
    manifest = _manifest(tmp_path / "build")
    for stage in ("quantize", "openvino_int8"):
        drift = manifest["stages"][stage]["drift"]
        assert drift["top1"] is None and drift["labelled_images"] == 0  # no labels: agreement and SQNR judge
        assert drift["budget"]["min_agreement"] == 0.95 and "max_top1_drop" not in drift["budget"]
    # 16 calibration frames asked for; the corrupt one, if the seeded selection took it, is skipped.
    assert manifest["stages"]["calibrate"]["facts"]["images"] in (15, 16)
    # 73 frames: 32 held out for evaluation (a 95% budget on 16 would allow no flip at all), 16 calibrate, the
    # 25 left decide the gate (fewer than asked: said).
    assert "the INT8 gate decides on the 25 images" in " ".join(err.split())


def test_too_few_calibration_images_is_a_clear_error(tmp_path, imagenet, frames, capsys):
    args = ["build", "--model", "efficientnet_lite0", "--frames", str(frames), "--imagenet", str(imagenet),
            "--build-dir", str(tmp_path / "build"), "--eval-images", "8", "--int8-eval-images", "8",
            "--calibration-images", "500"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "too few calibration images" in err and str(frames) in err


@pytest.mark.slow
def test_inception_v4_int8_build_on_a_few_images(tmp_path, imagenet):
    """Random weights (batch-norm re-estimated): judged by mean-centred logits, not by top-1."""
    (tmp_path / "small.yaml").write_text(
        "data:\n  batchnorm_images: 16\n  calibration_images: 64\n  evaluation_images: 16\n"
        "quantization:\n  evaluation_images: 16\n  decision_images: 48\n  sensitivity_images: 4\n")
    args = ["build", "--model", "inception_v4", "--weights", "random", "--imagenet", str(imagenet),
            "--build-dir", str(tmp_path / "build"), "--config", str(tmp_path / "small.yaml")]
    assert main(args) == 0
    manifest = _manifest(tmp_path / "build", "inception_v4")
    for stage in ("quantize", "openvino_int8"):
        drift = manifest["stages"][stage]["drift"]
        assert drift["passed"] and drift["centred_cosine"] is not None
        assert "min_centred_cosine" in drift["budget"]
