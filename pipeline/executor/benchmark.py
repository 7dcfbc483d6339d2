"""Evaluation throughput of a finished build's artifacts: in this process, and on Ray with 1 and 2 workers, and
a projection (a projection: computed, not measured) of the wall time of every stage's check on ImageNet's
50,000 validation images with N workers.

    python -m pipeline.executor.benchmark [--images 128] [--workers 1 2] [--json FILE] -- <build arguments>

The build arguments are those of the finished `python -m pipeline build` (its folder is read, not rebuilt).
Each figure is images per second of one request through the executor, decoding included (a Ray worker decodes
its shard; the local run decodes the set once, outside the timing, as a build does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

FULL_VAL = 50_000


def _specs(ctx) -> dict:
    """Every checked stage's artifact as its drift check opens it, and the torch reference."""
    from pipeline.cache import StageRecord
    from pipeline.executor.work import RunnerSpec

    specs = {"reference": RunnerSpec("torch", module=ctx.model.module)}
    for stage in ctx.plan.stages:
        folder = ctx.root / stage.name
        if stage.runner is not None and folder.is_dir():
            specs[stage.name] = stage.runner(ctx, StageRecord.read(folder))
    return specs


def _rate(executor, spec, ctx, count: int) -> float:
    executor.predict(spec, ctx.images("evaluation"), min(count, 16), "warm-up", ctx.preprocessing)
    started = time.perf_counter()
    done = executor.predict(spec, ctx.images("evaluation"), count, "timed", ctx.preprocessing)
    return len(done.logits) / (time.perf_counter() - started)


def measure(build_args: list[str], images: int, workers: list[int]) -> dict:
    from pipeline.cli import _configs, _parser
    from pipeline.context import BuildContext
    from pipeline.executor.local import LocalExecutor
    from pipeline.plan import BuildPlan
    from pipeline.progress import Reporter

    import os

    load_before = os.getloadavg()[0]
    (config, *_), names = _configs(_parser().parse_args(["build", *build_args]))
    reporter = Reporter()
    ctx = BuildContext(BuildPlan(config, names[0]), reporter)
    specs = _specs(ctx)
    ctx.evaluation  # noqa: B018  decoded once, as a local build does, outside the timings
    rates = {name: {"local": _rate(LocalExecutor(config.data.batch_size, reporter), spec, ctx, images)}
             for name, spec in specs.items()}
    import ray

    from pipeline.executor.ray_cluster import RayExecutor

    for count in workers:
        ray.init(num_cpus=count * config.executor.worker_cpus, include_dashboard=False, logging_level="ERROR")
        try:
            shard = -(-images // count)  # one shard per worker
            executor = RayExecutor(replace(config.executor, kind="ray", shard_images=shard), config.data.batch_size,
                                   reporter)
            for name, spec in specs.items():
                rates[name][f"ray {count}"] = _rate(executor, spec, ctx, images)
        finally:
            ray.shutdown()
    per_worker = {name: rate[f"ray {workers[0]}"] / workers[0] for name, rate in rates.items()}
    seconds_one = sum(FULL_VAL / rate for rate in per_worker.values())
    return {"model": ctx.model_name, "target": config.target, "images": images, "batch_size": config.data.batch_size,
            "worker_cpus": config.executor.worker_cpus, "rates": rates, "cpus": os.cpu_count(),
            "load_average": {"before": load_before, "after": os.getloadavg()[0]},
            "projection": {"images": FULL_VAL, "per_worker_images_per_second": per_worker,
                           "hours_by_workers": {n: seconds_one / n / 3600 for n in (1, 2, 8, 32, 128)}}}


def render(result: dict) -> str:
    columns = list(next(iter(result["rates"].values())))
    lines = [f"| stage | {' | '.join(columns)} (images/s) |", "| --- |" + " ---: |" * len(columns)]
    for name, rate in result["rates"].items():
        lines.append(f"| {name} | " + " | ".join(f"{rate[c]:.1f}" for c in columns) + " |")
    hours = result["projection"]["hours_by_workers"]
    lines.append("")
    lines.append("Projection (not measured) for 50,000 images x these stages: "
                 + ", ".join(f"{n} workers {h:.2f} h" for n, h in hours.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, build_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m pipeline.executor.benchmark")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(ours)
    result = measure(build_args, args.images, args.workers)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
