"""How much of a model's attention any cache of ``k`` slots could hold: a bound on eviction.

For each layer and KV head, and each query with at least ``--min-history`` keys before it, the
largest share of that query's attention a ``k``-slot cache could keep: the ``k`` keys with the most
attention summed over the KV head's query group (the group shares its cache), divided by the group
size. Averaged over those queries (and the 5th percentile), for each ``k`` in ``--budgets``.

A real policy keeps less: it chooses before the query arrives and cannot bring an evicted token
back. So where this bound is far below 1 at a budget, every eviction policy at that budget loses
that much of the attention of a typical query, whatever its scoring rule or allocation.

Teacher-forced, one text at a time, with attention computed in query chunks (exact: the logits
match the model's eager attention). Default: the bundled toy reasoner on its own problems
(prompt + reference chain of thought); any Llama / Qwen2 / Qwen3 directory with ``--model`` and
``--texts`` (JSON lines with a ``text`` field).

    python bench/attention_concentration.py
    python bench/attention_concentration.py --model PATH --texts texts.jsonl --budgets 256 1024 4096
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from longflow_patch import toy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules (`common`), also under python -P
from common import environment, print_table, write_results

ATTENTION = "longflow_concentration"
QUERY_CHUNK = 256


class ConcentrationRecorder:
    """Collects, per (layer, KV head), every recorded query's best-``k`` attention share for each
    budget, for the mean and 5th percentile of ``summary``."""

    def __init__(self, budgets: list[int], min_history: int) -> None:
        self.budgets = budgets
        self.min_history = min_history
        self.shares: dict[tuple[int, int], list[torch.Tensor]] = {}

    def record(self, layer: int, first_query: int, weights: torch.Tensor) -> None:
        """``weights`` ``[Hkv, G, Q, T]`` float32: softmax rows of queries ``first_query ..``."""
        keep = torch.arange(first_query, first_query + weights.shape[2], device=weights.device) >= self.min_history
        if not keep.any():
            return
        group = weights[:, :, keep].mean(1)  # [Hkv, Q', T]
        best = group.topk(min(max(self.budgets), group.shape[-1]), dim=-1).values.cumsum(-1)
        columns = torch.tensor([min(k, best.shape[-1]) - 1 for k in self.budgets], device=best.device)
        shares = best.index_select(-1, columns).cpu()  # [Hkv, Q', budgets]
        for head in range(shares.shape[0]):
            self.shares.setdefault((layer, head), []).append(shares[head])

    def summary(self) -> list[dict]:
        rows = []
        for (layer, head), parts in sorted(self.shares.items()):
            shares = torch.cat(parts)  # [queries, budgets]
            row = {"layer": layer, "kv_head": head, "queries": shares.shape[0]}
            for index, k in enumerate(self.budgets):
                row[f"mean@{k}"] = float(shares[:, index].mean())
                row[f"p5@{k}"] = float(shares[:, index].quantile(0.05))
            rows.append(row)
        return rows


RECORDER: ConcentrationRecorder | None = None


def recording_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention (scores x scaling + mask, float32 softmax, x V) in query chunks,
    handing each chunk's probabilities to ``RECORDER`` (when set). ``query`` ``[1, Hq, T, D]``,
    ``key``/``value`` ``[1, Hkv, T, D]``."""
    groups = module.num_key_value_groups
    _, query_heads, length, _ = query.shape
    keys = key.repeat_interleave(groups, dim=1)
    values = value.repeat_interleave(groups, dim=1)
    output = torch.empty_like(query)
    for start in range(0, length, QUERY_CHUNK):
        stop = min(length, start + QUERY_CHUNK)
        scores = torch.matmul(query[:, :, start:stop], keys.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, start:stop, : keys.shape[-2]]
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if RECORDER is not None:
            RECORDER.record(module.layer_idx, start, weights[0].view(query_heads // groups, groups, stop - start, -1))
        output[:, :, start:stop] = torch.matmul(weights.to(values.dtype), values)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, recording_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)


def measure(model, token_ids: list[list[int]], budgets: list[int], min_history: int) -> list[dict]:
    """Rows per layer and KV head (see the module docstring) over ``token_ids`` (one list per text).
    ``model`` must have been loaded with ``attn_implementation=ATTENTION``."""
    global RECORDER
    RECORDER = ConcentrationRecorder(budgets, min_history)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for ids in token_ids:
            model(input_ids=torch.tensor([ids], device=device))
    rows, RECORDER = RECORDER.summary(), None
    return rows


def toy_texts(problems: int, seed: int) -> list[str]:
    return [p["prompt"] + p["solution"] for p in toy.make_problems(problems, seed, with_solution=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the bundled toy reasoner)")
    parser.add_argument("--texts", type=Path, help="JSON lines with a 'text' field (default: toy problems)")
    parser.add_argument("--problems", type=int, default=16, help="toy problems (without --texts)")
    parser.add_argument("--seed", type=int, default=20261122, help="toy problem seed")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--min-history", type=int, default=1024, help="only queries with this many keys")
    parser.add_argument("--out", type=Path, default=Path("bench/results/attention_concentration.json"))
    args = parser.parse_args()

    model_path = args.model or toy.model_path()
    if args.texts is None:
        texts = toy_texts(args.problems, args.seed)
    else:
        texts = [json.loads(line)["text"] for line in args.texts.read_text().splitlines() if line.strip()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=ATTENTION, dtype=torch.float32)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    token_ids = [tokenizer(text).input_ids for text in texts]
    rows = measure(model, token_ids, args.budgets, args.min_history)

    columns = ["layer", "kv_head", "queries", *(f"{stat}@{k}" for k in args.budgets for stat in ("mean", "p5"))]
    print(f"best share of each query's attention a k-slot cache could hold ({len(texts)} texts, "
          f"queries with >= {args.min_history} keys)")  # fmt: skip
    print_table(rows, columns)
    mean = {f"mean@{k}": sum(r[f"mean@{k}"] for r in rows) / len(rows) for k in args.budgets}
    print("all heads:", ", ".join(f"k={k}: {mean[f'mean@{k}']:.3f}" for k in args.budgets))
    write_results(args.out, {
        "benchmark": "attention_concentration",
        "environment": environment(),
        "model": args.model or "bundled toy reasoner",
        "texts": str(args.texts) if args.texts else f"toy problems: {args.problems}, seed {args.seed}",
        "mean_tokens": sum(map(len, token_ids)) / len(token_ids),
        "min_history": args.min_history,
        "budgets": args.budgets,
        "all_heads": mean,
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
