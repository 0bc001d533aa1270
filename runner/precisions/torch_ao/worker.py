"""int8-dynamic on the worker: torch.ao.quantization.quantize_dynamic, and reading back the
dynamic-quantized Linear it puts in place of each nn.Linear."""

from __future__ import annotations

import torch
import torch.ao.nn.quantized.dynamic as nnqd

from runner.analysis import absmax, layer_matrix, make_grid
from runner.precisions import Precision
from runner.precisions.torch_ao import Int8Dynamic
from runner.precisions.worker import FamilyWorker, as_cpu_float


class TorchAoWorker(FamilyWorker):
    quantizes_layers_alone = True  # each nn.Linear is converted on its own

    def quantize(
        self, model, precision: Precision, config: Int8Dynamic, keep=frozenset(), calibration=None
    ):
        engine = config.quantized_engine or torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        modules = {getattr(torch.nn, name) for name in config.dynamic_modules}
        spec = modules
        if keep:
            # quantize_dynamic matches module types exactly, as it does with a set of types.
            spec = {n for n, m in model.named_modules() if type(m) in modules and n not in keep}
        # inplace: the FP32 Linear weights are released as each layer is replaced, not kept as a
        # second copy.
        model = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
        return model, {
            "method": "torch.ao.quantization.quantize_dynamic",
            "quantized_module_types": sorted(config.dynamic_modules),
            "weight_dtype": "qint8 (per-tensor symmetric)",
            "activation_dtype": "quint8 (per-tensor, dynamic, computed per batch)",
            "quantized_engine": engine,
        }

    def linear_classes(self) -> tuple[type, ...]:
        return (*super().linear_classes(), nnqd.Linear)

    def layer_weight(self, name: str, module):
        """The float32 CPU weight a dynamic-quantized Linear computes with; a layer kept in FP32
        as FamilyWorker reads it."""
        if not isinstance(module, nnqd.Linear):
            return super().layer_weight(name, module)
        w = module.weight()
        # float16 dynamic quantization unpacks to a plain float tensor.
        return as_cpu_float(w.dequantize() if w.is_quantized else w)

    def is_quantized(self, config: Int8Dynamic, module) -> bool:
        return isinstance(module, nnqd.Linear) and module.weight().dtype == torch.qint8

    def grid(self, precision: Precision, config: Int8Dynamic, weight) -> dict:
        # torch's default dynamic qconfig: per-tensor symmetric qint8, scale = max|w| / ((127 -
        # -128) / 2).
        scale = absmax(layer_matrix(weight)) / 127.5
        return make_grid(
            precision.name,
            "int8 symmetric, codes -128..127 times scale",
            "tensor",
            range(-128, 128),
            scale.reshape(1),
        )


WORKER = TorchAoWorker()
