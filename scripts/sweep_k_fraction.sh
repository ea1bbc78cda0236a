#!/usr/bin/env bash
# Choose the default --k-fraction: SmolLM2-135M, kv-ratio 0.5, joint group, WikiText-2 calib/eval split.
set -euo pipefail
DATA=${DATA:-../shared/data/wikitext2}
OUT=${OUT:-results/k_fraction}
mkdir -p "$OUT"
for kf in 0.25 0.3125 0.375 0.4375; do
  .venv/bin/python -m vllm_palu.convert --model smollm2-135m --output "$OUT/palu-kf$kf" --kv-ratio 0.5 \
    --k-fraction "$kf" --latent-layout split --calib "$DATA/calib.txt" --force > "$OUT/convert-kf$kf.log" 2>    --k-fraction "$kf" --calib "$DATA/calib.txt" --force > "$OUT/convert-kf$kf.log" 2>&11
  .venv/bin/python -m vllm_palu.eval ppl --model "$OUT/palu-kf$kf" --data "$DATA/eval.txt" --seq-len 1024 \
    --max-tokens 16384 --json "$OUT/ppl-kf$kf.json" 2>/dev/null
done
