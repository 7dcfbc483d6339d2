"""End-to-end CPU build of Inception-v4 (random weights, batch-norm re-estimated on real images).

One cold build on 32 evaluation images is shared by every test here; tests that change or damage
the build work on a copy of its folder.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["reference", "export", "simplify", "openvino_fp32", "openvino_fp16", "bundle"]


def _args(build_dir: Path, imagenet: Path, *extra: str) -> list[str]:
    return ["build", "--target", "cpu", "--model", "inception_v4", "--weights", "random", "--precision", "fp32",
            "--imagenet", str(imagenet), "--build-dir", str(build_dir), "--eval-images", "32",
            "--config", str(build_dir.parent / "small.yaml"), *extra]


def _manifest(build_dir: Path) -> dict:
    return json.loads((build_dir / "inception_v4" / "cpu" / "manifest.json").read_text())


@pytest.fixture(scope="session")
def built(tmp_path_factory, imagenet):
    """The cold build every test here starts from."""
    work = tmp_path_factory.mktemp("e2e")
    (work / "small.yaml").write_text("data:\n  batchnorm_images: 32\n")
    build_dir = work / "build"
    assert main(_args(build_dir, imagenet)) == 0
    return build_dir, imagenet


def _copy(built, tmp_path) -> Path:
    build_dir, _ = built
    shutil.copy(build_dir.parent / "small.yaml", tmp_path / "small.yaml")
    shutil.copytree(build_dir, tmp_path / "build")
    return tmp_path / "build"


@pytest.mark.slow
def test_cold_build_writes_every_artifact(built):
    build_dir, _ = built
    root = build_dir / "inception_v4" / "cpu"
    manifest = _manifest(build_dir)
    assert manifest["status"] == "ok"
    assert list(manifest["stages"]) == STAGES
    for name in STAGES:
        assert (root / name / "stage.json").exists()
    assert (root / "export" / "model.onnx").exists()
    assert (root / "simplify" / "model.onnx").exists()
    for precision in ("fp32", "fp16"):
        assert (root / f"openvino_{precision}" / "model.xml").exists()
        assert (root / f"openvino_{precision}" / "model.bin").exists()
    labels = (root / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0].startswith("tench")
    assert manifest["weights"]["random"] is True
    assert "random weights" in manifest["weights"]["note"]
    assert manifest["built_this_run"] == STAGES
    assert manifest["stages"]["export"]["tools"]["torch"].startswith("2.13")
    # FP16 weights take about half the space of FP32 weights.
    fp32 = (root / "openvino_fp32" / "model.bin").stat().st_size
    fp16 = (root / "openvino_fp16" / "model.bin").stat().st_size
    assert 0.45 < fp16 / fp32 < 0.55


@pytest.mark.slow
def test_export_is_opset_17_with_a_dynamic_batch_axis(built):
    build_dir, _ = built
    model = onnx.load(str(build_dir / "inception_v4" / "cpu" / "export" / "model.onnx"), load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 299, 299]
    assert model.graph.output[0].name == "logits"


@pytest.mark.slow
def test_every_stage_is_within_its_budget(built):
    manifest = _manifest(built[0])
    for name in STAGES[1:-1]:  # the bundle is not checked against the reference itself
        drift = manifest["stages"][name]["drift"]
        assert drift["passed"], (name, drift["failures"])
        assert drift["images"] == 32
    for name in ("export", "simplify", "openvino_fp32"):
        drift = manifest["stages"][name]["drift"]
        assert drift["agreement"] == 1.0
        assert drift["cosine"] >= 0.99999
        assert drift["max_abs_rel"] <= 1e-3
    # Random weights only mean something if the reference does not collapse onto a few classes.
    assert manifest["stages"]["export"]["drift"]["distinct_ref_classes"] >= 8


@pytest.mark.slow
def test_precision_that_really_ran_is_recorded(built):
    manifest = _manifest(built[0])
    assert manifest["stages"]["openvino_fp32"]["precision_ran"] == "f32"
    assert manifest["stages"]["openvino_fp16"]["precision_ran"] in ("bf16", "f16", "f32")


@pytest.mark.slow
def test_rerun_rebuilds_nothing(built, tmp_path, capsys):
    build_dir = _copy(built, tmp_path)
    before = _manifest(build_dir)
    assert main(_args(build_dir, built[1])) == 0
    after = _manifest(build_dir)
    assert after["built_this_run"] == []
    assert "nothing to rebuild" in capsys.readouterr().err
    for name in STAGES:
        assert after["stages"][name]["key"] == before["stages"][name]["key"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "yaml_text, rebuilt",
    [
        # Another evaluation set: only the reference (and every check) reruns, no artifact.
        ("data:\n  batchnorm_images: 32\n  seed: 0\n  evaluation_images: 24\n", ["reference", "bundle"]),
        # Another opset: every artifact after the reference.
        ("data:\n  batchnorm_images: 32\nexport:\n  opset: 18\n", ["export", "simplify", "openvino_fp32", "openvino_fp16", "bundle"]),
    ],
)
def test_changing_one_option_rebuilds_only_its_dependents(built, tmp_path, yaml_text, rebuilt):
    build_dir = _copy(built, tmp_path)
    (tmp_path / "small.yaml").write_text(yaml_text)
    args = _args(build_dir, built[1])
    if "evaluation_images" in yaml_text:
        args.remove("--eval-images")
        args.remove("32")
    assert main(args) == 0
    assert _manifest(build_dir)["built_this_run"] == rebuilt


@pytest.mark.slow
def test_changing_the_deployed_openvino_precision_only_reruns_a_check(built, tmp_path):
    build_dir = _copy(built, tmp_path)
    (tmp_path / "small.yaml").write_text("data:\n  batchnorm_images: 32\nopenvino:\n  inference_precision: f32\n")
    assert main(_args(build_dir, built[1])) == 0
    manifest = _manifest(build_dir)
    assert manifest["built_this_run"] == []
    assert manifest["stages"]["openvino_fp16"]["precision_ran"] == "f32"


@pytest.mark.slow
def test_truncated_cached_onnx_is_detected_and_rebuilt(built, tmp_path, capsys):
    build_dir = _copy(built, tmp_path)
    onnx_path = build_dir / "inception_v4" / "cpu" / "export" / "model.onnx"
    size = onnx_path.stat().st_size
    with open(onnx_path, "r+b") as stream:
        stream.truncate(size // 2)
    assert main(_args(build_dir, built[1])) == 0
    assert "model.onnx was modified or truncated" in capsys.readouterr().err
    manifest = _manifest(build_dir)
    # The export is rebuilt; what was built from it has the same key and stays cached.
    assert manifest["built_this_run"] == ["export"]
    assert onnx_path.stat().st_size == size


@pytest.mark.slow
def test_build_killed_mid_stage_reruns_cleanly(built, tmp_path):
    build_dir = _copy(built, tmp_path)
    root = build_dir / "inception_v4" / "cpu"
    shutil.rmtree(root / "openvino_fp32")
    (root / "manifest.json").unlink()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *_args(build_dir, built[1])], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(root.glob(".openvino_fp32.*.tmp/*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (root / "openvino_fp32" / "stage.json").exists()
    assert not (root / "manifest.json").exists()
    assert main(_args(build_dir, built[1])) == 0
    manifest = _manifest(build_dir)
    assert manifest["built_this_run"] == ["openvino_fp32"]
    assert not list(root.glob(".*.tmp"))


@pytest.mark.slow
def test_force_rebuilds_everything(built, tmp_path):
    build_dir = _copy(built, tmp_path)
    assert main(_args(build_dir, built[1], "--force")) == 0
    assert _manifest(build_dir)["built_this_run"] == STAGES


@pytest.mark.slow
def test_unwritable_build_dir_is_a_clear_error(built, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "small.yaml").write_text("data:\n  batchnorm_images: 32\n")
    args = _args(tmp_path / "build", built[1])
    args[args.index("--build-dir") + 1] = str(blocker / "build")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and "--build-dir" in err


@pytest.mark.slow
def test_json_stages_and_clean_commands(built, tmp_path, capsys):
    build_dir = _copy(built, tmp_path)
    capsys.readouterr()
    assert main(_args(build_dir, built[1], "--json")) == 0
    manifests = json.loads(capsys.readouterr().out)
    assert manifests["inception_v4"]["stages"]["export"]["drift"]["passed"] is True

    common = ["--model", "inception_v4", "--build-dir", str(build_dir), "--precision", "fp32"]
    assert main(["stages", *common, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in rows] == STAGES and all(r["built"] for r in rows)
    assert rows[2]["inputs"] == ["export"]

    assert main(["clean", *common]) == 0
    assert "removed" in capsys.readouterr().out
    assert not (build_dir / "inception_v4" / "cpu").exists()
    assert main(["stages", *common, "--json"]) == 0
    assert not any(r["built"] for r in json.loads(capsys.readouterr().out))


def test_stages_and_clean_take_several_targets(tmp_path, capsys):
    """`--target` repeats: `stages` lists each target's graph (rows carry their target), `clean` visits each."""
    from pipeline.stages import stages_for
    from pipeline.config import load_config

    common = ["--model", "efficientnet_lite0", "--build-dir", str(tmp_path / "build"), "--target", "cpu",
              "--target", "jetson"]
    assert main(["stages", *common, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for target in ("cpu", "jetson"):
        expected = [stage.name for stage in stages_for(load_config(None, {"target": target}))]
        assert [row["stage"] for row in rows if row["target"] == target] == expected
    assert {row["target"] for row in rows} == {"cpu", "jetson"} and not any(row["built"] for row in rows)
    assert main(["stages", *common]) == 0
    assert "efficientnet_lite0 → jetson" in capsys.readouterr().out
    assert main(["clean", *common]) == 0
    out = capsys.readouterr().out
    for target in ("cpu", "jetson"):
        assert f"nothing to remove at {tmp_path / 'build' / 'efficientnet_lite0' / target}" in out


@pytest.mark.slow
def test_fine_tuned_network_with_its_own_labels_and_input_size(imagenet, tmp_path, capsys):
    """A 10-class EfficientNet-Lite0 checkpoint at 192x192: classes read from the head, labels carried."""
    import torch

    from pipeline.weights import load_model

    state = load_model("efficientnet_lite0", "imagenet").module.state_dict()
    state["_fc.weight"], state["_fc.bias"] = state["_fc.weight"][:10].clone(), state["_fc.bias"][:10].clone()
    torch.save(state, tmp_path / "fine_tuned.pth")
    names = [f"part-{i}" for i in range(10)]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    common = ["build", "--model", "efficientnet_lite0", "--precision", "fp32", "--weights", str(tmp_path / "fine_tuned.pth"),
              "--imagenet", str(imagenet), "--build-dir", str(tmp_path / "build"), "--eval-images", "8"]

    assert main(common) == 2  # ImageNet's 1000 names do not fit a 10-class head
    assert "1000 names for a 10-class network" in capsys.readouterr().err

    assert main([*common, "--labels", str(tmp_path / "labels.txt"), "--input-size", "192"]) == 0
    root = tmp_path / "build" / "efficientnet_lite0" / "cpu"
    assert (root / "labels.txt").read_text().splitlines() == names
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["preprocessing"]["crop"] == 192
    drift = manifest["stages"]["export"]["drift"]
    assert drift["top1"] is None  # ImageNet's labels do not apply to this head
    model = onnx.load(str(root / "export" / "model.onnx"), load_external_data=False)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 192, 192]
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10
