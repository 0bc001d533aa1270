"""The precisions: one registry entry each, a name mapped to how a model is loaded and quantized.

Each entry says which devices it runs on (validation uses that), how it loads a saved FP32
checkpoint, and how it quantizes the loaded model, and returns the settings that change its results
so they can be recorded beside them. Its place in the registry is its column's place in the table. A
new quantized precision also needs its grid of representable values in `analysis._GRIDS`, or its
weight analysis ends in a warning. torch and transformers are imported inside the functions: the
driver validates jobs on a local model without importing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Precision:
    name: str
    devices: tuple[str, ...]
    how: str
    # (model_dir, device, settings) -> (model, recorded settings); weights arrive at their final
    # dtype
    load: Callable[..., tuple[Any, dict]]
    # (model, settings) -> (model, recorded settings); None where loading already quantized
    quantize: Callable[..., tuple[Any, dict]] | None = None
    # What load imports beyond torch and transformers: the fork server can import it once.
    imports: tuple[str, ...] = ()


def _auto_model(model_dir, **kwargs):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)


def _load_as(dtype_name: str):
    def load(model_dir, device, settings):
        import torch

        # Loading straight into the target dtype: a cast variant never holds an FP32 copy it drops.
        model = _auto_model(model_dir, dtype=getattr(torch, dtype_name)).to(device).eval()
        return model, {"dtype": dtype_name}

    return load


def _quantize_dynamic_int8(model, settings):
    import torch

    engine = settings.quantized_engine or torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    modules = {getattr(torch.nn, name) for name in settings.dynamic_modules}
    # inplace: the FP32 Linear weights are released as each layer is replaced, not kept as a second
    # copy.
    model = torch.ao.quantization.quantize_dynamic(model, modules, dtype=torch.qint8, inplace=True)
    return model, {
        "method": "torch.ao.quantization.quantize_dynamic",
        "quantized_module_types": sorted(settings.dynamic_modules),
        "weight_dtype": "qint8 (per-tensor symmetric)",
        "activation_dtype": "quint8 (per-tensor, dynamic, computed per batch)",
        "quantized_engine": engine,
    }


def _load_bnb(kind: str):
    def load(model_dir, device, settings):
        import torch
        from transformers import BitsAndBytesConfig

        if kind == "int8":
            config = BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_threshold=settings.llm_int8_threshold
            )
            recorded = {
                "method": "bitsandbytes LLM.int8()",
                "llm_int8_threshold": settings.llm_int8_threshold,
            }
        else:
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=kind,
                bnb_4bit_compute_dtype=getattr(torch, settings.bnb_4bit_compute_dtype),
                bnb_4bit_use_double_quant=settings.bnb_4bit_use_double_quant,
            )
            recorded = {
                "method": f"bitsandbytes 4-bit {kind}",
                "bnb_4bit_quant_type": kind,
                "bnb_4bit_compute_dtype": settings.bnb_4bit_compute_dtype,
                "bnb_4bit_use_double_quant": settings.bnb_4bit_use_double_quant,
            }
        # Quantized while loading, layer by layer: no full FP32 model is held at any time.
        model = _auto_model(model_dir, quantization_config=config, device_map={"": device}).eval()
        if device == "cpu":
            _keep_unpackable_layers_unpacked(model)
        recorded["quantized_while_loading"] = True
        return model, recorded

    return load


def _keep_unpackable_layers_unpacked(model) -> None:
    # On CPUs with AVX512-BF16, bnb's Linear4bit repacks its weight at the first forward into tiles
    # of 32 outputs x 64 inputs and crashes on a layer that does not fill whole tiles (a 32-wide
    # hidden size, a 3-label classifier). Such a layer keeps the layout every other CPU uses.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            blocksize = module.weight.quant_state.blocksize
            if module.in_features % blocksize or module.out_features % 32:
                module.support_avx512bf16_for_cpu = False


BNB_IMPORTS = ("bitsandbytes", "transformers.integrations.bitsandbytes")

PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in [
        Precision("fp32", ("cpu", "cuda"), "weights as loaded", _load_as("float32")),
        Precision("fp16", ("cpu", "cuda"), "loaded as float16", _load_as("float16")),
        Precision("bf16", ("cpu", "cuda"), "loaded as bfloat16", _load_as("bfloat16")),
        Precision(
            "int8-dynamic",
            ("cpu",),
            "torch dynamic post-training quantization, CPU kernels only",
            _load_as("float32"),
            _quantize_dynamic_int8,
        ),
        Precision(
            "bnb-int8",
            ("cpu", "cuda"),
            "bitsandbytes LLM.int8()",
            _load_bnb("int8"),
            imports=BNB_IMPORTS,
        ),
        Precision(
            "bnb-nf4",
            ("cpu", "cuda"),
            "bitsandbytes 4-bit NormalFloat",
            _load_bnb("nf4"),
            imports=BNB_IMPORTS,
        ),
        Precision(
            "bnb-fp4",
            ("cpu", "cuda"),
            "bitsandbytes 4-bit float",
            _load_bnb("fp4"),
            imports=BNB_IMPORTS,
        ),
    ]
}


def linear_layer_kinds(model) -> dict[str, int]:
    """How many linear layers of each class the model computes with: shows what was really
    quantized."""
    import torch

    counts: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__module__ + "." + type(module).__name__
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or (
            kind.endswith("Linear") or "Linear8bit" in kind or "Linear4bit" in kind
        ):
            counts[name] = counts.get(name, 0) + 1
    return counts
