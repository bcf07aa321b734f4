#!/usr/bin/env bash
# Pretrain embedded-base candidates side by side on one GPU machine, then evaluate each
# (300 prompts per task, 40-step ODE, CFG 1 / 2 / 3 / 4.5) and measure pass@1 / pass@8.
# Usage (on a CUDA machine, in the repository root): OUT=dir MINUTES=6 bash scripts/pretrain_sweep.sh
# Results: $OUT/sweep.log, $OUT/evals.jsonl, $OUT/passk.txt, $OUT/<name>.tar.gz (models).
set -uo pipefail
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MINUTES=${MINUTES:-6} DEVICE=${DEVICE:-cuda} WORKERS=${WORKERS:-3} N=${N:-300} NP=${NP:-120}
W=runs/sweep
mkdir -p "$W" "$OUT"
common=(--steps 40000 --minutes "$MINUTES" --batch-size 256 --lr 1.5e-3 --warmup 500
        --ocr-fraction 0.4 --device "$DEVICE" --workers "$WORKERS")
declare -A VARIANTS=(
  [r60]="counting=0.6,two_object=0.5,position=0.6,color_attr=0.6,ocr=0.6"
  [r50]="counting=0.5,two_object=0.4,position=0.5,color_attr=0.5,ocr=0.5"
  [r70]="counting=0.7,two_object=0.6,position=0.7,color_attr=0.7,ocr=0.7"
  [r60L6]="counting=0.6,two_object=0.5,position=0.6,color_attr=0.6,ocr=0.6"
)
for name in "${!VARIANTS[@]}"; do
  extra=(); [[ $name == *L6 ]] && extra=(--num-layers 6)
  OMP_NUM_THREADS=1 python3 -m flowopd pretrain --out "$W/$name" "${common[@]}" "${extra[@]}" \
    --caption-noise "${VARIANTS[$name]}" > "$W/$name.log" 2>&1 &
done
wait
for name in "${!VARIANTS[@]}"; do tail -3 "$W/$name.log"; done | tee -a "$OUT/sweep.log"
for name in "${!VARIANTS[@]}"; do tar czf "$OUT/$name.tar.gz" -C "$W" "$name"; done
for name in "${!VARIANTS[@]}"; do
  (
    for cfg in 1.0 2.0 3.0 4.5; do
      OMP_NUM_THREADS=2 python3 -m flowopd eval --model "$W/$name" --device "$DEVICE" --n "$N" \
        --guidance $cfg --batch-size "$N" --benchmark toy-geneval,toy-ocr,toy-quality \
        --out "$W/eval_${name}_$cfg" > /dev/null 2>&1
      python3 -c "import json,sys; m=json.load(open('$W/eval_${name}_$cfg/metrics.json')); print(json.dumps({'model':'$name','cfg':$cfg,'metrics':m}))" >> "$OUT/evals.jsonl"
    done
    OMP_NUM_THREADS=2 python3 scripts/pass_at_k.py --model "$W/$name" --n "$NP" --k 8 > "$W/passk_$name.txt" 2>&1
    { echo "== $name"; cat "$W/passk_$name.txt"; } >> "$OUT/passk.txt"
  ) &
done
wait
cat "$OUT/sweep.log" "$OUT/passk.txt"
