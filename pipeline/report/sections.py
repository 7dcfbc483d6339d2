"""The report's sections: what the markdown and HTML writers render, built from report.json's data.

A section is {"title", "blocks"}; a block is ("text", str), ("warning", str), ("list", [str]),
("table", headers, rows), ("figure", file name, caption) or ("gallery", [{"file", "caption"}]).
A builder that draws a figure or a thumbnail adds its bytes to `images` under the name it uses.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from pipeline.formats import abs_diff, cosine, pct, percent, percent_change, points, sqnr
from pipeline.report.plots import calibration_plot, sensitivity_plot, stages_plot
from pipeline.report.collect import Build, resolve_image
from pipeline.report.verdict import budget_checks, headline_blocks

MAX_FLIP_THUMBNAILS = 48
THUMBNAIL_SIZE = 160
BENCHMARK_SECTIONS = ("latency", "throughput", "frame_path", "nncf")  # benchmark.json, see pipeline.measure.benchmark
BENCHMARK_HIDDEN = {"key", "artifact"}  # internal names and long paths: the back end's name says it


def summary_section(report: dict, build: Build) -> dict:
    manifest = build.manifest
    blocks = headline_blocks(report)
    if report["random_weights"]:
        blocks.append(("warning", "RANDOM WEIGHTS: this build's network was never trained. Accuracy, agreement "
                       "and changed predictions below mean nothing; drift is judged on mean-centred logits "
                       "(centred cosine / SQNR). Do not ship it."))
    if report["status"] != "ok":
        blocks.append(("warning", f"The build did not finish: {report['status']}."))
    deployed = report["deployed"]
    pre = report["preprocessing"]
    blocks.append(("table", ["", ""], [
        ["model", str(report["model"])], ["target", str(report["target"])],
        ["deployed", f"{deployed.get('artifact')} ({report['precision']}"
                     + (f", OpenVINO precision {deployed['inference_precision']})" if deployed.get("inference_precision")
                        else ", engine built on the device)")],
        ["layers kept in float", ", ".join(deployed.get("int8_layers_in_float") or []) or "none"],
        ["weights", _weights_text(report["weights"])],
        ["preprocessing", f"resize {pre.get('resize')} ({pre.get('interpolation')}), center crop {pre.get('crop')}, "
                          f"mean {pre.get('mean')}, std {pre.get('std')}"],
        ["evaluation images", str(manifest.get("evaluation_images"))],
        ["skipped images", skipped_text(report["skipped_images"])],
        ["host", f"{report['host'].get('processor')}, Python {report['host'].get('python')}"],
        ["report written", report["generated_at"]],
    ]))
    return {"title": f"{report['model']} on {report['target']}: quantization accuracy report", "blocks": blocks}


def skipped_text(skipped: dict) -> str:
    """'3 (truncated 1, unreadable 1, missing from val.txt 1)', or 'none'."""
    if not skipped["count"]:
        return "none"
    return f"{skipped['count']} (" + ", ".join(f"{kind} {n}" for kind, n in skipped["by_reason"].items()) + ")"


def skipped_section(skipped: dict) -> dict:
    """Every file the build left out, with its reason (the manifest's skipped_images)."""
    rows = [[row["kind"], row["path"], row["reason"], row["images"]] for row in skipped["files"]]
    return {"title": "Skipped images", "blocks": [
        ("warning", f"The build left out {skipped_text(skipped)} files: check the data if this is unexpected."),
        ("table", ["reason", "file", "detail", "found by"], rows)]}


def _weights_text(weights: dict) -> str:
    text = weights.get("source", "?")
    if weights.get("sha256"):
        text += f" (sha256 {weights['sha256'][:12]}…)"
    return text + (" — RANDOM, accuracy meaningless" if weights.get("random") else "")


def stage_section(report: dict, images: dict) -> dict:
    headers = ["stage", "ran in", "images", "top-1", "top-5", "agreement", "flips lost/gained", "cosine",
               "SQNR", "max abs diff", "relative max abs diff", "centred cos / SQNR", "size", "latency p50 / p99 ms",
               "verdict"]
    rows = []
    reference = report["reference"]
    notes = []
    for row in report["stages"]:
        drift = row["drift"]
        latency = row["latency"]
        latency_text = f"{latency['median_ms']:.2f} / {latency['p99_ms']:.2f}" if latency else "—"
        if row["latency_note"] and row["checked"]:
            notes.append(f"{row['stage']} latency: {row['latency_note']}")
        if drift is None:
            if row["stage"] == "reference":
                rows.append(["reference", row.get("precision_ran") or "fp32 (torch)", str(reference.get("images", "—")),
                             percent(reference.get("top1")), percent(reference.get("top5")), "—", "—", "—",
                             "—", "—", "—", "—", "—", "—", f"the reference ({reference.get('distinct_classes', '?')} distinct classes predicted)"])
            continue
        rows.append([
            row["stage"], row["precision_ran"] or "?", str(drift["images"]),
            percent_change(drift.get("ref_top1"), drift.get("top1")),
            percent_change(drift.get("ref_top5"), drift.get("top5")), pct(drift.get("agreement")),
            "—" if drift.get("flips_lost") is None else f"{drift['flips_lost']} / {drift['flips_gained']}",
            cosine(drift.get("cosine")), sqnr(drift.get("sqnr_db")), abs_diff(drift.get("max_abs")),
            abs_diff(drift.get("max_abs_rel")),
            f"{cosine(drift.get('centred_cosine'))} / {sqnr(drift.get('centred_sqnr_db'))}",
            _size(row["size_bytes"]), latency_text, drift_verdict(drift),
        ])
    blocks = []
    if report["random_weights"]:
        blocks.append(("warning", "Random weights: top-1 / top-5 / agreement are meaningless here; read the centred "
                                  "cosine and SQNR."))
    blocks += [("text", "Every stage against the FP32 reference (torch; ONNX Runtime on a user's ONNX file) on the first N evaluation images (top-1: "
                        "reference → stage; flips: images right in FP32 and wrong in the stage / the reverse)."),
               ("table", headers, rows)]
    for count, group in stage_groups(report["stages"]).items():  # never figures of different image sets in one chart
        name = f"stages_{count}.png"
        images[name] = stages_plot([r["stage"] for r in group], [r["drift"].get("top1") for r in group],
                                   [r["drift"]["agreement"] for r in group], [r["drift"].get("sqnr_db") for r in group],
                                   title=f"Accuracy per stage, on {count} images")
        blocks.append(("figure", name, f"Accuracy and SQNR of the stages judged on {count} images: "
                                       + ", ".join(r["stage"] for r in group)))
    if notes:
        blocks.append(("list", notes))
    return {"title": "Stages", "blocks": blocks}


def stage_groups(rows: list[dict]) -> dict[int, list[dict]]:
    """The checked stage rows by the number of images they were judged on (one chart each)."""
    groups: dict[int, list[dict]] = {}
    for row in rows:
        if row["drift"] is not None:
            groups.setdefault(int(row["drift"]["images"]), []).append(row)
    return groups


def drift_verdict(drift: dict) -> str:
    """"pass", or "FAIL: " and each budget missed beside its figure (the manifest's reasons when none is)."""
    if drift.get("passed"):
        return "pass"
    past = [check["text"] for check in budget_checks(drift) if check["within"] is False]
    return "FAIL: " + "; ".join(past or drift.get("failures") or ["failed"])


def preprocessing_section(row: dict) -> dict:
    if "drift" not in row:
        return {"title": "Deployment preprocessing", "blocks": [("text", f"Not measured: {row['note']}.")]}
    drift = row["drift"]
    table = ["deployment preprocessing", str(drift["images"]), pct(drift.get("agreement")),
             percent_change(drift.get("ref_top1"), drift.get("top1")), cosine(drift.get("cosine")),
             sqnr(drift.get("sqnr_db")), abs_diff(drift.get("max_abs"))]
    return {"title": "Deployment preprocessing", "blocks": [
        ("text", "The deployed artifact on frames preprocessed the camera runtime's fast way, against the torch "
                 "FP32 reference on PIL-bicubic crops: the preprocessing's own drift, on top of the model's."),
        ("table", ["row", "images", "agreement", "top-1", "cosine", "SQNR", "max abs diff"], [table])]}


def sensitivity_section(sensitivity: dict, images: dict) -> dict:
    if "ranking" not in sensitivity:
        return {"title": "Per-layer sensitivity", "blocks": [("text", sensitivity["note"] + ".")]}
    kept = sensitivity["kept_in_float"]
    blocks = [("text", f"{sensitivity['layers']} quantized convolutions ranked by the SQNR of each one quantized "
                       f"alone (one-pass ranking of the INT8 gate). Kept in float by the gate: "
                       f"{', '.join(kept) if kept else 'none (every convolution runs in INT8)'}.")]
    if sensitivity["ranking"]:
        images["sensitivity.png"] = sensitivity_plot(sensitivity["ranking"], kept)
        blocks.append(("figure", "sensitivity.png", "Per-layer sensitivity (red: kept in float)"))
    attempts = [[str(a["excluded_count"]), "pass" if a["passed"] else "over budget",
                 f"{a['figure_name']}: {gate_figure_text(a['figure_name'], a['figure'])}",
                 " / ".join(pct(v) for v in (a.get("agreement") or {}).values())]
                for a in sensitivity["attempts"]]
    if attempts:
        decided = sensitivity.get("decided_on") or {}
        if decided:
            blocks.append(("text", f"The gate's trade-off, seen on its own {decided['images']} decision images "
                                   "(train-sample/, never calibration images; the figures reported elsewhere are on "
                                   "the evaluation images, which the gate never reads):"))
        blocks.append(("table", ["layers in float", "gate verdict", "figure", "agreement ORT / OpenVINO"], attempts))
    return {"title": "Per-layer sensitivity", "blocks": blocks}


def gate_figure_text(name: str | None, value) -> str:
    """The gate's figure (pipeline.stages.quantize.gate.gate_figure) in the report's one format for it."""
    if name == "top-1 agreement":
        return pct(value)
    if name and name.startswith("top-1 drop"):
        return points(value)
    return cosine(value) if name and "cosine" in name else _number(value, ".4g")


def calibration_section(comparison: dict, images: dict) -> dict:
    if "methods" not in comparison:
        return {"title": "Calibration methods and INT8 options", "blocks": [("text", comparison["note"] + ".")]}
    own = next(row for row in comparison["methods"] if row["build_method"])
    methods = [(row["method"] + (" (this build)" if row["build_method"] else ""), row) for row in comparison["methods"]]
    options = [(f"{row['option']}: {'on' if row['value'] else 'off'}", row) for row in comparison.get("options", [])]
    # Random weights: the centred figures are the ones that mean something (pipeline.yaml, drift.random_weights).
    centred = "centred_" if comparison.get("random_weights") else ""  # the key prefix of the drift figures
    shown = centred.replace("_", " ")
    header = ["Q/DQ model", "calibration images", "top-1 (ORT · OV)", "agreement (ORT · OV)",
              "flips lost/gained (ORT · OV)", f"{shown}SQNR (ORT · OV)", f"{shown}cosine (ORT)", "verdict (ORT · OV)"]
    built = ", ".join(f"{option} {'on' if value else 'off'}" for option, value in comparison.get("build_options", {}).items())
    rows = [_comparison_row(name, row, centred) for name, row in methods]
    option_rows = [_comparison_row(f"this build ({own['method']})", own, centred)] + [
        _comparison_row(name, row, centred) for name, row in options]
    everything = methods + options
    images["calibration.png"] = calibration_plot([name for name, _ in everything],
                                                 [row["drift"].get("top1") for _, row in everything],
                                                 [row["drift"]["agreement"] for _, row in everything],
                                                 [row["drift"].get(f"{centred}sqnr_db") for _, row in everything])
    blocks = [("text", f"The Q/DQ model re-quantized from the build's FP32 graph (the build's calibration images; "
                       f"percentile {comparison['percentile']}, {comparison['bins']} histogram bins; the same "
                       f"{len(comparison['kept_in_float'])} layers in float as the gate chose), in ONNX Runtime (ORT) "
                       f"and, converted to an IR, OpenVINO (OV) on {comparison['images']} INT8 evaluation images, "
                       f"judged on the quantize and openvino_int8 budgets. First each calibration method with the "
                       f"build's options ({built or 'as recorded'}):"),
              ("table", header, rows)]
    if options:
        blocks += [("text", "Then the build's method with one INT8 option (`quantization.<option>`) turned the "
                            "other way:"),
                   ("table", header, option_rows)]
    for option, why in comparison.get("options_not_compared", {}).items():
        blocks.append(("text", f"{option}: not compared ({why})."))
    blocks.append(("figure", "calibration.png", "Calibration methods and INT8 options compared (ONNX Runtime)"))
    if comparison.get("note"):
        blocks.insert(0, ("warning", comparison["note"]))
    return {"title": "Calibration methods and INT8 options", "blocks": blocks}


def _comparison_row(name: str, row: dict, centred: str) -> list[str]:
    """One Q/DQ model's figures on ONNX Runtime · OpenVINO (a comparison cached before OpenVINO: ORT alone);
    `centred`: "centred_" to show the centred SQNR and cosine (random weights)."""
    ort, ov = row["drift"], row.get("openvino") or {}

    def both(format_one) -> str:
        return format_one(ort) + (f" · {format_one(ov)}" if ov else "")

    return [name, str(row["calibration_images"]), both(lambda d: percent_change(d.get("ref_top1"), d.get("top1"))),
            both(lambda d: pct(d.get("agreement"))),
            both(lambda d: "—" if d.get("flips_lost") is None else f"{d['flips_lost']}/{d['flips_gained']}"),
            both(lambda d: sqnr(d.get(f"{centred}sqnr_db"))), cosine(ort.get(f"{centred}cosine")), both(drift_verdict)]


def flips_section(flips: dict, build: Build, images: dict) -> dict:
    if flips.get("note"):
        return {"title": "Changed predictions", "blocks": [("text", flips["note"] + ".")]}
    counts = "; ".join(f"{stage}: {c['changed']} of {c['images']} images" for stage, c in flips["counts"].items())
    blocks = [("text", f"Evaluation images whose top-1 class differs between the FP32 reference and an INT8 stage "
                       f"({counts or 'no INT8 logits'}).")]
    if not flips["images"]:
        blocks.append(("text", "No image changed its top-1 class."))
        return {"title": "Changed predictions", "blocks": blocks}
    gallery, rows = [], []
    for number, row in enumerate(flips["images"]):
        int8 = "; ".join(f"{stage}: {p['name']}" for stage, p in row["int8"].items())
        truth = row["label_name"] or "unknown"
        rows.append([str(row["index"]), Path(row["image"]).name if row["image"] else "?", truth, row["fp32_name"], int8])
        if number >= MAX_FLIP_THUMBNAILS:
            continue
        thumbnail = _thumbnail(row["image"])
        if thumbnail is None:
            continue
        name = f"flip_{row['index']:04d}.jpg"
        images[name] = thumbnail
        gallery.append({"file": name, "caption": f"true: {truth} | FP32: {row['fp32_name']} | INT8 {int8}"})
    if gallery:
        blocks.append(("gallery", gallery))
    if len(flips["images"]) > MAX_FLIP_THUMBNAILS:
        blocks.append(("text", f"Thumbnails of the first {MAX_FLIP_THUMBNAILS} only; the table lists all."))
    blocks.append(("table", ["#", "image", "true label", "FP32 top-1", "INT8 top-1"], rows))
    return {"title": "Changed predictions", "blocks": blocks}


def _thumbnail(path: str | None) -> bytes | None:
    """A JPEG thumbnail of an evaluation image, or None when it cannot be read from here."""
    from PIL import Image

    resolved = resolve_image(path) if path else None
    if resolved is None:
        return None
    try:
        with Image.open(resolved) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            return buffer.getvalue()
    except OSError:
        return None


def benchmark_section(benchmark) -> dict:
    title = "Benchmark"
    if benchmark is None:
        return {"title": title, "blocks": [("text", "No benchmark.json in this build: run `python -m pipeline benchmark "
                                                    "--latency --throughput --frame-path` to add latency percentiles, "
                                                    "throughput and the camera frame path here.")]}
    blocks = []
    for name in BENCHMARK_SECTIONS:
        section = benchmark.get(name) if isinstance(benchmark, dict) else None
        if not isinstance(section, dict) or not section.get("rows"):
            continue
        rows = section["rows"]
        headers = [key for key in dict.fromkeys(key for row in rows for key in row)
                   if key not in BENCHMARK_HIDDEN and any(row.get(key) not in (None, "") for row in rows)]
        machine = section.get("machine") or {}
        blocks.append(("text", f"{name.replace('_', ' ')} (python -m pipeline benchmark, {section.get('time', '?')}, "
                               f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores):"))
        blocks.append(("table", [h.replace("_", " ") for h in headers], [[_cell(row.get(h)) for h in headers] for row in rows]))
    if blocks:
        return {"title": title, "blocks": blocks}
    for name, rows in _benchmark_tables(benchmark):  # another layout: every list of rows in it
        headers = list(dict.fromkeys(key for row in rows for key in row))
        blocks.append(("text", f"{name}:"))
        blocks.append(("table", headers, [[_cell(row.get(h)) for h in headers] for row in rows]))
    if not blocks:
        blocks.append(("text", "benchmark.json holds no table: " + json.dumps(benchmark)[:500]))
    return {"title": title, "blocks": blocks}


def _benchmark_tables(benchmark) -> list[tuple[str, list[dict]]]:
    """Lists of row dicts anywhere in benchmark.json (its layout belongs to `pipeline.measure.benchmark`)."""
    tables = []

    def walk(value, name: str) -> None:
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            tables.append((name, value))
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{name}.{key}" if name else str(key))

    walk(benchmark, "")
    return tables


# ---------------------------------------------------------------------------------------------------
# Cell text.


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _number(value, spec: str) -> str:
    """A metric from DriftResult.as_dict(): a float, None (undefined), or "inf"/"nan" strings."""
    if value is None:
        return "—"
    if value == "inf":
        return "∞"
    if isinstance(value, str):
        return value
    return format(value, spec) if math.isfinite(value) else str(value)


def _size(size: int | None) -> str:
    if size is None:
        return "—"
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
