"""The one-line patch on the bundled toy reasoner: generate under a KV budget, check the answers.

    python examples/patch_toy.py

The toy reasoner (3.4M parameters, shipped in the package) walks a table for about 650 tokens per
block, looking facts up from far back. R-KV at 512 slots holds about 60% of these traces and
solves them; LongFlow needs about 95% on this task (docs/results/accuracy_toy.md).
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import longflow_patch
from longflow_patch import toy

tokenizer = AutoTokenizer.from_pretrained(toy.model_path(), padding_side="left")
model = AutoModelForCausalLM.from_pretrained(toy.model_path(), dtype=torch.float32).eval()
problems = toy.make_problems(2, seed=0, blocks=(1, 1))
inputs = tokenizer([problem["prompt"] for problem in problems], return_tensors="pt", padding=True)

longflow_patch.apply(model, policy="rkv", budget=512)  # the one added line: at most 512 KV slots per layer
out = model.generate(**inputs, max_new_tokens=800, do_sample=False, pad_token_id=tokenizer.pad_token_id)
longflow_patch.unapply(model)  # the model is exactly as it was

completions = tokenizer.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
for problem, completion in zip(problems, completions, strict=True):
    verdict = "right" if toy.is_correct(completion, problem["answer"]) else "wrong"
    tokens = len(tokenizer(completion).input_ids)
    print(f"{tokens} tokens of reasoning, answer {toy.parse_answer(completion)}: {verdict}")
