"""How often LongFlow's eviction choice differs between fp16 and float32 logits, on a real model.

    python bench/logits_fp16_choices.py   # SmolLM2 on the CPU: 4 GSM8K answers of 384 tokens, budgets 64 and 128

The kernel stores each slot's base-2 logit between its two passes in fp16 (``STORED_LOGIT_DTYPE``;
float32 until 2026-12-07; the fifteenth run measured half the bytes at 0.96x the op's time where the
logits miss L2), and the reference rounds them the same way. The softmax normalisers stay float32
(the attention pass keeps them in registers), so only each slot's own logit rounds, to 11
significant bits. This script decodes SmolLM2's greedy answers to GSM8K questions with LongFlow on
the CPU (the PyTorch reference), and at every step of every layer recomputes the choice from
float32 logits beside the reference's own (from fp16 logits). Decoding follows the reference, so
every decision is made on the same cache. Per decision it records:
- whether the two choices agree;
- where they do not, the regret: the float32 score of the slot fp16 evicts, above the lowest.
Scores are log-contributions in nats.
"""

import argparse
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from eval_fidelity import DEFAULT_DATA, prompt_ids, read_questions

import longflow_patch
from longflow_patch import ops
from longflow_patch.kernels.decode_attention_reference import ScoreKind, prepare_new_token, rank_slots, slot_weights
from longflow_patch.models import smollm2

from common import environment, print_table, write_results


def contribution_ranks(step: dict, q: torch.Tensor, stored_dtype: torch.dtype) -> torch.Tensor:
    """The reference's eviction ranks ``[B, 1 or Hkv, S]`` for the contribution score, from the op's
    arguments ``step`` after the step (the new token written; ``q`` prepared), with each slot's
    base-2 logit stored in ``stored_dtype`` between the passes (`slot_weights`)."""
    k_cache, slot_pos, shared = step["k_cache"], step["slot_pos"], step["shared"]
    batch, kv_heads, slots, head_dim = k_cache.shape
    usable = torch.arange(slots) < step["slot_limit"][..., None]
    valid = usable & (slot_pos >= 0)
    logits = torch.einsum("bhgd,bhsd->bhgs", q.float().view(batch, kv_heads, -1, head_dim), k_cache.float())
    logits = (logits * step["scale"]).masked_fill(~valid[:, :, None, :], -torch.inf)
    score = slot_weights(logits, step["value_norm"], ScoreKind.CONTRIBUTION, shared, stored_dtype)
    select = slice(0, 1) if shared else slice(None)
    return rank_slots(score, slot_pos[:, select], usable[:, select], step["position"], step["sink_tokens"],
                      step["recent_window"])  # fmt: skip


class ChoiceRecorder:
    """Wraps the reference op: after each step, the fp16 (the reference's) and float32 choices from the
    same cache."""

    def __init__(self) -> None:
        self.reference = ops.decode_attention_reference
        self.signature = inspect.signature(self.reference)
        self.decisions = 0
        self.disagreements = 0
        self.regrets: list[float] = []

    def __call__(self, *args: object) -> torch.Tensor:
        out = self.reference(*args)
        bound = self.signature.bind(*args)
        bound.apply_defaults()
        step = bound.arguments
        if step["score_kind"] != ScoreKind.CONTRIBUTION or step["reallocate_every"]:
            raise ValueError("logits_fp16_choices measures the contribution score without re-allocation")
        q = step["q"]
        if step["cos"] is not None:
            q = prepare_new_token(q, step["cos"], step["sin"], step["q_norm_weight"], step["norm_eps"])
        fp32 = contribution_ranks(step, q, torch.float32)
        fp16 = contribution_ranks(step, q, torch.float16)
        chosen, rounded = fp32.argmin(-1), fp16.argmin(-1)
        write_slot = step["write_slot"][:, : rounded.shape[1]]
        if not torch.equal(rounded.to(write_slot.dtype), write_slot):
            raise AssertionError("the recomputed fp16 choice is not the reference's")
        differs = chosen != rounded
        self.decisions += differs.numel()
        self.disagreements += int(differs.sum())
        regret = fp32.gather(-1, rounded[..., None]) - fp32.gather(-1, chosen[..., None])
        self.regrets += regret[..., 0][differs].tolist()
        return out


def prompts(tokenizer, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` GSM8K questions in the chat template (`eval_fidelity.prompt_ids`), left-padded:
    ``input_ids`` and ``attention_mask``, ``[count, longest]``."""
    questions = read_questions(DEFAULT_DATA, [f"gsm8k:0:{count}"])
    batch = tokenizer.pad({"input_ids": [prompt_ids(tokenizer, q["question"]) for q in questions]}, return_tensors="pt")
    return batch.input_ids, batch.attention_mask


def choice_changes(
    model, ids: torch.Tensor, mask: torch.Tensor, pad_id: int, policy: str, budget: int, new_tokens: int
) -> dict:
    """Greedy ``generate`` of ``new_tokens`` from ``ids`` under ``policy`` (``longflow`` or
    ``longflow:per_head``) at ``budget``, the reference op wrapped by a `ChoiceRecorder`: its counts."""
    name, _, scope = policy.partition(":")
    recorder = ChoiceRecorder()
    longflow_patch.apply(model, policy=name, budget=budget, per_head=scope == "per_head")
    ops.decode_attention_reference = recorder
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad_id)  # fmt: skip
    finally:
        ops.decode_attention_reference = recorder.reference
        longflow_patch.unapply(model)
    regrets = torch.tensor(recorder.regrets) if recorder.regrets else None
    return {"policy": policy, "budget": budget, "decisions": recorder.decisions, "changed": recorder.disagreements,
            "changed_share": recorder.disagreements / max(recorder.decisions, 1),
            "regret_median_nats": None if regrets is None else float(regrets.median()),
            "regret_max_nats": None if regrets is None else float(regrets.max())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--policies", nargs="+", default=["longflow", "longflow:per_head"])
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=384)
    parser.add_argument("--out", default="bench/results/logits_fp16_choices_smollm2.json")
    args = parser.parse_args()

    model, tokenizer = smollm2()
    ids, mask = prompts(tokenizer, args.questions)
    rows = [choice_changes(model, ids, mask, tokenizer.pad_token_id, policy, budget, args.new_tokens)
            for policy in args.policies for budget in args.budgets]  # fmt: skip
    print_table(rows, list(rows[0]))
    write_results(args.out, {"benchmark": "logits_fp16_choices", "environment": environment(), "model": "smollm2",
                             "data": "gsm8k", "settings": vars(args), "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
