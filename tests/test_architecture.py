"""The layering the architecture (docs/architecture.md) promises, checked on the source itself.

Every `import` of a project module counts, at module level, inside functions and under
TYPE_CHECKING alike: a cycle through any of them is a knot a newcomer has to untie.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "calibration", "targets")
MAX_LINES = 450
# The device side: what `verify`, `device-build`, `run` and the camera runtime load on a Jetson.
DEVICE = ("pipeline.artifact", "pipeline.integrity", "pipeline.golden", "pipeline.verify", "pipeline.device_build",
          "pipeline.device_check", "pipeline.divergence",
          "pipeline.runtime", "pipeline.drift", "pipeline.formats", "pipeline.errors", "targets", "targets.runner", "targets.timing",
          "targets.onnxruntime", "targets.openvino", "targets.tensorrt", "targets.cpu_features")
# The host side: building, measuring and reporting, which a device never needs.
HOST = ("pipeline.build", "pipeline.lock", "pipeline.context", "pipeline.plan", "pipeline.stages", "pipeline.config",
        "pipeline.measure", "pipeline.report", "pipeline.models", "pipeline.weights", "calibration",
        "targets.pytorch", "targets.nncf_quantizer")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _project_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _project_module(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return components


def test_the_project_modules_were_found():
    assert {"pipeline.build", "pipeline.stages.quantize.gate", "targets.openvino", "calibration.statistics"} <= set(MODULES)
    assert "pipeline.stages.base" in GRAPH["pipeline.stages.reference"]  # imports are read


def test_no_import_cycles():
    assert _cycles() == []


def test_the_device_side_imports_nothing_of_the_host_side():
    crossings = sorted(f"{module} -> {target}" for module, targets in GRAPH.items() if _within(module, DEVICE)
                       and not _within(module, HOST) for target in targets if _within(target, HOST))
    assert crossings == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_450_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines: split it by concept"


def test_back_ends_are_opened_only_in_targets():
    """ONNX Runtime sessions and OpenVINO compiled models are created in targets/ alone."""
    opened = []
    for module, path in MODULES.items():
        if _within(module, ("targets",)):
            continue
        text = path.read_text()
        opened += [f"{module}: {call}" for call in ("InferenceSession(", "compile_model(", "ov.Core(", "read_model(")
                   if call in text]
    assert opened == []
