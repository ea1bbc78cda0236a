#!/usr/bin/env bash
# Run here, after ../shared/gpu-stack/prepare.sh: the pure-Python wheels that `vllm serve` of vLLM 0.33 imports and
# the shared stack does not carry (2026-12-04: every `vllm serve` exited at start-up with `No module named
# 'model_hosting_container_standards'`, imported by its SageMaker router). They go to .gpu-stack/bin/extra, which
# travels with .gpu-stack/bin in every phase's call; scripts/gpu_serving.sh installs them after the stack.
set -euo pipefail
dest=.gpu-stack/bin/extra
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$dest" \
    'model-hosting-container-standards==0.1.16' 'jmespath==1.0.1' 2>&1 | grep -v -i warning || true
ls -1 "$dest"
