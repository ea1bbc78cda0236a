#!/usr/bin/env bash
# SmolLM2-135M perplexity with quantized latents (docs/RESULTS.md, "Perplexity vs KV bytes"): Palu joint group at
# kv-ratio 0.5 / 0.375 / 0.25, latent rotation none / hadamard, latents fp8 / int4 (fake-quantized exactly as the
# paged cache stores them). Same protocol as scripts/smollm2_results.sh: WikiText-2 eval.txt, first 40k tokens,
# 1024-token windows; calibration on calib.txt (32 x 512, seed 0). Unquantized latents ("auto") are the foundation
# table's numbers (scripts/smollm2_results.sh), and a rotation is exact there, so they are not re-run.
# Each evaluation takes 5-15 min on the 2 shared cores: the runs go most important first.
set -euo pipefail
DATA=${DATA:-../shared/data/wikitext2}
OUT=${OUT:-results/smollm2-quant}
MODEL=${MODEL:-smollm2-135m}
PY=${PY:-.venv/bin/python}
EVAL=(--data "$DATA/eval.txt" --seq-len 1024 --max-tokens 40000)
mkdir -p "$OUT"

run() {  # kv-ratio, rotation, latent quantizations
  local name="palu-r$1-rot$2"
  if [ ! -f "$OUT/$name/config.json" ]; then
    $PY -m vllm_palu.convert --model "$MODEL" --output "$OUT/$name" --force --kv-ratio "$1" --latent-layout split --group-size all \
      --calib "$DATA/calib.txt" --latent-rotation "$2" > "$OUT/convert-$name.log" 2>&1
  fi
  $PY -m vllm_palu.eval ppl --model "$OUT/$name" "${EVAL[@]}" --latent-format "$3" \
    --json "$OUT/ppl-$name-$3.json" 2>/dev/null
}
run 0.5 none int4
run 0.375 none fp8
run 0.5 hadamard int4
run 0.25 none int4
run 0.25 hadamard int4
run 0.25 none fp8
run 0.375 none int4
run 0.5 none fp8
run 0.375 hadamard int4
