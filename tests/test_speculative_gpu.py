"""GPU-only: speculative decoding through the Triton kernels (and CUDA graphs) against transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import longflow_patch
from longflow_patch import toy
from longflow_patch.compat import cache_keyword
from longflow_patch.speculative_cache import SpeculativeCache

from models import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_verification_logits_match_plain_transformers(dtype):
    """Chunks of 5 tokens through the verify op: logits within half-precision noise of SDPA."""
    model = longflow_patch.apply(tiny_model("qwen3", "gqa", layers=2, head_dim=128, dtype=dtype).cuda(), budget=64)
    tokens = torch.randint(3, 128, (1, 300), device="cuda")

    def run(cache) -> torch.Tensor:
        logits = [model(input_ids=tokens[:, :100], **{cache_keyword(model): cache}, use_cache=True).logits[:, -1:]]
        for start in range(100, 300, 5):
            positions = torch.arange(start, start + 5, device="cuda")[None]
            chunk = tokens[:, start : start + 5]
            logits.append(
                model(input_ids=chunk, position_ids=positions, **{cache_keyword(model): cache}, use_cache=True).logits
            )
        return torch.cat(logits, dim=1).float()

    expected = run(DynamicCache(config=model.config))
    got = run(SpeculativeCache(model.config.num_hidden_layers, 320))
    error = (got - expected).norm() / expected.norm()
    assert error < 2e-2, f"relative logit error {error:.2e}"


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("draft", ["self", "toy", "glide", "glide-tree"])
def test_toy_reasoner_greedy_output_identical_to_generate(compile, draft):
    model = AutoModelForCausalLM.from_pretrained(toy.model_path(), dtype=torch.bfloat16).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(toy.model_path())
    model.generation_config.eos_token_id = None
    tree = (4, 4, 4, 4) if draft == "glide-tree" else None
    if draft == "toy":
        draft = AutoModelForCausalLM.from_pretrained(toy.draft_path(), dtype=torch.bfloat16).cuda().eval()
        longflow_patch.apply(draft, budget=256)
    elif draft.startswith("glide"):
        draft = longflow_patch.load_glide_draft(toy.glide_path(), target=model)
    problem = toy.make_problems(1, seed=0)[0]
    ids = tokenizer(problem["prompt"], return_tensors="pt").input_ids.cuda()
    expected = model.generate(input_ids=ids, max_new_tokens=300, do_sample=False, pad_token_id=0)
    longflow_patch.apply(model, budget=256)
    for _ in range(2):  # compiled: the second call replays the captured graphs
        got, stats = longflow_patch.speculative_generate(
            model, ids, max_new_tokens=300, draft=draft, budget=256, num_draft_tokens=4, draft_tree=tree,
            compile=compile, return_stats=True,
        )  # fmt: skip
        assert torch.equal(got, expected)
        assert stats.acceptance_rate > 0.5


def test_sampling_with_compiled_rounds_is_reproducible_per_seed():
    """Sampling through compiled rounds (Gumbel noise drawn outside the graph) on a random-weight
    model: the prompt is kept, the length is the asked one, a seed reproduces its output exactly
    and another seed gives another output."""
    model = longflow_patch.apply(tiny_model("qwen3", "gqa", dtype=torch.bfloat16).cuda(), budget=64)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 128, (1, 80), device="cuda")

    def sample(seed: int) -> torch.Tensor:
        generator = torch.Generator(device="cuda").manual_seed(seed)
        return longflow_patch.speculative_generate(model, ids, max_new_tokens=64, budget=32, num_draft_tokens=4,
                                                   do_sample=True, generator=generator, compile=True)  # fmt: skip

    first, again, other = sample(0), sample(0), sample(1)
    assert first.shape == (1, 80 + 64) and torch.equal(first[:, :80], ids)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
