#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU, in one go; everything lands in OUT_DIR.
#
#     benchmarks/gpu.sh OUT_DIR
#
# 1. the benchmark on cuda (fidelity, overhead, memory) for fp32, fp16, bf16, bnb-int8 and bnb-nf4;
# 2. the CUDA tests (tests/test_cuda.py), which are skipped on machines without a GPU;
# 3. the published study's variants on the inline BERT-base architecture (jobs/bert-base-inline.yaml):
#    result files, the printed table and the Markdown table.
# Most needed first: a lent GPU machine may give one command 10 minutes. Each step has its own time
# limit, and all of them together GPU_BUDGET_S seconds (default 560): a step that would start with
# less than 30 s left is skipped. A failing step does not stop the next. Set PYTHON to the interpreter
# that has quantbench's dependencies (default: python3).
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
python=${PYTHON:-python3}
budget=${GPU_BUDGET_S:-560}
began=$(date +%s)
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - began)))
    if [ "$left" -lt 30 ]; then
        echo "== $name skipped: ${left} s left of GPU_BUDGET_S=${budget}"
        status=1
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit} s)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local code=$?
    echo "== $name exit $code"
    tail -n 40 "$out/$name.log"
    [ "$code" -eq 0 ] || status=1
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
# Sized to fit: 100 samples, one round, two fidelity matches per precision (each one-variant run's clock
# runs for 6 s), by the H200's timings of an earlier version (300 samples: 11-25 s a variant).
step benchmark-cuda 450 "$python" benchmarks/run.py --model bert-base --samples 100 --device cuda \
    --rounds 1 --matches 2 --min-time 3 \
    --out "$out/benchmark-bert-base-cuda.md" --keep-results "$out/benchmark-results"
step test-cuda 150 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step bert-base-inline 200 "$python" -m runner.cli run jobs/bert-base-inline.yaml --results "$out/results" \
    --ray-temp-dir /tmp/qb-ray-gpu
[ -d "$out/results/bert-base-inline" ] &&
    "$python" -m runner.cli collect "$out/results/bert-base-inline" --format markdown >"$out/bert-base-inline.md" 2>&1
exit $status
