"""The calibrated family on the worker: each method is a module of its own (int8_static.py,
smoothquant.py, awq.py, gptq.py) with the same plain functions, calibrate, quantize,
effective_weight, is_quantized and grid; this worker picks the module by the config's type.

A method module is imported when a config of its method is first met: gptq's library is needed
only by gptq-int4.
"""

from __future__ import annotations

import importlib
import sys

import torch

from runner.analysis import layer_matrix
from runner.precisions import Precision
from runner.precisions.calibrated import AwqInt4, GptqInt4, Int8Static, SmoothQuantInt8
from runner.precisions.worker import FamilyWorker

# Our config's type -> the module that calibrates and quantizes for it.
METHODS = {
    Int8Static: "runner.precisions.calibrated.int8_static",
    SmoothQuantInt8: "runner.precisions.calibrated.smoothquant",
    AwqInt4: "runner.precisions.calibrated.awq",
    GptqInt4: "runner.precisions.calibrated.gptq",
}


def method_of(config):
    """The method module for one of our configs, imported on first use."""
    return importlib.import_module(METHODS[type(config)])


class CalibratedWorker(FamilyWorker):
    def calibrate(self, model, precision: Precision, config, batches, keep=frozenset()):
        """The method's observations of the whole model (kept layers too) on the batches."""
        return method_of(config).calibrate(model, config, batches, frozenset(keep))

    def quantize(self, model, precision: Precision, config, keep=frozenset(), calibration=None):
        if calibration is None:
            raise ValueError(f"{precision.name} quantizes from a calibration: calibrate first")
        return method_of(config).quantize(model, config, frozenset(keep), calibration)

    def layer_weight(self, name: str, module) -> torch.Tensor | None:
        """The float32 CPU weight, [out, in], a quantized layer computes with in its original
        input space (SmoothQuant's and AWQ's input scales undone), as its method reads it; a
        layer kept in FP32 as FamilyWorker reads it. Only methods already imported can have
        quantized a layer."""
        for module_name in METHODS.values():
            method = sys.modules.get(module_name)
            weight = method.effective_weight(module) if method is not None else None
            if weight is not None:
                return weight
        return super().layer_weight(name, module)

    def is_quantized(self, config, module) -> bool:
        return method_of(config).is_quantized(module)

    def grid(self, precision: Precision, config, weight) -> dict | None:
        """int8 methods: codes -128..127 times one scale per row; int4 methods: codes -8..7 times
        one scale per group, at the FP32 weight's own scales (see each method's grid)."""
        return method_of(config).grid(precision, config, layer_matrix(weight))


WORKER = CalibratedWorker()
