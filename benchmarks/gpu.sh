#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU, in one go; everything lands in OUT_DIR.
#
#     benchmarks/gpu.sh OUT_DIR
#
# 1. the published study's variants on the inline BERT-base architecture (jobs/bert-base-inline.yaml):
#    result files, the printed table and the Markdown table;
# 2. the benchmark on cuda (fidelity, overhead, memory) for fp32, fp16, bf16, bnb-int8 and bnb-nf4;
# 3. the CUDA tests (tests/test_cuda.py), which are skipped on machines without a GPU.
# Each step has its own time limit and a failing step does not stop the next. Set PYTHON to the
# interpreter that has quantbench's dependencies (default: python3).
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
python=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local code=$?
    echo "== $name exit $code"
    tail -n 40 "$out/$name.log"
    [ "$code" -eq 0 ] || status=1
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
step bert-base-inline 300 "$python" -m runner.cli run jobs/bert-base-inline.yaml --results "$out/results" \
    --ray-temp-dir /tmp/qb-ray-gpu
"$python" -m runner.cli collect "$out/results/bert-base-inline" --format markdown >"$out/bert-base-inline.md" 2>&1
# Sized to fit a 15-minute device session: one round, two fidelity matches per precision.
step benchmark-cuda 480 "$python" benchmarks/run.py --model bert-base --samples 300 --device cuda \
    --rounds 1 --matches 2 --min-time 3 \
    --out "$out/benchmark-bert-base-cuda.md" --keep-results "$out/benchmark-results"
step test-cuda 240 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
exit $status
