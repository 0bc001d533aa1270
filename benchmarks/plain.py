"""The reference: a plain, careful PyTorch script, written without quantbench's code.

    python benchmarks/plain.py MODEL_DIR PRECISIONS TEXTS.json THREADS WARMUP MAX_LENGTH
        [--device cpu|cuda] [--passes N] [--min-time SECONDS] [--until FILE] [--every-pass]
        [--stop-when-ready] [--compile] [--int4-group-size G]

loads the model in each precision in turn, in this one process, times every forward pass over the
texts at batch size 1 after warm-up and one untimed pass of each distinct length (on cuda, reading
the clock after synchronising), going over the texts --passes times (default 1) and again until
--min-time seconds have passed (and, with --until, until FILE exists: the benchmark's turn-taking
stops it when quantbench is done), and prints one JSON line per precision: the latencies, how often
its threads lost the CPU while timed (involuntary context switches a second), the wall time of its
work, on cuda the peak allocated GPU memory, and with --every-pass each pass's latency and when it
ended (Unix time). With --stop-when-ready it stops itself (SIGSTOP) before the first precision's
clock starts: the benchmark continues it for its turns. With --compile each model is passed through
torch.compile (default mode) after quantizing, the sequence length marked dynamic; the warm-up
compiles it, untimed. The torchao precisions are torchao's configs applied with quantize_, written
here from torchao's documentation.
"""

import argparse
import json
import os
import resource
import signal
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def torchao_config(precision: str, device: str, int4_group_size: int):
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
    )

    if precision == "torchao-int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if precision == "torchao-int8-weight":
        return Int8WeightOnlyConfig()
    if device == "cuda":
        return Int4WeightOnlyConfig(
            group_size=int4_group_size, int4_packing_format="tile_packed_to_4d"
        )
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(int4_group_size))


def load(
    model_dir: str,
    precision: str,
    device: str,
    int4_group_size: int = 128,
    model_class=AutoModelForSequenceClassification,
):
    """The model in the precision, by the libraries' own calls. model_class: transformers' Auto
    class to load it with (benchmarks/plain_lm.py loads causal LMs)."""
    if precision.startswith("torchao-"):
        from torchao.quantization import quantize_

        dtype = torch.bfloat16 if precision == "torchao-int4-weight" and device == "cuda" else None
        model = model_class.from_pretrained(model_dir, dtype=torch.float32)
        model = model.to(device).eval()
        if dtype is not None:  # the CUDA int4 kernel takes bf16 weights
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(dtype)
        quantize_(model, torchao_config(precision, device, int4_group_size))
        return model
    if precision.startswith("bnb-"):
        from transformers import BitsAndBytesConfig

        config = (
            BitsAndBytesConfig(load_in_8bit=True)
            if precision == "bnb-int8"
            else BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=precision[4:],
                bnb_4bit_compute_dtype=torch.float32,
            )
        )
        return model_class.from_pretrained(
            model_dir, quantization_config=config, device_map={"": device}
        ).eval()
    dtype = {
        "fp32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "int8-dynamic": torch.float32,
    }
    model = model_class.from_pretrained(model_dir, dtype=dtype[precision]).to(device).eval()
    if precision == "int8-dynamic":
        model = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )
    return model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="a plain PyTorch loop timing a model's forward passes"
    )
    for name in ("model_dir", "precisions", "texts_file"):
        parser.add_argument(name)
    for name in ("threads", "warmup", "max_length"):
        parser.add_argument(name, type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=0.0)
    parser.add_argument("--until", default=None)
    parser.add_argument("--every-pass", action="store_true")
    parser.add_argument("--stop-when-ready", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--int4-group-size", type=int, default=128)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    torch.set_num_threads(args.threads)
    texts = json.loads(open(args.texts_file).read())
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    inputs = [
        tokenizer([t], truncation=True, max_length=args.max_length, return_tensors="pt").to(
            args.device
        )
        for t in texts
    ]
    for precision in args.precisions.split(","):
        row = time_precision(args, precision, inputs, sync)
        print(json.dumps(row), flush=True)


def go_on(args: argparse.Namespace, clock_started: float, passes: int) -> bool:
    """Whether to time another whole pass over the inputs."""
    return (
        passes < args.passes
        or time.perf_counter() - clock_started < args.min_time
        or (args.until is not None and not os.path.exists(args.until))
    )


def time_precision(args: argparse.Namespace, precision: str, inputs: list, sync) -> dict:
    """Loads the model in one precision, warms it up and times its passes; the line to print."""
    device = args.device
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = load(args.model_dir, precision, device, args.int4_group_size)
    if args.compile:
        # a fresh dynamo per model, as a script measuring one precision has: what dynamo learnt
        # compiling the model before (sizes it made dynamic) would change this model's graph
        torch._dynamo.reset()
        model = torch.compile(model)
        if len({batch["input_ids"].shape[1] for batch in inputs}) > 1:
            # one compile for every length, as quantbench's compiled variants do
            for tensor in inputs[0].values():
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
    latencies, ended = [], []
    with torch.inference_mode():
        for i in range(args.warmup):
            model(**inputs[i % len(inputs)])
        for length in sorted({batch["input_ids"].shape[1] for batch in inputs}):
            # each shape once, untimed
            model(**next(batch for batch in inputs if batch["input_ids"].shape[1] == length))
        sync()
        if args.stop_when_ready:
            os.kill(os.getpid(), signal.SIGSTOP)
            args.stop_when_ready = False
        preempted = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
        clock_started = time.perf_counter()
        while go_on(args, clock_started, len(latencies) // len(inputs)):  # whole passes only
            for batch in inputs:
                start = time.perf_counter()
                model(**batch)
                sync()
                latencies.append(time.perf_counter() - start)
                ended.append(time.time())
        preemptions_per_s = (resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - preempted) / (
            time.perf_counter() - clock_started
        )
    row = {
        "precision": precision,
        "median_ms": statistics.median(latencies) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
        "n": len(latencies),
        "preemptions_per_s": round(preemptions_per_s, 1),
        "work_s": time.perf_counter() - started,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }
    if args.every_pass:
        row.update(latencies_ms=[x * 1000 for x in latencies], ended_unix=ended)
    del model
    return row


if __name__ == "__main__":
    main()
