"""What a `--model` argument is: one of our registered networks (`MODELS`), your ONNX classifier (a path
ending in .onnx) or your PyTorch module (`package.module:function`, importable from the current folder or
PYTHONPATH); the name of its build folder; the options that mean nothing for your own model.

Decided here once: the plan takes the build folder's name from here, the context the reference, the model
and the preprocessing's starting point (`pipeline.models.preprocessing`), the CLI its checks. Importing this
module imports no torch and no onnx.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.models import MODELS, ModelSpec, get_spec

REGISTERED, ONNX, FACTORY = "registered", "onnx", "factory"
FORMS = "a registered network, a .onnx file or package.module:function"


@dataclass(frozen=True)
class ModelSource:
    argument: str  # what the user wrote
    kind: str  # REGISTERED | ONNX | FACTORY
    name: str  # the build folder's name: the network's, the file's stem or the function's name
    spec: ModelSpec | None = None  # a registered network's
    path: Path | None = None  # the ONNX file (absolute)

    @property
    def own(self) -> bool:
        """The user's network rather than one of ours."""
        return self.kind != REGISTERED

    @property
    def factory(self) -> tuple[str, str]:
        """(module, function) of a factory."""
        module, _, function = self.argument.partition(":")
        return module, function

    def describe(self) -> dict:
        """What the manifests record about where the network came from."""
        described = {"kind": self.kind, "argument": self.argument}
        if self.path is not None:
            described["path"] = str(self.path)
        return described

    def code_modules(self) -> tuple[str, ...]:
        """Modules whose source is part of the cache key of the stages that read the network."""
        if self.kind == REGISTERED:
            return (self.spec.module, "pipeline.models.layers", "pipeline.weights")
        if self.kind == ONNX:
            return ("pipeline.models.onnx_file",)
        module = self.factory[0]
        _importable()
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError) as error:
            raise PipelineError(f"--model {self.argument}: cannot import {module} ({error}): {_WHERE}") from None
        if found is None or found.origin is None:
            raise PipelineError(f"--model {self.argument}: no module {module}: {_WHERE}")
        return (module, "pipeline.models.source")


@dataclass(frozen=True)
class FactoryModel:
    """Your factory's module, fed the project's input (what the reference and the export stage read)."""

    module: object  # torch.nn.Module in eval mode
    input_size: int


def resolve_model(argument: str) -> ModelSource:
    """The network `argument` names (checks the form only; the file is read by `pipeline.models.onnx_file`)."""
    text = str(argument)
    if text.lower().endswith(".onnx"):
        path = Path(text)
        return ModelSource(text, ONNX, _own_name(path.stem, text), path=path.absolute())
    if ":" in text:
        module, _, function = text.partition(":")
        if not function.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
            raise PipelineError(f"--model {text}: a PyTorch module's factory is written package.module:function")
        return ModelSource(text, FACTORY, _own_name(function, text))
    if text not in MODELS:
        raise PipelineError(f"unknown model {text!r}: choose one of {', '.join(MODELS)}, a .onnx file or "
                            "package.module:function")
    return ModelSource(text, REGISTERED, text, spec=get_spec(text))


def _own_name(name: str, argument: str) -> str:
    """The build folder of a user's network: never a registered network's (its report and benchmark would
    take the registered network's facts)."""
    if name in MODELS or name == "all":
        raise PipelineError(f"--model {argument}: its build folder would be '{name}', the name of a registered "
                            "network: rename the file (or the function)")
    if not name or name.startswith("."):
        raise PipelineError(f"--model {argument}: no usable name for its build folder: rename it")
    return name


def check_options(source: ModelSource, config) -> None:
    """Options of our networks that mean nothing for a user's: a clear error instead of silence."""
    if not source.own:
        return
    carries = "its weights are in the file" if source.kind == ONNX else "the module carries its own weights"
    if config.weights != "imagenet":
        raise PipelineError(f"--weights {config.weights}: means nothing for --model {source.argument} ({carries}): "
                            "leave --weights (pipeline.yaml's weights) at its default, imagenet")
    if config.network.num_classes:
        raise PipelineError(f"--num-classes: means nothing for --model {source.argument} (its head decides): leave it unset")
    if config.network.residual_scales:
        raise PipelineError(f"network.residual_scales applies to the Inception-ResNets only, not to {source.argument}")


def check_model(source: ModelSource, config) -> None:
    """What can be checked before a build starts: the options, an ONNX file's input, a factory's module."""
    from pipeline.models.preprocessing import for_source

    check_options(source, config)
    if source.kind == ONNX:
        for_source(source, config)
    elif source.kind == FACTORY:
        source.code_modules()


_WHERE = "it must be importable from the current folder or PYTHONPATH"


def _importable() -> None:
    """`python -m pipeline` finds modules of the current folder as `python -c` does."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def load_factory(source: ModelSource):
    """The torch module the factory returns, in eval mode (imports torch and the user's module)."""
    import torch

    module_name, function_name = source.factory
    _importable()
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # whatever the user's module raises while it is imported
        raise PipelineError(f"--model {source.argument}: cannot import {module_name} "
                            f"({type(error).__name__}: {_first_line(error)}): {_WHERE}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise PipelineError(f"--model {source.argument}: {module_name} has no function {function_name}")
    try:
        network = function()
    except Exception as error:
        raise PipelineError(f"--model {source.argument}: {function_name}() failed "
                            f"({type(error).__name__}: {_first_line(error)})") from None
    if not isinstance(network, torch.nn.Module):
        raise PipelineError(f"--model {source.argument}: {function_name}() returned a {type(network).__name__}, "
                            "not a torch.nn.Module")
    return network.eval()


def adapt_input(network, layout: str, channels: str):
    """`network` fed the project's input (NCHW, RGB): the channel order and layout it takes are put in front of it,
    so the export carries them into every artifact."""
    import torch

    if layout == "NCHW" and channels == "RGB":
        return network

    class InputAdapter(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if channels == "BGR":
                x = x.flip(1)
            if layout == "NHWC":
                x = x.permute(0, 2, 3, 1)
            return self.inner(x)

    return InputAdapter(network).eval()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
