"""`python -m pipeline verify ARTIFACT_DIR`: prove a CPU bundle's accuracy and time it on the CPU it landed on.

The golden crops run through OpenVINO with the inference precision the bundle records; OpenVINO's
read-back precision (what really ran: f32, bf16, ...) and the CPU's instruction set are recorded beside
the drift and the batch-1 latency in `results/verify-<hostname>-<UTC time>.json` inside the bundle.
Exit 0 within the bundle's budget, 3 (DriftError) past it.

Device-side: no torch, no ONNX, no build code; Python 3.10.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from pipeline import golden
from pipeline.artifact import Bundle
from pipeline.errors import DriftError, PipelineError

BATCH_SIZE = 8
# CPU features that decide which kernels OpenVINO can use (x86 flags / ARM "Features" in /proc/cpuinfo).
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_int8", "amx_bf16",  # x86
    "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2",  # ARM: NEON, FP16, dotprod, int8 matmul
)
ARM_NAMES = {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16"}


def command(args) -> int:
    results = verify(args.artifact, seconds=args.seconds)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(results["table"])
        print(f"results: {results['results_file']}")
    if not results["passed"]:
        raise DriftError(results["message"])
    return 0


def verify(artifact: str | Path, seconds: float = 5.0, reporter=None) -> dict:
    """Check a CPU bundle on this machine; returns the results (also written into the bundle)."""
    bundle = Bundle.open(artifact)
    xml, requested = openvino_artifact(bundle)
    crops, labels, reference = golden.load_golden(bundle)
    budget = golden.budget_for(bundle, bundle.precision)

    from targets.openvino import OpenVinoRunner

    golden.say(reporter, f"verify: {bundle.model} {bundle.precision} on {len(crops)} golden images "
                         f"(OpenVINO, inference precision {requested or 'OpenVINO default'})")
    try:
        runner = OpenVinoRunner(xml, inference_precision=requested)
    except PipelineError as error:
        if requested is None or "cannot run" not in str(error):
            raise
        raise PipelineError(f"{bundle.root}: the bundle pins inference precision {requested}, which this CPU cannot "
                            "run: rebuild the bundle with openvino.inference_precision auto (or f32)") from None
    logits = golden.run_golden(bundle, runner, crops, BATCH_SIZE)
    drift = golden.judge(f"verify {bundle.precision}", reference, logits, labels, budget)
    size = int(bundle.manifest["input"]["size"])
    latency = golden.time_runner(runner, (1, 3, size, size), seconds)

    expected = (bundle.manifest.get("expected") or {}).get(bundle.precision)
    ran = runner.describe()
    # OpenVINO reports the float precision; an INT8 IR (FakeQuantize layers) runs int8 kernels besides it.
    ran["precision_ran"] = ("int8 + " if is_int8_ir(xml) else "") + ran["execution_precision"]
    cpu = cpu_description(ran.get("optimization_capabilities"))
    rows = golden.comparison_rows(expected, drift, latency)
    rows.append(("precision", f"{bundle.precision} ({requested or 'OpenVINO default'})", ran["precision_ran"]))
    rows.append(("CPU", _host_cpu(bundle.manifest), cpu["model"]))
    rows.append(("ISA", "", " ".join(cpu["isa"]) or "—"))
    verdict = "within budget" if drift.passed else "PAST BUDGET"
    table = golden.render_table(f"verify {bundle.model} ({bundle.precision}, {bundle.root}): {verdict}", rows)
    results = {
        "command": "verify",
        "passed": drift.passed,
        "bundle": {"root": str(bundle.root), "model": bundle.model, "target": bundle.target,
                   "precision": bundle.precision, "artifact": str(xml.relative_to(bundle.root))},
        "hostname": golden.hostname(),
        "time_utc": golden.utc_stamp(),
        "requested_precision": requested,
        "ran": ran,
        "cpu": cpu,
        "drift": drift.as_dict(),
        "expected": expected,
        "latency": latency,
        "python": platform.python_version(),
    }
    if not drift.passed:
        results["message"] = golden.failure_message(f"{bundle.root}", drift, _advice(bundle, xml, ran, cpu))
    results["results_file"] = str(golden.write_results(bundle, f"verify-{results['hostname']}", results))
    results["table"] = table
    return results


def _advice(bundle: Bundle, xml: Path, ran: dict, cpu: dict) -> str:
    """What to do about a failed check: the saturation of INT8 pair sums when it is the likely cause."""
    from targets.cpu_features import int8_pairs_saturate

    int8 = bundle.manifest.get("int8") or {}
    if is_int8_ir(xml) and int8_pairs_saturate() and int8.get("overflow_fix") is False:
        return (f"{cpu['model']} has no VNNI, so its INT8 kernels add pairs of products in int16 and saturate, and "
                "this IR was built without the fix: rebuild it with quantization.overflow_fix: enable")
    return (f"OpenVINO ran {ran['execution_precision']} on {cpu['model']}: compare with the host's figures in "
            "manifest.json 'expected', and rebuild the bundle for this CPU if they differ")


def openvino_artifact(bundle: Bundle) -> tuple[Path, str | None]:
    """The bundle's IR and the inference precision to pin (None: OpenVINO's own choice)."""
    if bundle.target != "cpu":
        raise PipelineError(f"{bundle.root}: a {bundle.target} bundle holds ONNX for TensorRT, not an OpenVINO IR: "
                            "run `python -m pipeline device-build` on the GPU instead of verify")
    artifact = bundle.artifact()
    if artifact.get("kind") != "openvino":
        raise PipelineError(f"{bundle.root}: the {bundle.precision} artifact is {artifact.get('kind')!r}, "
                            "verify runs OpenVINO IRs: rebuild the bundle with --target cpu")
    from targets.openvino import precision_hint

    return bundle.path(artifact["file"]), precision_hint(artifact.get("inference_precision"))


def is_int8_ir(xml: Path) -> bool:
    try:
        return 'type="FakeQuantize"' in xml.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def cpu_description(capabilities=None, cpuinfo: str | None = None) -> dict:
    """CPU model and the instruction-set features that matter for inference kernels."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    isa = [ARM_NAMES.get(flag, flag) for flag in ISA_FLAGS if flag in flags]
    return {
        "model": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "isa": isa,
        "openvino_capabilities": list(capabilities or []),
    }


def _host_cpu(manifest: dict) -> str:
    host = manifest.get("host") or {}
    return str(host.get("cpu") or host.get("machine") or "")
