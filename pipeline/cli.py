"""Command line: `python -m pipeline build | stages | clean | benchmark | report | device-build | device-check | verify | run | deepstream`.

The device-side commands (device-build, verify, run, deepstream) import no torch and no build code.

Every user error is one line on stderr and exit code 2; a stage over its drift budget exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from calibration import METHODS as CALIBRATION_METHODS
from pipeline.errors import PipelineError
from pipeline.runtime.backends import BACKENDS
from targets import TARGETS

NO_WAIT_HELP = "if another process is writing the build folder, exit 4 at once instead of waiting for it"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    parser = _Parser(prog="python -m pipeline", description=(
        "Compile Inception-v4 / Inception-ResNet ImageNet classifiers for edge devices, checking "
        "accuracy drift against the torch FP32 reference after every stage."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    common = _Parser(add_help=False)
    common.add_argument("--config", type=Path, help="a pipeline.yaml whose keys override the defaults")
    common.add_argument("--target", action="append", choices=TARGETS,
                        help="where the artifact runs; repeat for several (default: pipeline.yaml's target)")
    common.add_argument("--model", action="append", metavar="NAME",
                        help="network to build; repeat for several, or 'all' (default: pipeline.yaml's models)")
    common.add_argument("--build-dir", type=Path, help="artifact folder (default: build)")
    common.add_argument("--precision", choices=("int8", "fp32", "fp16"),
                        help="precision the artifact is deployed in (default int8); fp32/fp16 skip the INT8 stages")

    build = commands.add_parser("build", parents=[common], help="run the stages of a target (cached)")
    build.add_argument("--imagenet", type=Path, metavar="DIR", help="ImageNet root: Caffe (synsets.txt, train-sample/, val/ + val.txt), ImageFolder or Kaggle layout")
    build.add_argument("--weights", help="imagenet, random, or a .safetensors / .pth / .pt checkpoint")
    build.add_argument("--num-classes", type=int, help="classes of a fine-tuned head (default: read from the checkpoint)")
    build.add_argument("--labels", type=Path, help="labels file of a fine-tuned network, one class name per line")
    build.add_argument("--input-size", type=int, help="input resolution of a fine-tuned network")
    build.add_argument("--frames", type=Path, metavar="DIR",
                       help="your own unlabelled images (a camera's frames) for calibration and label-free checks")
    build.add_argument("--eval-images", type=_image_count, help="evaluation images per lossless drift check, or all (default 64)")
    build.add_argument("--int8-eval-images", type=_image_count, help="evaluation images the INT8 stages are judged on, or all (default 650)")
    build.add_argument("--calibration-images", type=int, help="calibration images (default 512)")
    build.add_argument("--calibration-method", choices=CALIBRATION_METHODS,
                       help="how activation ranges are chosen (default percentile)")
    build.add_argument("--force", action="store_true", help="rebuild every stage, ignoring the cache")
    build.add_argument("--json", action="store_true", help="print the manifests as JSON on stdout")
    build.add_argument("--no-report", action="store_true", help="do not write report.md/.json/.html at the end")
    build.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)
    build.add_argument("--executor", choices=("local", "ray"), help="where evaluations run (default: pipeline.yaml's, local)")
    build.add_argument("--ray-address", metavar="ADDRESS", help="Ray cluster to join: auto, ray://host:10001 (implies --executor ray)")

    stages = commands.add_parser("stages", parents=[common], help="list the stages of a target and their cache state")
    stages.add_argument("--json", action="store_true", help="print as JSON")

    clean = commands.add_parser("clean", parents=[common], help="delete the artifacts of the given models and target")
    clean.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)

    bench = commands.add_parser("benchmark", help="time builds (cold, cached), artifact latency, or NNCF vs our INT8")
    bench.add_argument("--model", action="append", metavar="NAME", help="network to measure; repeat, or 'all'")
    bench.add_argument("--target", choices=TARGETS, help="with --latency/--throughput/--frame-path/--nncf: the build's target (default cpu)")
    bench.add_argument("--latency", action="store_true",
                       help="batch-1 latency of every artifact of a finished build (with benchmark_app)")
    bench.add_argument("--nncf", action="store_true", help="NNCF's nncf.quantize against our Q/DQ INT8 on a finished build")
    bench.add_argument("--throughput", action="store_true",
                       help="images per second of every artifact of a finished build, at its best batch size / streams")
    bench.add_argument("--frame-path", action="store_true",
                       help="the camera runtime's end-to-end frame path (decode + preprocess + infer) on a finished build")
    bench.add_argument("--seconds", type=float, default=10.0, help="timed seconds per artifact (default 10)")
    bench.add_argument("--build-dir", type=Path,
                       help="with --latency/--throughput/--frame-path/--nncf: where the finished builds are (default: build); "
                            "otherwise: keep the measured builds there (default: temporary folders)")
    bench.add_argument("--config", type=Path, help="the pipeline.yaml the builds used")
    bench.add_argument("build_args", nargs=argparse.REMAINDER,
                       help="options passed to every `build` after `--`, e.g. -- --weights random")

    report = commands.add_parser("report", help="quantization accuracy report (report.md/.json/.html) of finished builds")
    report.add_argument("build_dir", type=Path, nargs="?", default=Path("build"), metavar="BUILD_DIR",
                        help="the build folder (default: build), or one build/<model>/<target> folder")
    report.add_argument("--model", action="append", metavar="NAME", help="only these models")
    report.add_argument("--target", choices=TARGETS, help="only this target")
    report.add_argument("--compare-calibration", action="store_true",
                        help="also quantize with minmax / percentile / entropy and compare them (minutes)")
    report.add_argument("--latency-seconds", type=float, default=2.0,
                        help="timed seconds per artifact for the latency column (0: leave latency out)")
    report.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)

    device = commands.add_parser("device-build", help="on the device: build the TensorRT engine from a bundle, check it, time it")
    device.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder or bundle.tar.gz copied from the host")
    device.add_argument("--precision", choices=("int8", "fp16", "fp32"), help="engine precision (default: the bundle's)")
    device.add_argument("--variant", choices=("default", "fallback"), default="default",
                        help="int8: 'fallback' uses the host's Q/DQ model with more layers kept in float")
    device.add_argument("--dla-core", type=int, help="build for this DLA core with GPU fallback (Jetson Orin; default: pipeline.yaml's)")
    device.add_argument("--dla-batch", type=int, help="the one batch size of a DLA engine (static shapes; default: pipeline.yaml's, 1)")
    device.add_argument("--seconds", type=float, default=10.0, help="timed seconds for latency and throughput (default 10)")
    device.add_argument("--no-trtexec", action="store_true", help="do not time the engine with trtexec as well")
    device.add_argument("--json", action="store_true", help="print the results as JSON on stdout")

    check = commands.add_parser("device-check", help="on the device: can it build and run the bundle's engine? one line a "
                                "fact, with what to do (exit 2 when something blocks the build)")
    check.add_argument("bundle", type=Path, nargs="?", metavar="BUNDLE", help="bundle folder (optional: checks its "
                       "precision path, DLA core and disk need too)")
    check.add_argument("--json", action="store_true", help="print the checks as JSON on stdout")

    verify = commands.add_parser("verify", help="on the CPU it landed on: check a CPU artifact's accuracy on its golden data, time it")
    verify.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR", help="bundle folder (or its build folder, or bundle.tar.gz)")
    verify.add_argument("--seconds", type=float, default=5.0, help="timed seconds for latency (default 5)")
    verify.add_argument("--json", action="store_true", help="print the results as JSON on stdout")

    run = commands.add_parser("run", help="classify a video, camera, image folder or GStreamer pipeline with a built artifact")
    run.add_argument("--artifact", type=Path, required=True, metavar="DIR", help="bundle folder (or its build folder)")
    run.add_argument("--source", required=True,
                     help="video file, camera index (0), image folder, or a GStreamer pipeline string")
    run.add_argument("--backend", choices=BACKENDS,
                     help="force a back end (default: an engine built here, else the bundle's OpenVINO IR, else ONNX Runtime)")
    run.add_argument("--device", default="CPU", help="OpenVINO device (default CPU)")
    run.add_argument("--rgb", action="store_true", help="frames are RGB (default: BGR, as OpenCV and cameras deliver)")
    run.add_argument("--top-k", type=int, default=5, help="classes per frame (default 5)")
    run.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0: until the source ends)")
    run.add_argument("--json", action="store_true", help="one JSON line per frame on stdout")

    deepstream = commands.add_parser("deepstream", help="write a DeepStream nvinfer classifier configuration for a bundle")
    deepstream.add_argument("artifact", type=Path, metavar="DIR", help="bundle folder (or its build folder)")
    deepstream.add_argument("--output", type=Path, help="configuration file (default: DIR/deepstream_nvinfer.txt)")
    deepstream.add_argument("--batch-size", type=int, default=1, help="nvinfer batch-size (default 1)")
    return parser


def _image_count(text: str) -> int | str:
    """A number of images, or "all" (every image the layout lists; pipeline.config.ALL_IMAGES)."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or 'all', not {text!r}") from None


def _configs(args) -> tuple[list, list[str]]:
    """One configuration per --target (pipeline.yaml's target without one), and the --model names."""
    configs = [_config(args, target)[0] for target in dict.fromkeys(args.target or [None])]
    return configs, _model_names(configs[0])


def _config(args, target: str | None = None):
    from pipeline.config import load_config

    overrides: dict = {}
    if target:
        overrides["target"] = target
    if args.build_dir:
        overrides["build_dir"] = str(args.build_dir)
    if args.model:
        overrides["models"] = list(args.model)
    for option, key in (("precision", "precision"), ("weights", "weights")):
        if getattr(args, option, None):
            overrides[key] = getattr(args, option)
    network = {}
    for option in ("num_classes", "input_size"):
        if getattr(args, option, None) is not None:
            if getattr(args, option) < 1:
                raise PipelineError(f"--{option.replace('_', '-')} must be a positive number")
            network[option] = getattr(args, option)
    if getattr(args, "labels", None):
        network["labels"] = str(args.labels)
    if network:
        overrides["network"] = network
    data = {}
    if getattr(args, "imagenet", None):
        data["imagenet"] = str(args.imagenet)
    if getattr(args, "frames", None):
        data["frames"] = str(args.frames)
    if getattr(args, "eval_images", None) is not None:
        data["evaluation_images"] = args.eval_images
    if getattr(args, "calibration_images", None) is not None:
        data["calibration_images"] = args.calibration_images
    if data:
        overrides["data"] = data
    quantization = {}
    if getattr(args, "int8_eval_images", None) is not None:
        quantization["evaluation_images"] = args.int8_eval_images
    if getattr(args, "calibration_method", None):
        quantization["method"] = args.calibration_method
    if quantization:
        overrides["quantization"] = quantization
    executor = {}
    if getattr(args, "executor", None):
        executor["kind"] = args.executor
    if getattr(args, "ray_address", None):
        executor.update(kind=executor.get("kind", "ray"), address=args.ray_address)
    if executor:
        overrides["executor"] = executor
    config = load_config(args.config, overrides)
    return config, _model_names(config)


def _model_names(config) -> list[str]:
    """The --model arguments: registered networks ('all': every one), .onnx files, package.module:function."""
    from pipeline.models import MODELS
    from pipeline.models.source import resolve_model

    names: list[str] = []
    folders: dict[str, str] = {}
    for name in config.models:
        for each in (MODELS if name == "all" else [name]):
            folder = resolve_model(each).name  # a clear error for an unknown name
            if folders.setdefault(folder, each) != each:
                raise PipelineError(f"--model {folders[folder]} and --model {each} would share the build folder "
                                    f"'{folder}': rename one")
            if each not in names:
                names.append(each)
    return names


def _root(config, name: str) -> Path:
    """The build folder of a --model argument (a file's stem, a function's name: pipeline.models.source)."""
    from pipeline.plan import BuildPlan

    return BuildPlan(config, name).root


def _build(args) -> int:
    import os
    from dataclasses import replace

    from pipeline.build import Builder
    from pipeline.lock import folder_lock
    from pipeline.progress import Reporter

    configs, names = _configs(args)
    if "IMAGENET_DIR" in os.environ and not args.imagenet:
        configs = [replace(config, data=replace(config.data, imagenet=os.environ["IMAGENET_DIR"])) for config in configs]
    from pipeline.models.source import check_model, resolve_model

    for name in names:  # a bad ONNX file, factory or option: one line before anything runs
        check_model(resolve_model(name), configs[0])
    reporter = Reporter()
    jobs = [(config, name) for config in configs for name in names]
    built_on_ray = {}
    if configs[0].executor.kind == "ray" and len(jobs) > 1:  # a model matrix: one Ray task per build
        from pipeline.executor.matrix import build_matrix

        targets = ", ".join(config.target for config in configs)
        reporter.say(f"building {', '.join(names)} → {targets} as Ray tasks")
        built_on_ray = build_matrix(configs[0], [(name, config.target) for config, name in jobs],
                                    args.force, not args.no_wait)
    manifests: dict = {}
    for config, name in jobs:
        weights = "" if resolve_model(name).own else f", {config.weights} weights"  # your model carries its own
        reporter.say(f"[bold]{name}[/] → {config.target} ({config.precision}{weights})")
        root = _root(config, name)
        with folder_lock(root, wait=not args.no_wait, say=reporter.say):  # the build and its report
            manifest = built_on_ray.get((name, config.target)) or Builder(config, name, reporter, force=args.force).run()
            manifests.setdefault(config.target, {})[name] = manifest
            built = manifest["built_this_run"]
            reporter.say("  nothing to rebuild: every stage was cached" if not built else f"  rebuilt: {', '.join(built)}")
            reporter.drift_table(name, manifest)
            reporter.say(f"  artifacts: {root}/ (deployed: {manifest['deployed']['artifact']})")
            if not args.no_report:
                from pipeline.report import write_report

                written = write_report(root, latency_seconds=1.0, reporter=reporter)
                reporter.say(f"  report: {written}")
    if args.json:  # {model: manifest}; with several --target, {target: {model: manifest}}
        print(json.dumps(manifests if len(configs) > 1 else manifests[configs[0].target], indent=2, default=str))
    return 0


def _stages(args) -> int:
    from pipeline.cache import MARKER
    from pipeline.stages import stages_for

    configs, names = _configs(args)
    rows = []
    for config, name in [(config, name) for config in configs for name in names]:
        root = _root(config, name)
        for stage in stages_for(config):
            done = (root / stage.name / MARKER).exists()
            rows.append({"model": name, "target": config.target, "stage": stage.name, "inputs": list(stage.inputs),
                         "description": stage.description, "built": done,
                         "checked_against_reference": stage.runner is not None})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            state = "built" if row["built"] else "not built"
            after = f" ← {', '.join(row['inputs'])}" if row["inputs"] else ""
            model = row["model"] if len(configs) == 1 else f"{row['model']} → {row['target']}"
            print(f"{model:<20} {row['stage']:<14} {state:<10} {row['description']}{after}")
    return 0


def _clean(args) -> int:
    from pipeline.lock import folder_lock

    configs, names = _configs(args)
    for config, name in [(config, name) for config in configs for name in names]:
        root = _root(config, name)
        if not root.exists():
            print(f"nothing to remove at {root}")
            continue
        with folder_lock(root, wait=not args.no_wait):  # never under a build that is writing it
            shutil.rmtree(root)
        print(f"removed {root}")
    return 0


def _benchmark(args) -> int:
    from pipeline.config import load_config
    from pipeline.measure import benchmark
    from pipeline.measure.nncf import compare_nncf
    from pipeline.models import MODELS, get_spec

    names = args.model or ["inception_v4"]
    names = list(MODELS) if "all" in names else names
    for name in names:
        get_spec(name)
    extra = [a for a in args.build_args if a != "--"]
    if args.latency or args.nncf or args.throughput or args.frame_path:
        overrides = {"build_dir": str(args.build_dir)} if args.build_dir else {}
        if args.target:
            overrides["target"] = args.target
        if "IMAGENET_DIR" in os.environ:
            overrides["data"] = {"imagenet": os.environ["IMAGENET_DIR"]}
        config = load_config(args.config, overrides)
        if args.latency:
            print(benchmark.benchmark_latency(config, names, args.seconds))
        if args.nncf:
            print(compare_nncf(config, names, args.seconds))
        if args.throughput:
            print(benchmark.benchmark_throughput(config, names, args.seconds))
        if args.frame_path:
            print(benchmark.benchmark_frame_path(config, names, args.seconds))
        return 0
    print(benchmark.benchmark_builds(names, extra, keep_in=args.build_dir))
    return 0


def _module_command(module: str):
    """A command implemented by `module.command(args) -> exit code`, imported only when it runs."""
    def run(args) -> int:
        import importlib

        return importlib.import_module(module).command(args)

    return run


def _preflight(args) -> None:
    """device-build runs device-check first and prints its lines (on stdout; errors keep stderr to themselves)."""
    if getattr(args, "json", False):
        return
    from pipeline.device_check import run_checks

    print("\n".join(check.line() for check in run_checks(args.bundle)), flush=True)


_COMMANDS = {
    "build": _build, "stages": _stages, "clean": _clean, "benchmark": _benchmark,
    "report": _module_command("pipeline.report"),
    "device-build": lambda args: _preflight(args) or _module_command("pipeline.device_build")(args),
    "device-check": _module_command("pipeline.device_check"),
    "verify": _module_command("pipeline.verify"),
    "run": _module_command("pipeline.runtime.run"),
    "deepstream": _module_command("pipeline.runtime.deepstream"),
}


def main(argv: list[str] | None = None) -> int:
    from pipeline.interrupts import at_stage, signals_raise

    args = _parser().parse_args(argv)
    try:
        with signals_raise():  # SIGTERM unwinds like Ctrl-C: temporary folders removed, lock released
            return _COMMANDS[args.command](args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as error:  # finished stages are kept; the interrupted one is rebuilt next time
        interrupted = at_stage(error, None)
        print(interrupted.message(), file=sys.stderr)
        return interrupted.exit_code
