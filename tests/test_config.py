"""pipeline.yaml: defaults, merging, and one clear line for every kind of bad configuration."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import default_config_path, load_config
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_come_from_the_packaged_file():
    config = load_config()
    assert config.models == ("inception_v4",)
    assert config.target == "cpu"
    assert config.export.opset == 17
    assert config.drift["export"].min_agreement == 1.0
    assert config.drift["export"].min_cosine == 0.99999
    assert config.drift["openvino_fp16"].min_agreement == 0.99


def test_repository_pipeline_yaml_is_the_packaged_one():
    assert (ROOT / "pipeline.yaml").read_text() == default_config_path().read_text()


def test_user_file_overrides_single_keys(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("data:\n  evaluation_images: 16\ndrift:\n  export: {min_cosine: 0.9}\n")
    config = load_config(path)
    assert config.data.evaluation_images == 16
    assert config.data.batch_size == 8  # untouched defaults survive the merge
    assert config.drift["export"].min_cosine == 0.9
    assert config.drift["export"].min_agreement == 1.0


def test_random_weights_budget_replaces_agreement():
    config = load_config()
    budget = config.budget("openvino_fp16", random_weights=True)
    assert budget.min_agreement is None
    assert budget.min_centred_cosine is not None
    assert config.budget("openvino_fp16", random_weights=False).min_agreement == 0.99


def test_gate_budget_tightens_the_stage_budgets_where_it_sets_a_figure():
    plain = load_config()
    assert plain.gate_budget("quantize", random_weights=False) == plain.budget("quantize", random_weights=False)
    config = load_config(overrides={"drift": {"gate": {"min_agreement": 0.99, "min_sqnr_db": 20.0}}})
    budget = config.gate_budget("openvino_int8", random_weights=False)
    assert (budget.min_agreement, budget.min_sqnr_db, budget.max_top1_drop) == (0.99, 20.0, 1.0)
    # Random weights: agreement means little, so the gate drops it as the stage budgets do.
    random = config.gate_budget("quantize", random_weights=True)
    assert random.min_agreement is None and random.min_sqnr_db == 20.0 and random.min_centred_cosine == 0.90
    unlabelled = config.gate_budget("quantize", random_weights=False, labelled=False)
    assert unlabelled.max_top1_drop is None and unlabelled.min_agreement == 0.99
    assert config.quantization.decision_images == 480


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:\n  evaluation_images: [1\n", "invalid YAML"),
        ("modles: [inception_v4]\n", ":1: unknown key 'modles'"),
        ("data:\n  seed: 1\n  batch_sise: 4\n", ":3: unknown key 'data.batch_sise'"),
        ("data:\n  batch_size: eight\n", ":2: 'data.batch_size' must be int"),
        ("target: gpu\n", "'target' must be one of cpu"),
        ("drift:\n  export: {min_agreement: 99}\n", "min_agreement is a fraction"),
        ("drift:\n  export: {min_agremeent: 0.9}\n", "unknown key 'drift.export.min_agremeent'"),
        ("- a\n- b\n", "must be a mapping"),
        ("network:\n  residual_scales: [0.1]\n", "three scales"),
        ("data:\n  seed: 1\n  seed: 2\n", ":3: invalid YAML: 'seed' is given twice (also on line 2)"),
    ],
)
def test_bad_configuration_is_one_clear_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError) as error:
        load_config(path)
    message = str(error.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("export:\n  opset: seventeen\n")
    result = _cli("build", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "'export.opset' must be int" in result.stderr


def test_cli_missing_config_file(tmp_path):
    result = _cli("build", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml: cannot read the configuration" in result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["build", "--target", "gpu"], "invalid choice: 'gpu'"),
        (["build", "--model", "resnet50"], "unknown model 'resnet50'"),
        (["build", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["build", "--precision", "int4"], "invalid choice: 'int4'"),
    ],
)
def test_cli_unknown_values_exit_2(args, expected):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_cli_help_and_import_stay_light():
    assert _cli("--help").returncode == 0
    code = "import sys, pipeline, pipeline.cli; print(sorted(m for m in ('tensorrt', 'openvino', 'torch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"
