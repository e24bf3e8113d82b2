"""Profile a model's KV needs per layer and head and write ReasonAlloc and LU-KV budget profiles.

Calibration: full-attention forwards over reference traces (the toy reasoner's own problems and
solutions by default), eager attention so the weights are visible. For every layer, KV head and
sampled query position t, each earlier token's contribution is LongFlow's signal, the softmax
weight summed over the head's query group times ``||v||_1``, normalised to a distribution over the
tokens. Choices (the papers leave them open):

- LU-KV utility curve of a head: ``u(b)`` = the contribution mass captured by the ``b`` largest
  contributions, averaged over all sampled queries of all traces, so a budget is valued by what it
  keeps for every later step (long-term), not one step. The curve is concave by construction;
  `greedy_allocate` solves the per-head budgets on it.
- ReasonAlloc layer need: for each head, the mean number of tokens that captures ``--coverage``
  of a query's contribution mass; a layer's need is the sum over its heads (the per-layer
  'reasoning wave'); `layer_budgets_from_profile` turns needs into layer budgets.

    python recipes/profile_budgets.py --out-dir longflow_patch/toy/model/profiles
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longflow_patch import toy
from longflow_patch.profiles import BudgetProfile


def head_contributions(model, ids: torch.Tensor, queries: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, ``[Hkv, Q, T]`` normalised contributions of every token to each sampled query."""
    config = model.config
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    norms = []
    hooks = [layer.self_attn.v_proj.register_forward_hook(
        lambda module, inputs, output: norms.append(output[0].float().view(-1, kv_heads, head_dim).abs().sum(-1)))
        for layer in model.model.layers]  # fmt: skip
    try:
        attentions = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    finally:
        for hook in hooks:
            hook.remove()
    result = []
    for attention, norm in zip(attentions, norms, strict=True):
        weights = attention[0, :, queries].float().view(kv_heads, -1, len(queries), ids.shape[1]).sum(dim=1)
        contribution = weights * norm.T[:, None, :]
        result.append(contribution / contribution.sum(dim=-1, keepdim=True).clamp_min(1e-30))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled toy reasoner)")
    parser.add_argument("--problems", type=int, default=8, help="calibration traces")
    parser.add_argument("--seed", type=str, default="calibration")
    parser.add_argument("--query-stride", type=int, default=8, help="profile every n-th query position")
    parser.add_argument("--curve-length", type=int, default=2048, help="budgets 0..n-1 in each utility curve")
    parser.add_argument("--coverage", type=float, default=0.9, help="mass a ReasonAlloc need must cover")
    parser.add_argument("--budget", type=int, default=256, help="slots per head per layer the profiles are solved at")
    parser.add_argument("--minimum", type=int, default=16, help="floor of any head's budget")
    parser.add_argument("--out-dir", type=Path, default=Path("longflow_patch/toy/model/profiles"))
    args = parser.parse_args()

    path = args.model or toy.model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    mass = np.zeros((layers, kv_heads, args.curve_length))
    need = np.zeros((layers, kv_heads))
    count = 0
    for problem in toy.make_problems(args.problems, args.seed, blocks=(2, 3), with_solution=True):
        ids = tokenizer(problem["prompt"] + problem["solution"], return_tensors="pt").input_ids
        queries = torch.arange(64, ids.shape[1], args.query_stride)
        with torch.no_grad():
            contributions = head_contributions(model, ids, queries)
        for layer, contribution in enumerate(contributions):
            ranked = contribution.sort(dim=-1, descending=True).values.cumsum(dim=-1)  # [Hkv, Q, T]
            width = min(args.curve_length - 1, ranked.shape[-1])
            captured = torch.ones(kv_heads, len(queries), args.curve_length)
            captured[:, :, 0] = 0.0
            captured[:, :, 1 : width + 1] = ranked[:, :, :width]
            mass[layer] += captured.sum(dim=1).numpy()
            need[layer] += ((ranked < args.coverage).sum(dim=-1) + 1).float().sum(dim=1).numpy()
        count += len(queries)
    curves = (mass / count).tolist()
    needs = (need / count).tolist()
    total = args.budget * layers * kv_heads
    name = str(path)
    metadata = {
        "calibration": f"{args.problems} toy traces, seed {args.seed!r}, every {args.query_stride}th query",
        "signal": "softmax weight summed over the query group x ||v||_1",
        "coverage": args.coverage,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lukv = BudgetProfile.from_curves("lukv", name, curves, total, kv_heads, args.minimum, metadata)
    reasonalloc = BudgetProfile.from_curves("reasonalloc", name, needs, total, kv_heads, args.minimum, metadata)
    lukv.save(args.out_dir / "lukv.json")
    reasonalloc.save(args.out_dir / "reasonalloc.json")
    print("layer needs (tokens for", args.coverage, "of the mass):", [round(sum(n), 1) for n in needs])
    print("LU-KV head budgets at", args.budget, "per head:", lukv.head_budgets)
    print("ReasonAlloc layer budgets:", reasonalloc.layer_budgets)
    print(f"wrote {args.out_dir / 'lukv.json'} and {args.out_dir / 'reasonalloc.json'}")


if __name__ == "__main__":
    main()
