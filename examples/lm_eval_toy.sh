#!/usr/bin/env bash
# lm-evaluation-harness on the bundled toy reasoner's task (pip install -e ".[eval]"): the
# longflow_hf model is lm-eval's hf model with longflow_patch.apply; every policy setting is a
# --model_args entry. Extra arguments are passed on to lm_eval (e.g. --limit 2, --output_path DIR).
#
#   bash examples/lm_eval_toy.sh
set -euo pipefail
TOY=$(python -c "from longflow_patch import toy; print(toy.model_path())")
TASKS=$(python -c "import longflow_patch.eval as e; print(e.tasks_dir())")
lm_eval --model longflow_hf \
    --model_args "pretrained=$TOY,policy=rkv,budget=512,dtype=float32" \
    --tasks longflow_toy --include_path "$TASKS" \
    --metadata toy_problems=4,toy_blocks=1 \
    --gen_kwargs max_gen_toks=800 \
    --device "${DEVICE:-cpu}" --batch_size 4 "$@"
