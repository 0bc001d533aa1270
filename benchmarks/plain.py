"""The reference: a plain, careful PyTorch script, written without quantbench's code.

`python benchmarks/plain.py MODEL_DIR PRECISIONS TEXTS.json THREADS WARMUP MAX_LENGTH [DEVICE [MIN_SECONDS]]`
loads the model in each precision in turn, in this one process, times every forward pass over the texts
at batch size 1 after warm-up and one untimed pass of each distinct length (on cuda, reading the clock
after synchronising), going over the texts again until MIN_SECONDS have passed, and prints one JSON line
per precision: the latencies, how often its threads lost the CPU while timed (involuntary context
switches a second), the wall time of its work and, on cuda, the peak allocated GPU memory.
"""

import json
import resource
import statistics
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def load(model_dir: str, precision: str, device: str):
    if precision.startswith("bnb-"):
        from transformers import BitsAndBytesConfig

        config = (BitsAndBytesConfig(load_in_8bit=True) if precision == "bnb-int8" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=precision[4:],
                                     bnb_4bit_compute_dtype=torch.float32))
        return AutoModelForSequenceClassification.from_pretrained(
            model_dir, quantization_config=config, device_map={"": device}).eval()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8-dynamic": torch.float32}
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype[precision]).to(device).eval()
    if precision == "int8-dynamic":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def main() -> None:
    model_dir, precisions, texts_file, threads, warmup, max_length = sys.argv[1:7]
    device = sys.argv[7] if len(sys.argv) > 7 else "cpu"
    min_seconds = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.set_num_threads(int(threads))
    texts = json.loads(open(texts_file).read())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = [tokenizer([t], truncation=True, max_length=int(max_length), return_tensors="pt").to(device) for t in texts]
    for precision in precisions.split(","):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        model = load(model_dir, precision, device)
        latencies = []
        with torch.inference_mode():
            for i in range(int(warmup)):
                model(**inputs[i % len(inputs)])
            for length in sorted({batch["input_ids"].shape[1] for batch in inputs}):  # each shape once, untimed
                model(**next(batch for batch in inputs if batch["input_ids"].shape[1] == length))
            sync()
            preempted = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
            clock_started = time.perf_counter()
            while not latencies or time.perf_counter() - clock_started < min_seconds:  # whole passes only
                for batch in inputs:
                    start = time.perf_counter()
                    model(**batch)
                    sync()
                    latencies.append(time.perf_counter() - start)
            preemptions_per_s = ((resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - preempted)
                                 / (time.perf_counter() - clock_started))
        print(json.dumps({"precision": precision, "median_ms": statistics.median(latencies) * 1000,
                          "mean_ms": statistics.fmean(latencies) * 1000, "n": len(latencies),
                          "preemptions_per_s": round(preemptions_per_s, 1),
                          "work_s": time.perf_counter() - started,
                          "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}),
              flush=True)
        del model


if __name__ == "__main__":
    main()
