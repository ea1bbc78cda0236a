#!/usr/bin/env bash
# One device call: kernel tests at full size on the GPU, then the kernel benchmark (JSON, table, PNG in $OUT) and
# the headline shape timed in alternation with its SM clock.
# Usage on the GPU machine (no vLLM there):  bash scripts/gpu_check.sh [--quick]
# FlashInfer baseline (optional): FLASHINFER_WHEELS=DIR with flashinfer-python (JIT-only, e.g. 0.5.3) and
# apache-tvm-ffi wheels carried to the machine (`pip download` them here; see benchmarks/flashinfer_decode.py).
set -uo pipefail
OUT=${OUT:-results/bench}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
if [ -n "${FLASHINFER_WHEELS:-}" ]; then
    python3 -m pip install -q --no-deps --target /tmp/flashinfer "$FLASHINFER_WHEELS"/*.whl
    export PYTHONPATH=/tmp/flashinfer:$PYTHONPATH CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
PALU_KERNEL_TESTS_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -15
python3 -m benchmarks.attention_kernels kernels --out "$OUT" "$@" 2>&1 | grep -v '^{' | tail -60
# The headline shape again, Palu and dense decode alternating, with the SM clock of each timing.
python3 -m benchmarks.attention_kernels headline --repeats 4 --out "$OUT" 2>&1 | grep -v Warning | tail -6
