"""Lossless speculative decoding (LongSpec-style) on the bundled toy reasoner with its bundled
2-layer draft: the output is token for token the target's own greedy output.

    python examples/speculative_toy.py

On the CPU this shows correctness, not speed: the speed-up comes on a GPU (docs/results/speculative.md).
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import longflow_patch
from longflow_patch import toy

tokenizer = AutoTokenizer.from_pretrained(toy.model_path())
target = AutoModelForCausalLM.from_pretrained(toy.model_path(), dtype=torch.float32).eval()
draft = AutoModelForCausalLM.from_pretrained(toy.draft_path(), dtype=torch.float32).eval()
problem = toy.make_problems(1, seed=0, blocks=(1, 1))[0]
input_ids = tokenizer(problem["prompt"], return_tensors="pt").input_ids

out, stats = longflow_patch.speculative_generate(
    target, input_ids, max_new_tokens=800, draft=draft, budget=256, num_draft_tokens=4, return_stats=True
)
reference = target.generate(input_ids, max_new_tokens=800, do_sample=False, pad_token_id=tokenizer.pad_token_id)

completion = tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
print(f"identical to the target's greedy output: {torch.equal(out, reference)}")
print(f"answer right: {toy.is_correct(completion, problem['answer'])}")
print(f"{stats.new_tokens} tokens in {stats.rounds + 1} target forwards ({stats.tokens_per_round:.2f} per forward), "
      f"draft acceptance {stats.acceptance_rate:.0%}")  # fmt: skip
