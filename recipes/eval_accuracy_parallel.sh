#!/bin/bash
# Accuracy sweep of recipes/eval_accuracy.py with policy groups in parallel on one GPU (the toy
# reasoner leaves most of it idle): one shared full-cache reference first, then one process per
# group, each cut off after SECONDS (rows are written as they finish), then one merged JSON + PNG.
#
#   bash recipes/eval_accuracy_parallel.sh OUT.json SECONDS [eval_accuracy.py options...]
#   bash recipes/eval_accuracy_parallel.sh bench/results/accuracy_toy.json 480 --problems 400
set -euo pipefail
out=$1 seconds=$2
shift 2
work=$(mktemp -d)
budgets=(20% 10% 5% 256 512 128 40%)
groups=("longflow" "streamingllm" "h2o" "lukv" "snapkv" "rkv" "reasonalloc" "random")
python3 recipes/eval_accuracy.py "$@" --policies --reference "$work/reference.json" --out "$work/reference_run.json"
for index in "${!groups[@]}"; do
  timeout "$seconds" python3 recipes/eval_accuracy.py "$@" --reference "$work/reference.json" \
    --policies ${groups[$index]} --budgets "${budgets[@]}" --out "$work/part$index.json" \
    >"$work/log$index.txt" 2>&1 &
done
wait || true
grep -h "accuracy\|skip" "$work"/log*.txt || true
shopt -s nullglob
parts=("$work"/part*.json)
if [ ${#parts[@]} -eq 0 ]; then
  echo "no configuration finished within $seconds s (logs: $work/log*.txt)" >&2
  exit 1
fi
python3 recipes/eval_accuracy.py --merge "${parts[@]}" --out "$out"
