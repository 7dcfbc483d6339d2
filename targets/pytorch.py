"""The FP32 reference back end: a torch module in eval mode, behind the runner contract."""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError
from targets.runner import RunnerBase, single_input


class TorchRunner(RunnerBase):
    """The FP32 reference: a torch module in eval mode under `inference_mode`."""

    def __init__(self, module, name: str = "torch fp32"):
        import torch

        non_fp32 = {str(p.dtype) for p in module.parameters() if p.dtype != torch.float32}
        if non_fp32:
            # The reference must be FP32: converting here would hide a wrong model.
            raise PipelineError(
                f"the torch reference must be float32, the module has {sorted(non_fp32)} "
                "parameters: load the checkpoint as float32"
            )
        self._torch = torch
        self.module = module.eval()
        self.name = name

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self._torch.from_numpy(single_input(self, inputs))
        with self._torch.inference_mode():
            logits = self.module(x)
        return {self.output_name: logits.numpy()}

    def describe(self) -> dict:
        return {"runtime": f"torch {self._torch.__version__}", "device": "cpu", "execution_precision": "fp32",
                "threads": self._torch.get_num_threads()}
