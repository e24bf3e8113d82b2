#!/bin/bash
# usage: bash recipes/eval_accuracy_parallel.sh OUT.json SECONDS [eval_accuracy.py options...]
#
# Accuracy sweep of recipes/eval_accuracy.py with policies and budgets in parallel on one GPU (the
# toy reasoner leaves most of it idle): one shared full-cache reference first (reused when
# REFERENCE names a file that holds it), then one process per policy and budget set, each cut off
# after SECONDS (rows are written as they finish), then one merged JSON + PNG.
#
#   bash recipes/eval_accuracy_parallel.sh bench/results/accuracy_toy.json 480 --problems 400
#
# Environment: BUDGET_SETS, budget lists separated by spaces, each list comma-separated and run
# by its own process per policy (default: every budget in one process, tightest last);
# POLICIES (default: every compared policy); REFERENCE (default: a fresh file).
set -euo pipefail
usage() { sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0"; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
out=$1 seconds=$2
shift 2
work=$(mktemp -d)
read -r -a budget_sets <<<"${BUDGET_SETS:-20%,10%,5%,256,512,128,40%}"
read -r -a policies <<<"${POLICIES:-longflow streamingllm h2o lukv+longflow snapkv rkv reasonalloc+longflow random}"
reference=${REFERENCE:-$work/reference.json}
python3 recipes/eval_accuracy.py "$@" --policies --reference "$reference" --out "$work/reference_run.json"
part=0
for policy in "${policies[@]}"; do
  for budgets in "${budget_sets[@]}"; do
    timeout "$seconds" python3 recipes/eval_accuracy.py "$@" --reference "$reference" \
      --policies "$policy" --budgets ${budgets//,/ } --out "$work/part$part.json" >"$work/log$part.txt" 2>&1 &
    part=$((part + 1))
  done
done
wait || true
grep -h "accuracy\|skip" "$work"/log*.txt || true
shopt -s nullglob
parts=("$work"/part*.json)
if [ ${#parts[@]} -eq 0 ]; then
  echo "no configuration finished within $seconds s (logs: $work/log*.txt)" >&2
  exit 1
fi
command="POLICIES=\"${policies[*]}\" BUDGET_SETS=\"${budget_sets[*]}\" bash $0 $out $seconds $*"
python3 recipes/eval_accuracy.py --merge "${parts[@]}" --out "$out" --describe "$command"
