"""Device-side code runs on Python 3.10 (JetPack 6) without torch, ONNX or the build code.

There is no Python 3.10 interpreter here, so every module the device imports is parsed with the 3.10
grammar and searched for standard-library names 3.10 lacks; the device commands then run in a
subprocess where torch, onnx and onnxsim cannot be imported.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEVICE_MODULES = [
    "pipeline/__init__.py", "pipeline/__main__.py", "pipeline/artifact.py", "pipeline/drift.py", "pipeline/errors.py",
    "pipeline/golden.py", "pipeline/device_build.py", "pipeline/device_check.py", "pipeline/divergence.py", "pipeline/verify.py", "pipeline/cli.py",
    "targets/__init__.py", "targets/runner.py", "targets/timing.py", "targets/onnxruntime.py", "targets/openvino.py",
]
DEVICE_PACKAGES = ["targets/tensorrt", "pipeline/runtime"]
# What the device imports of the project (the modules the device commands load, found by importing them).
DEVICE_ENTRY_POINTS = ["pipeline.cli", "pipeline.device_build", "pipeline.device_check", "pipeline.verify", "pipeline.golden", "targets.openvino"]
BUILD_ONLY = ("torch", "onnx", "onnxsim", "onnxruntime", "nncf", "onnxconverter_common")

# Standard-library names added after 3.10: (module, attribute or None for the whole module).
NEWER_STDLIB = {
    ("tomllib", None), ("wsgiref.types", None),
    ("datetime", "UTC"), ("enum", "StrEnum"), ("enum", "verify"), ("enum", "ReprEnum"),
    ("typing", "Self"), ("typing", "LiteralString"), ("typing", "Never"), ("typing", "assert_never"),
    ("typing", "reveal_type"), ("typing", "Required"), ("typing", "NotRequired"), ("typing", "TypeVarTuple"),
    ("typing", "Unpack"), ("typing", "dataclass_transform"), ("typing", "override"), ("typing", "TypeAliasType"),
    ("hashlib", "file_digest"), ("asyncio", "TaskGroup"), ("asyncio", "timeout"), ("itertools", "batched"),
    ("contextlib", "chdir"), ("operator", "call"),
}
NEWER_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _device_files() -> list[Path]:
    files = [ROOT / name for name in DEVICE_MODULES]
    for package in DEVICE_PACKAGES:
        files += sorted((ROOT / package).glob("*.py"))
    imported = subprocess.run(
        [sys.executable, "-c", "import importlib, json, sys\n"
         f"for name in {DEVICE_ENTRY_POINTS!r}: importlib.import_module(name)\n"
         "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    for file in json.loads(imported.stdout.splitlines()[-1]):
        if file and Path(file).resolve().is_relative_to(ROOT) and ".venv" not in Path(file).parts:
            files.append(Path(file).resolve())
    return sorted(set(f for f in files if f.is_file()))


def _newer_names(tree: ast.AST) -> list[str]:
    found = []
    aliases = {}  # local name -> stdlib module, for `datetime.UTC` style access
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (alias.name, None) in NEWER_STDLIB:
                    found.append(f"import {alias.name}")
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if (node.module, None) in NEWER_STDLIB or (node.module, alias.name) in NEWER_STDLIB:
                    found.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = aliases.get(node.value.id)
            if module and (module, node.attr) in NEWER_STDLIB:
                found.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in NEWER_BUILTINS:
            found.append(node.id)
    return found


def test_the_checker_catches_what_python_310_lacks():
    source = "import tomllib\nimport datetime\nfrom enum import StrEnum\nx = datetime.UTC\ntry:\n    pass\nexcept ExceptionGroup:\n    pass\n"
    expected = ["import tomllib", "from enum import StrEnum", "datetime.UTC", "ExceptionGroup"]
    assert sorted(_newer_names(ast.parse(source))) == sorted(expected)
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))
    with pytest.raises(SyntaxError):
        ast.parse("type Alias = int\n", feature_version=(3, 10))


def test_every_device_module_is_python_310():
    files = _device_files()
    names = {str(f.relative_to(ROOT)) for f in files}
    assert {"pipeline/golden.py", "pipeline/device_build.py", "pipeline/device_check.py", "pipeline/verify.py", "pipeline/artifact.py"} <= names
    problems = []
    for file in files:
        source = file.read_text(encoding="utf-8")
        try:
            tree = ast.parse(source, filename=str(file), feature_version=(3, 10))
        except SyntaxError as error:
            problems.append(f"{file.relative_to(ROOT)}:{error.lineno}: not Python 3.10 syntax ({error.msg})")
            continue
        problems += [f"{file.relative_to(ROOT)}: {name} does not exist on Python 3.10" for name in _newer_names(tree)]
    assert not problems, "\n".join(problems)


def _without_build_libraries(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where torch, onnx and onnxsim cannot be imported."""
    blocker = "import sys\nfor name in ('torch', 'onnx', 'onnxsim'): sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", blocker + code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["device-build", "verify"])
def test_device_commands_run_without_torch(command):
    result = _without_build_libraries(
        "from pipeline.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "import pipeline.device_build, pipeline.verify, pipeline.golden, targets.openvino\n"
        "print('imported')\n")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "imported" in result.stdout


def test_device_modules_load_no_build_library():
    result = subprocess.run(
        [sys.executable, "-c", "import sys, json\n"
         "import pipeline.cli, pipeline.device_build, pipeline.verify, pipeline.golden, targets.openvino\n"
         f"print(json.dumps(sorted(m for m in {BUILD_ONLY!r} if m in sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
