#!/usr/bin/env bash
# Sharded generation with `accelerate launch`: processes split the prompts (one per GPU; here two on
# the CPU) and rank 0 merges their results into one JSON-lines file, in input order. Rerunning the
# same command resumes an interrupted run. recipes/generate.py --help lists every option.
#
#   bash examples/generate_sharded.sh [OUT.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-toy_completions.jsonl}
PROMPTS=$(mktemp --suffix=.jsonl)
trap 'rm -f "$PROMPTS"' EXIT
TOY=$(python -c "from longflow_patch import toy; print(toy.model_path())")
python -c "
import json
from longflow_patch import toy
for i, p in enumerate(toy.make_problems(4, seed=0, blocks=(1, 1))):
    print(json.dumps({'id': i, 'prompt': p['prompt'], 'answer': p['answer']}))
" >"$PROMPTS"

LAUNCH=(--num_processes "${PROCESSES:-2}" --num_machines 1 --mixed_precision no --dynamo_backend no)
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    LAUNCH+=(--multi_gpu)  # on the CPU, accelerate's --cpu starts one process: spawn them with its torchrun launcher
fi
accelerate launch "${LAUNCH[@]}" recipes/generate.py --model "$TOY" --prompts "$PROMPTS" --out "$OUT" \
    --policy rkv --budget 512 --max-new-tokens 800 --temperature 0 --batch-size 2

python -c "
import json, sys
from longflow_patch import toy
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f'solved {sum(toy.is_correct(r[\"completion\"], r[\"answer\"]) for r in rows)} of {len(rows)} ({sys.argv[1]})')
" "$OUT"
