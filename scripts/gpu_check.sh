#!/usr/bin/env bash
# One device call: kernel tests at full size on the GPU, then the kernel benchmark (JSON, table, PNG in $OUT).
# Usage on the GPU machine (no vLLM there):  bash scripts/gpu_check.sh [--quick]
set -uo pipefail
OUT=${OUT:-results/bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
PALU_KERNEL_TESTS_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -15
python3 -m vllm_palu.bench kernels --out "$OUT" "$@" 2>&1 | grep -v '^{' | tail -60
