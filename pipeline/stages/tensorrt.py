"""The TensorRT engine step of the GPU targets, after the bundle stage.

An engine is tied to the GPU and the TensorRT release it is built with, so it is built where it runs:
on a build host with TensorRT and a GPU the step builds and checks the engine into the bundle now
(through `pipeline.device_build`, as `device-build` does on the device); elsewhere it is deferred to
the device, and the manifest says why. It is not cached like the other stages: `device-build` keeps
its own engine cache keyed by GPU, TensorRT version and ONNX hash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.cache import StageRecord


def engine_step(bundle: "StageRecord", precision: str, reporter) -> dict:
    """Build and check the engine here when TensorRT and a GPU are, else defer it to the device.

    Returns the manifest's `tensorrt` entry, or its `deferred` entry."""
    try:
        from targets.tensorrt.device_info import tensorrt_status

        ok, reason = tensorrt_status()
    except ImportError as error:
        ok, reason = False, f"targets.tensorrt.device_info is not available ({error})"
    if not ok:
        reporter.say(f"  TensorRT engine: deferred to the device ({reason}): copy bundle.tar.gz there and run "
                     "`python -m pipeline device-build bundle.tar.gz`")
        return {"deferred": {"stage": "tensorrt", "reason": reason}}
    from pipeline.device_build import build_and_check

    result = build_and_check(bundle.folder, precision, reporter)
    drift = result.get("drift") or {}
    reporter.say(f"  TensorRT engine ({precision}): {'within budget' if result.get('passed') else 'over budget'}")
    return {"tensorrt": {"stage": f"tensorrt_{precision}", "passed": bool(result.get("passed")),
                         "drift": drift, "engine": result.get("engine"), "latency": result.get("latency"),
                         "throughput": result.get("throughput"), "device": result.get("device")}}
