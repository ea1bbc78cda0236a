#!/usr/bin/env bash
# SmolLM2-135M perplexity table for docs/RESULTS.md: original, dense KV-quantization baselines, Palu at
# kv-ratio 0.75/0.5/0.375/0.25 x group size 1/all, and the self-generated calibration default.
# Protocol: WikiText-2 eval.txt, first 40k tokens, 1024-token windows; calibration on calib.txt (32 x 512, seed 0).
set -euo pipefail
DATA=${DATA:-../shared/data/wikitext2}
OUT=${OUT:-results/smollm2}
PY=${PY:-.venv/bin/python}
EVAL=(--data "$DATA/eval.txt" --seq-len 1024 --max-tokens 40000)
mkdir -p "$OUT"

$PY -m vllm_palu.eval ppl --model smollm2-135m "${EVAL[@]}" --kv-quant none,int8,fp8,int4,int3,int2 \
  --json "$OUT/ppl-dense.json" 2>/dev/null

run() {  # name, converter flags...
  local name=$1; shift
  $PY -m vllm_palu.convert --model smollm2-135m --output "$OUT/$name" --force --latent-layout split "$@" > "$OUT/convert-$name.log" 2>&1
  $PY -m vllm_palu.eval ppl --model "$OUT/$name" "${EVAL[@]}" --json "$OUT/ppl-$name.json" 2>/dev/null
}
for group in all 1; do
  for ratio in 0.75 0.5 0.375 0.25; do
    run "palu-r$ratio-g$group" --kv-ratio "$ratio" --group-size "$group" --calib "$DATA/calib.txt"
  done
done
run palu-r0.5-gall-selfcalib --kv-ratio 0.5 --group-size all
$PY scripts/ppl_table.py "$OUT" > "$OUT/table.md"
cat "$OUT/table.md"
