"""The quantization accuracy report of a finished build: report.md (+ PNGs), report.json, report.html.

`write_report(root)` reads `build/<model>/<target>/` (manifest.json, the reference and check logits,
quantize/gate.json, labels.txt, benchmark.json when present) and writes `root/report/` atomically
(a temporary folder renamed into place). Measurements that cost time (latency per artifact, the
deployment preprocessing row, the calibration-method comparison) are cached in `report/cache.json`
under the keys of the stages they measured, so a report of a cached build is quick. A missing
optional input never fails a build: the report says what is missing and how to get it.

The content is collected once into a JSON-ready dict (report.json) plus a list of sections (titles,
paragraphs, tables, figures, thumbnails) that `markdown` and `html` both render. Modules:
collect (reading the build), cache (report/cache.json), latency (the stage rows and their timing),
preprocessing (the deployment preprocessing row), calibration_methods (the opt-in comparison that
re-runs calibration), verdict (the headline: INT8 ready to ship, the recommended artifact), formats
(one representation of each metric), sections, markdown, html, plots.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.report import collect, html, sections as make
from pipeline.report.cache import CACHE_FILE, read_cache
from pipeline.report.calibration_methods import CALIBRATION_METHODS, calibration_comparison, compare_calibration_methods
from pipeline.report.collect import MANIFEST, read_manifest
from pipeline.report.latency import stage_rows
from pipeline.report.markdown import render_markdown
from pipeline.report.preprocessing import preprocessing_row
from pipeline.report.verdict import recommendation, verdict

__all__ = ["CALIBRATION_METHODS", "REPORT_DIR", "REPORT_FORMAT", "assemble", "command", "compare_calibration_methods",
           "find_builds", "read_manifest", "render_markdown", "write_report"]

REPORT_DIR = "report"
REPORT_FORMAT = "inception-edge-report/1"


def command(args) -> int:
    """`python -m pipeline report BUILD_DIR`: report every finished build under BUILD_DIR."""
    from pipeline.lock import folder_lock
    from pipeline.progress import Reporter

    if args.latency_seconds < 0:
        raise PipelineError(f"--latency-seconds must be 0 (no latency) or more, not {args.latency_seconds}")
    roots = find_builds(Path(args.build_dir), args.model, args.target)
    reporter = Reporter()
    for root in roots:
        with folder_lock(root, wait=not args.no_wait, say=reporter.say):  # not while a build rewrites it
            written = write_report(root, latency_seconds=args.latency_seconds, reporter=reporter,
                                   compare_calibration=args.compare_calibration)
        reporter.say(f"{root}: report written to {written}")
    return 0


def find_builds(build_dir: Path, models: list[str] | None = None, target: str | None = None) -> list[Path]:
    """Build folders (holding manifest.json): `build_dir` itself, or `build_dir/<model>/<target>/`."""
    if (build_dir / MANIFEST).is_file():
        return [build_dir]
    if not build_dir.is_dir():
        raise PipelineError(f"{build_dir}: no such folder: give the build folder (default: build) or build/<model>/<target>")
    roots = sorted(path.parent for path in build_dir.glob(f"*/*/{MANIFEST}"))
    chosen = [root for root in roots if (not models or root.parent.name in models) and (not target or root.name == target)]
    if not chosen:
        wanted = f" for {', '.join(models or [])} {target or ''}".rstrip() if models or target else ""
        raise PipelineError(f"{build_dir}: no finished build here{wanted} (no <model>/<target>/{MANIFEST}): "
                            "run `python -m pipeline build` first, or give build/<model>/<target>")
    return chosen


def write_report(root: Path, latency_seconds: float = 1.0, reporter=None, compare_calibration: bool = False) -> Path:
    """Write root/report/ (report.md + PNGs, report.json, report.html); return the path of report.html."""
    root = Path(root)
    manifest = read_manifest(root)
    folder = root / REPORT_DIR
    cache = read_cache(folder)
    report, sections, images = assemble(root, manifest, cache, latency_seconds, compare_calibration, reporter)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{REPORT_DIR}.", suffix=".tmp"))
    try:
        for name, data in images.items():
            (tmp / name).write_bytes(data)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report, sections))
        (tmp / "report.html").write_text(html.render(report, sections, images))
        (tmp / CACHE_FILE).write_text(json.dumps(cache, indent=1) + "\n")
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / "report.html"


def assemble(root: Path, manifest: dict, cache: dict, latency_seconds: float, compare_calibration: bool,
             reporter=None) -> tuple[dict, list[dict], dict[str, bytes]]:
    """(report.json's dict, the sections to render, {file name: PNG/JPEG bytes})."""
    build = collect.Build(root, manifest)
    say = reporter.say if reporter is not None else (lambda text: None)
    random = bool(manifest.get("weights", {}).get("random"))
    report = {
        "format": REPORT_FORMAT,
        "verdict": verdict(manifest, random),  # the headline: INT8 ready to ship, and why not
        "recommendation": None,  # the fastest artifact within its budget here (filled from the stage rows)
        "model": manifest.get("model"),
        "target": manifest.get("target"),
        "precision": manifest.get("precision"),
        "status": manifest.get("status"),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build": str(root),
        "weights": manifest.get("weights", {}),
        "random_weights": random,
        "deployed": manifest.get("deployed", {}),
        "preprocessing": manifest.get("preprocessing", {}),
        "host": manifest.get("host", {}),
        "skipped_images": manifest.get("skipped_images") or {"count": 0, "by_reason": {}, "files": []},
        "missing": [],  # optional inputs the report could not use, each with how to get it
    }
    missing = report["missing"]
    images: dict[str, bytes] = {}
    report["reference"] = collect.reference_summary(build)
    report["stages"] = stage_rows(build, cache, latency_seconds, say, missing)
    report["recommendation"] = recommendation(report["stages"])
    sections: list[dict] = [make.summary_section(report, build), make.stage_section(report, images)]
    report["deployment_preprocessing"] = preprocessing_row(build, cache, say, missing)
    sections.append(make.preprocessing_section(report["deployment_preprocessing"]))
    report["sensitivity"] = collect.sensitivity(build, missing)
    sections.append(make.sensitivity_section(report["sensitivity"], images))
    report["calibration_comparison"] = calibration_comparison(build, cache, compare_calibration, reporter, missing)
    sections.append(make.calibration_section(report["calibration_comparison"], images))
    report["flips"] = collect.flips(build, missing)
    sections.append(make.flips_section(report["flips"], build, images))
    report["benchmark"] = collect.benchmark(build, missing)
    sections.append(make.benchmark_section(report["benchmark"]))
    if report["skipped_images"]["count"]:
        sections.append(make.skipped_section(report["skipped_images"]))
    if missing:
        sections.append({"title": "Missing inputs", "blocks": [("list", missing)]})
    return report, sections, images


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Rename `tmp` into place; an old report is moved aside first (a rename never meets a full folder)."""
    if folder.exists():
        stale = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
        os.replace(folder, stale / "old")
        os.replace(tmp, folder)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, folder)
