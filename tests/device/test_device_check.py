"""The device preflight (`python -m pipeline device-check`) and the pins it checks against."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import tomllib

from pipeline import device_check
from pipeline.device_check import FAIL, OK, SKIP, WARN
from targets.tensorrt.device_info import CUDA_PYTHON_CUDA13, CUDA_PYTHON_JETPACK6
from tests.targets.tensorrt_double import make_tensorrt

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["tensorrt", "cuda", "numpy", "dla", "gpu", "power", "disk"]


def test_the_tensorrt_extras_pin_what_each_jetpack_needs():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tensorrt"] == [CUDA_PYTHON_JETPACK6] == ["cuda-python>=12.6,<12.7"]  # JetPack 6: CUDA 12.6
    assert extras["tensorrt-cuda13"] == [CUDA_PYTHON_CUDA13]
    for doc in ("README.md", "docs/tensorrt.md"):  # the device install line installs the extra
        text = (ROOT / doc).read_text()
        assert "py3-none-any.whl[tensorrt]'   # JetPack 6: cuda-python 12.6.x" in text, doc
        assert "cuda-python>=12.6,<13" not in text, doc

def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def test_preflight_on_this_machine_reports_every_check_cleanly():
    """No TensorRT and no GPU here: every check still gives its one line, and the exit status is 2."""
    done = subprocess.run([sys.executable, "-m", "pipeline", "device-check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines] == NAMES and not done.stderr.strip()
    assert all(line.split()[0] in ("OK", "WARN", "FAIL", "SKIP") for line in lines)
    if tensorrt_importable():
        pytest.skip("TensorRT imports here: the no-TensorRT lines do not apply")
    assert lines[0].startswith("FAIL tensorrt  TensorRT's Python module is not installed")
    assert done.returncode == 2  # something blocks an engine build
    as_json = subprocess.run([sys.executable, "-m", "pipeline", "device-check", "--json"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    report = json.loads(as_json.stdout)
    assert [c["name"] for c in report["checks"]] == NAMES and report["exit"] == as_json.returncode == 2


def fake_bundle(tmp_path, precision="int8", dla_core=-1, files=("models/fp32.onnx", "models/int8_qdq.onnx")):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\0" * 4096)
    manifest = {"precision": precision, "input": {"size": 224, "name": "input"},
                "tensorrt": {"dla_core": dla_core, "workspace_mib": 2048},
                "files": {name: "" for name in files}}
    return types.SimpleNamespace(root=tmp_path, manifest=manifest, precision=precision, path=lambda f: tmp_path / f)


def test_the_precision_path_is_checked_against_this_tensorrt(tmp_path):
    trt10, trt11 = make_tensorrt("10.3", "10.3.0"), make_tensorrt("11.1", "11.1.0")
    check = device_check.check_tensorrt(trt10, fake_bundle(tmp_path))
    assert check.status == OK and "TensorRT 10.3.0, FP16/INT8 flags (10.x branch)" in check.found
    assert "int8 from int8_qdq.onnx" in check.found
    dla = device_check.check_tensorrt(trt10, fake_bundle(tmp_path, dla_core=0))
    assert dla.status == OK and "fp32.onnx" in dla.found and "calibration cache" in dla.found
    missing = device_check.check_tensorrt(trt11, fake_bundle(tmp_path))  # no FP16-typed Q/DQ model in the bundle
    assert missing.status == FAIL and "strongly typed only (11.x branch)" in missing.found
    assert "needs the bundle's int8_qdq_fp16 model" in missing.found and missing.todo
    assert device_check.check_tensorrt("not installed", None).status == FAIL


def cudart_reporting(driver: int, runtime: int):
    error = types.SimpleNamespace(cudaSuccess=0)
    return types.SimpleNamespace(cudaError_t=error, cudaDriverGetVersion=lambda: (0, driver),
                                 cudaRuntimeGetVersion=lambda: (0, runtime))


@pytest.mark.parametrize("package, driver, runtime, status, words", [
    ("13.4.4", 12060, 13040, FAIL, "cuda-python 13.x needs a CUDA 13 driver: pip install 'cuda-python>=12.6,<12.7'"),
    ("12.6.2.post1", 12060, 12060, OK, "cuda-python 12.6.2.post1, CUDA runtime 12.6, driver 12.6"),
    ("12.9.0", 12060, 12090, WARN, "runtime is newer than the driver"),
    ("12.6.2", 0, 12060, FAIL, "driver none: no NVIDIA driver here"),
])
def test_cuda_python_against_the_driver(monkeypatch, package, driver, runtime, status, words):
    from targets.tensorrt import device_info

    monkeypatch.setattr(device_info, "cudart", lambda: cudart_reporting(driver, runtime))
    monkeypatch.setattr(device_info, "_cuda_python_version", lambda: package)
    check = device_check.check_cuda(None, None)
    assert check.status == status and words in check.line()


def test_numpy_dla_power_and_disk(tmp_path, monkeypatch):
    import numpy as np

    from targets.tensorrt import device_info

    trt = make_tensorrt("10.3", "10.3.0", dla_cores=0)
    numpy = device_check.check_numpy(trt, None)
    assert numpy.status == (WARN if np.__version__.startswith("2") else OK)
    assert device_check.check_numpy("no tensorrt", None).status == SKIP
    dla = device_check.check_dla(trt, fake_bundle(tmp_path, dla_core=0))
    assert dla.status == FAIL and "0 DLA cores, the bundle asks for core 0" in dla.found and "--dla-core -1" in dla.todo
    assert device_check.check_dla(make_tensorrt("10.3"), fake_bundle(tmp_path, dla_core=1)).status == OK
    monkeypatch.setattr(device_info, "jetson_info", lambda: {"l4t_release": "36.4.3", "power_mode": {"name": "15W"},
                                                            "clocks_mhz": {"gpu": 612}, "jetson_clocks": None})
    power = device_check.check_power(None, None)
    assert power.status == WARN and "power mode 15W, GPU clock 612 MHz" in power.found and "nvpmodel -m 0" in power.todo
    disk = device_check.check_disk(None, fake_bundle(tmp_path))
    assert disk.status == OK and "an engine build needs about 0 MiB" in disk.found
    monkeypatch.setattr(device_check.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1024))
    assert device_check.check_disk(None, fake_bundle(tmp_path)).status == FAIL


def test_a_broken_check_reports_itself(monkeypatch):
    def broken(trt, bundle):
        raise RuntimeError("boom")

    monkeypatch.setattr(device_check, "check_power", broken)
    checks = device_check.run_checks()
    assert any(c.status == FAIL and "the check itself failed: RuntimeError: boom" in c.found for c in checks)
    assert device_check.exit_status([device_check.Check("x", WARN, "")]) == 0
    assert device_check.exit_status(checks) == 2
