"""The main job: the bundled toy reasoner solves fresh problems with LongFlow and with a full
cache side by side, and prints accuracy, tokens/s and KV-cache memory for each.

    python -m longflow_patch.demo --problems 4 --blocks 2 3 --budget-fraction 0.2

Each run may write at most the longest reference chain of thought plus 16 tokens, so a policy
that loses track (and never answers) costs no more than a correct one. About three minutes on two
CPU cores with the defaults.
"""

import argparse
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

import longflow_patch
from longflow_patch import toy
from longflow_patch.compat import cache_keyword
from longflow_patch.progress import TokenProgress


def run(model, tokenizer, problems: list[dict], policy: str, budget: int, batch_size: int, max_new_tokens: int) -> dict:
    """Solve ``problems`` greedily under one policy; returns accuracy, tokens/s and KV bytes."""
    # Eager for every policy: tokens/s side by side, with no compile time in one of them.
    longflow_patch.apply(model, policy=policy, budget=budget, compile=False)
    correct, generated, kv_bytes, seconds = 0, 0, 0, 0.0
    with tqdm(desc=f"{policy:>8}", unit="tok", leave=True) as bar:
        for start in range(0, len(problems), batch_size):
            batch = problems[start : start + batch_size]
            inputs = tokenizer([p["prompt"] for p in batch], return_tensors="pt", padding=True).to(model.device)
            full_size = inputs.input_ids.shape[1] + max_new_tokens if policy == "full" else None
            cache = longflow_patch.new_cache(model, full_size)
            began = time.perf_counter()
            progress = StoppingCriteriaList([TokenProgress(bar)])
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, stopping_criteria=progress,
                                 **{cache_keyword(model): cache})  # fmt: skip
            seconds += time.perf_counter() - began
            completions = tokenizer.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
            correct += sum(toy.is_correct(c, p["answer"]) for c, p in zip(completions, batch, strict=True))
            generated += int((out[:, inputs.input_ids.shape[1] :] != tokenizer.pad_token_id).sum())
            kv_bytes = max(kv_bytes, cache.kv_bytes())
            bar.set_postfix(accuracy=f"{correct}/{start + len(batch)}")
    longflow_patch.unapply(model)
    return {"policy": policy, "accuracy": correct / len(problems), "tokens_per_s": generated / seconds,
            "kv_mib": kv_bytes / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=4, help="fresh problems to solve")
    parser.add_argument("--blocks", type=int, nargs=2, default=[2, 3], metavar=("LOW", "HIGH"),
                        help="problem length range in blocks (about 650 tokens each)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=2026, help="seed of the problem generator")
    parser.add_argument("--policy", default="longflow", choices=sorted(longflow_patch.POLICIES))
    parser.add_argument("--budget-fraction", type=float, default=0.2, help="budget as a fraction of the longest trace")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(toy.model_path(), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(toy.model_path(), dtype=dtype).to(device).eval()
    problems = toy.make_problems(args.problems, args.seed, blocks=tuple(args.blocks), with_solution=True)
    max_new_tokens = max(len(tokenizer(p["solution"]).input_ids) for p in problems) + 16
    longest = max(len(tokenizer(p["prompt"]).input_ids) for p in problems) + max_new_tokens
    budget = max(64, int(args.budget_fraction * longest))
    print(f"toy reasoner on {device}: {args.problems} problems, {args.policy} budget {budget} slots per layer")
    rows = [run(model, tokenizer, problems, name, budget, args.batch_size, max_new_tokens)
            for name in ("full", args.policy)]  # fmt: skip
    print(f"\n{'policy':>12} {'accuracy':>9} {'tokens/s':>9} {'KV MiB':>8}")
    for row in rows:
        print(f"{row['policy']:>12} {row['accuracy']:>9.2%} {row['tokens_per_s']:>9.1f} {row['kv_mib']:>8.2f}")


if __name__ == "__main__":
    main()
