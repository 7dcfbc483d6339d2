"""`python -m pipeline benchmark --nncf`: NNCF against our INT8. NNCF's own `nncf.quantize` of the
simplified FP32 ONNX and our Q/DQ path, each as an INT8 IR, judged on the same calibration images and
the same evaluation, with the batch-1 latency of both. The rows go into benchmark.json's "nncf" section.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.layout import MANIFEST
from pipeline.measure.benchmark import (
    built_root,
    check_seconds,
    fmt,
    write_benchmark_section,
)
from pipeline.measure.machine import cpu_summary


def compare_nncf(config, models: list[str], seconds: float) -> str:
    """NNCF's own `nncf.quantize` against our Q/DQ path, same calibration images, same evaluation."""
    from pipeline.cache import StageRecord
    from pipeline.context import BuildContext
    from pipeline.plan import BuildPlan
    from pipeline.progress import Reporter
    from targets.nncf_quantizer import nncf_quantize_ir
    from targets.openvino import OpenVinoRunner
    from targets.timing import measure_interleaved

    check_seconds(seconds)
    rows = []
    for model in models:
        root = built_root(config, model)
        if not (root / "openvino_int8" / "model.xml").is_file():
            raise PipelineError(f"{root} has no OpenVINO INT8 IR: --nncf compares INT8 IRs of a CPU build "
                                "(build with --target cpu --precision int8)")
        manifest = json.loads((root / MANIFEST).read_text())
        ctx = BuildContext(BuildPlan(config, model), Reporter())
        model_rows = []
        reference = StageRecord.read(root / "reference")
        count = config.quantization.evaluation_images
        crops = ctx.calibration.crops
        batches = [ctx.preprocessing.normalize(crops[i : i + 8]) for i in range(0, len(crops), 8)]
        with tempfile.TemporaryDirectory(prefix="nncf-") as folder:
            started = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # NNCF draws its progress on stdout: keep the table clean
                xml = nncf_quantize_ir(root / "simplify" / "model.onnx", batches, len(crops), Path(folder) / "model.xml")
            quantize_seconds = time.perf_counter() - started
            candidates = {
                f"NNCF nncf.quantize (subset_size={len(crops)})": (xml, f"{quantize_seconds:.0f} s"),
                f"ours: Q/DQ ONNX ({manifest['stages']['calibrate']['facts']['method']}) -> IR": (
                    root / "openvino_int8" / "model.xml", f"{manifest['stages']['quantize']['build_seconds']:.0f} s (gate included)"),
            }
            shape = (1, 3, ctx.preprocessing.crop, ctx.preprocessing.crop)
            # Interleaved: the two IRs are timed in alternating slices, so a load that comes and goes falls on both.
            latencies = measure_interleaved({name: (lambda p=path: OpenVinoRunner(p, ctx.deployed_openvino_hint,
                                                                                  static_batch=1))
                                             for name, (path, _) in candidates.items()}, shape, seconds=seconds)
            for name, (path, took) in candidates.items():
                runner = OpenVinoRunner(path, inference_precision=ctx.deployed_openvino_hint, threads=ctx.threads)
                result = ctx.judge("openvino_int8", reference, ctx.predict(runner, count, name))
                latency = latencies[name]
                d = result.as_dict()
                model_rows.append({"int8_ir_from": name, "quantize_time": took, "fp32_top1": d["ref_top1"],
                                   "int8_top1": d["top1"], "flips_lost": d["flips_lost"],
                                   "flips_gained": d["flips_gained"], "agreement": d["agreement"],
                                   "sqnr_db": d["sqnr_db"], "centred_cosine": d["centred_cosine"],
                                   "batch1_p50_ms": latency.p50_ms, "batch1_p90_ms": latency.p90_ms,
                                   "batch1_p99_ms": latency.p99_ms})
                rows.append(
                    f"| {model} | {name} | {took} | {fmt(d['ref_top1'], '.2f')} | {fmt(d['top1'], '.2f')} | "
                    f"{d['flips_lost'] if d['flips_lost'] is not None else '—'} / "
                    f"{d['flips_gained'] if d['flips_gained'] is not None else '—'} | {d['agreement']:.2%} | "
                    f"{fmt(d['sqnr_db'], '.1f')} | {fmt(d['centred_cosine'], '.4f')} | {latency.median_ms:.1f} |")
                print(rows[-1], file=sys.stderr)
        write_benchmark_section(root, "nncf", {"seconds": seconds, "rows": model_rows})
    return "\n".join([
        f"Machine: {cpu_summary()}. Calibration: {config.data.calibration_images} train-sample images; evaluation: "
        f"{config.quantization.evaluation_images} val images; OpenVINO precision of float layers: "
        f"{config.openvino.inference_precision}.",
        "",
        "| model | INT8 IR from | quantize time | FP32 top-1 % | INT8 top-1 % | flips lost / gained | agreement | SQNR dB | centred cosine | batch-1 median ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])
