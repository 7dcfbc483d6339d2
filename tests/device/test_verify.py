"""`python -m pipeline verify` for real: a CPU bundle of an EfficientNet-Lite0 INT8 build (genuine ImageNet
weights) runs its golden images through OpenVINO on this CPU, passes its budget, records what ran; a
tampered reference fails with exit 3; missing or damaged files give one clear line; the .tar.gz works.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from tests.builds import copy_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def build(small_cpu_build) -> Path:
    return small_cpu_build.root


@pytest.fixture()
def bundle_copy(build, tmp_path) -> Path:
    """A private copy of the bundle a test may damage."""
    return copy_bundle(build, tmp_path, "results")


def _results(bundle: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((bundle / "results").glob("verify-*.json"))]


def _rehash(bundle: Path, relative: str) -> None:
    """Record a changed file's sha256 and size in the manifest, as a bundle tampered with on purpose would."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][relative] = hashlib.sha256((bundle / relative).read_bytes()).hexdigest()
    manifest["sizes"][relative] = (bundle / relative).stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_verify_passes_and_records_what_ran(bundle_copy, capsys):
    assert main(["verify", str(bundle_copy), "--seconds", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "within budget" in out and "host" in out and "here" in out and "top-1 %" in out
    (results,) = _results(bundle_copy)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    golden = manifest["golden"]["images"]
    assert results["passed"] is True and results["drift"]["passed"] is True
    assert results["drift"]["images"] == golden == len(np.load(bundle_copy / "golden" / "labels.npy"))
    assert results["drift"]["labelled_images"] == golden
    assert results["drift"]["ref_top1"] > 60.0  # genuine weights, right preprocessing
    assert results["drift"]["budget"] == manifest["budgets"]["int8"]
    assert results["ran"]["execution_precision"] in ("f32", "bf16", "f16")
    assert results["ran"]["optimization_capabilities"]
    assert results["cpu"]["model"] and results["cpu"]["openvino_capabilities"] == results["ran"]["optimization_capabilities"]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    if " avx2 " in cpuinfo:
        assert "avx2" in results["cpu"]["isa"]
    assert results["latency"]["batch"] == 1 and results["latency"]["median_ms"] > 0
    assert results["latency"]["iterations"] >= 10
    assert not [p for p in (bundle_copy / "results").iterdir() if p.name.startswith(".")]  # no temp file left


def test_verify_json_output(bundle_copy, capsys):
    assert main(["verify", str(bundle_copy), "--seconds", "0.2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["passed"] is True and Path(printed["results_file"]).is_file()


def test_tampered_reference_fails_with_exit_3(bundle_copy, capsys):
    # A reference that is right on every golden image: the artifact now "loses" every image it gets wrong.
    labels = np.load(bundle_copy / "golden" / "labels.npy")
    reference = np.load(bundle_copy / "golden" / "reference_logits.npy")
    perfect = np.zeros_like(reference)
    perfect[np.arange(len(labels)), labels] = 10.0
    np.save(bundle_copy / "golden" / "reference_logits.npy", perfect)
    _rehash(bundle_copy, "golden/reference_logits.npy")
    assert main(["verify", str(bundle_copy), "--seconds", "0.2"]) == 3
    captured = capsys.readouterr()
    assert "PAST BUDGET" in captured.out
    error = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "top-1 drop" in error[0] and "100.0%" in error[0]
    (results,) = _results(bundle_copy)
    assert results["passed"] is False and results["drift"]["failures"]


def test_damaged_golden_file_is_named(bundle_copy, capsys):
    path = bundle_copy / "golden" / "reference_logits.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["verify", str(bundle_copy)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error:") and "reference_logits.npy" in error and "damaged" in error
    assert not (bundle_copy / "results").exists()


def test_missing_model_file_is_named(bundle_copy, capsys):
    (bundle_copy / "models" / "model.bin").unlink()
    assert main(["verify", str(bundle_copy)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error:") and "model.bin" in error and "missing" in error


def test_not_a_bundle_and_unreadable_manifest(tmp_path, bundle_copy, capsys):
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "no such bundle" in capsys.readouterr().err
    (bundle_copy / "manifest.json").write_text("{ not json")
    assert main(["verify", str(bundle_copy)]) == 2
    error = capsys.readouterr().err
    assert "manifest.json" in error and "unreadable" in error


def test_bad_golden_shapes_are_reported(bundle_copy, capsys):
    labels = np.load(bundle_copy / "golden" / "labels.npy")
    np.save(bundle_copy / "golden" / "labels.npy", labels[:-1])
    _rehash(bundle_copy, "golden/labels.npy")
    assert main(["verify", str(bundle_copy)]) == 2
    assert "do not match" in capsys.readouterr().err


def test_gpu_bundle_is_sent_to_device_build(bundle_copy, capsys):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["target"] = "jetson"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(bundle_copy)]) == 2
    assert "device-build" in capsys.readouterr().err


def test_verify_a_tar_gz(build, tmp_path):
    archive = build / "bundle.tar.gz"
    assert archive.is_file()
    copy = tmp_path / "copied" / "bundle.tar.gz"
    copy.parent.mkdir()
    shutil.copyfile(archive, copy)
    assert main(["verify", str(copy), "--seconds", "0.2"]) == 0
    assert len(_results(tmp_path / "copied" / "bundle")) == 1


def test_verify_runs_without_torch(bundle_copy):
    blocker = "import sys\nfor name in ('torch', 'onnx', 'onnxsim'): sys.modules[name] = None\n"
    code = blocker + f"from pipeline.cli import main\nsys.exit(main(['verify', {str(bundle_copy)!r}, '--seconds', '0.2']))\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "within budget" in result.stdout


def test_cpu_description_of_an_arm_board():
    from pipeline.verify import cpu_description

    cpuinfo = ("processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
               "asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg\nCPU implementer\t: 0x41\n"
               "CPU part\t: 0xd42\n\nprocessor\t: 1\nFeatures\t: fp asimd asimddp\n")
    described = cpu_description(["FP32", "FP16", "INT8"], cpuinfo=cpuinfo)
    assert described["isa"] == ["neon", "fp16", "dotprod"]
    assert described["openvino_capabilities"] == ["FP32", "FP16", "INT8"]


def test_cpu_description_of_an_x86_server():
    from pipeline.verify import cpu_description

    cpuinfo = ("model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw "
               "avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    described = cpu_description(cpuinfo=cpuinfo)
    assert described["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"} <= set(described["isa"])
    assert "avx_vnni" not in described["isa"]


def test_verify_the_build_folder(build, capsys):
    assert main(["verify", str(build), "--seconds", "0.2"]) == 0
    shutil.rmtree(build / "bundle" / "results", ignore_errors=True)
