"""Compiled decoding writes every cache in place.

torch.compile turns an in-place write into a graph input into a functional op plus a copy back.
Inductor turns it back into an in-place scatter only if nothing reads the buffer's old value after
the write in the functional graph; otherwise its code copies the whole buffer and copies it back,
two passes over a full KV cache per step. (The full cache's verification read its buffers, then
appended to them: the compiled full-cache loop of ``bench/speed_suite.py`` ran at 5.6-5.8x its
roofline on an H200, and every verification of a compiled speculative round paid the same.)

These tests compile with inductor on the CPU and read the code it generates, looking for an
allocation with the dimensions of a cache buffer, in any order (those copies were laid out
transposed). The first test shows that the check finds one where there must be one.
"""

import re

import pytest
import torch
import torch._inductor.config
from torch._inductor.utils import run_and_get_code

import longflow_patch
from longflow_patch.compat import cache_keyword
from longflow_patch.glide import GlideConfig, GlideDraft
from longflow_patch.glide_cache import GlideCache
from longflow_patch.speculative_cache import SpeculativeCache

from models import tiny_model
from recipe_loader import load_recipe
from test_speculative import greedy, prompt

throughput = load_recipe("bench_throughput.py")  # its compiled loops' decode step

ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_GPU)]


ALLOCATION = re.compile(r"empty_strided\w*\(\(([\d, ]*)\)")


def cache_sized_allocations(code: str, buffers: list[torch.Tensor]) -> list[str]:
    """The lines of inductor's ``code`` that allocate a tensor with the shape of one of ``buffers``,
    in any order of its dimensions: a copy may be laid out transposed (``[S, H, B, D]`` for
    ``[B, H, S, D]``)."""
    shapes = {tuple(sorted(buffer.shape)) for buffer in buffers}
    found = []
    for line in code.splitlines():
        match = ALLOCATION.search(line)
        if match and tuple(sorted(int(size) for size in match.group(1).split(",") if size.strip())) in shapes:
            found.append(line.strip())
    return found


def compiled_code(function, *args) -> tuple[object, str]:
    """``function(*args)`` compiled by inductor (fullgraph, no cached graphs), and its generated code."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True), torch.no_grad():
        result, codes = run_and_get_code(torch.compile(function, fullgraph=True), *args)
    return result, "\n".join(codes)


def buffers_of(cache) -> list[torch.Tensor]:
    """The key / value storage of a cache, its layers and its draft cache: the buffers whose size
    grows with the context or the budget. (A round's scratch, the draft's step log and tree nodes,
    holds ``T`` entries: in these tiny models its shapes are also those of the round's own key /
    value states, so the check cannot tell a copy of it from them; copying it would cost ``T`` rows.)"""
    holders = [cache, *getattr(cache, "layers", [])]
    tensors = [getattr(holder, name, None) for holder in holders for name in ("keys", "values")]
    draft = getattr(cache, "draft", None)
    return [t for t in tensors if isinstance(t, torch.Tensor)] + (buffers_of(draft) if draft is not None else [])


def test_the_check_finds_an_allocation_of_a_buffers_size():
    buffer = torch.randn(2, 3, 257, 8)
    doubled, code = compiled_code(lambda b: b * 2, buffer)
    assert torch.equal(doubled, buffer * 2)
    assert len(cache_sized_allocations(code, [buffer])) == 1
    transposed, code = compiled_code(lambda b: b.transpose(0, 2).contiguous(), buffer)
    assert torch.equal(transposed, buffer.transpose(0, 2))
    assert len(cache_sized_allocations(code, [buffer])) == 1


def prefilled_full_cache(model, ids: torch.Tensor, capacity: int) -> SpeculativeCache:
    """The full cache of `speculative_generate`'s target (and of the benchmarks' full-cache loop),
    holding ``ids``'s prompt."""
    cache = SpeculativeCache(model.config.num_hidden_layers, capacity)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    return cache


@pytest.mark.parametrize("device", DEVICES)
def test_a_decode_step_over_the_full_cache_writes_in_place(device):
    model = longflow_patch.apply(tiny_model("qwen3", "gqa").to(device), compile=False)
    ids = torch.randint(3, 128, (3, 21), generator=torch.Generator().manual_seed(0)).to(device)
    compiled_cache, eager_cache = (prefilled_full_cache(model, ids, capacity=389) for _ in range(2))
    keyword, token, position = cache_keyword(model), ids[:, -1:], torch.full((3, 1), 21, device=device)
    with torch.no_grad():
        expected = throughput._greedy_step(model, keyword, eager_cache, token, position)
    got, code = compiled_code(throughput._greedy_step, model, keyword, compiled_cache, token, position)
    assert torch.equal(got, expected)
    for compiled, eager in zip(compiled_cache.layers, eager_cache.layers, strict=True):
        assert int(compiled.length) == int(eager.length) == 22
        torch.testing.assert_close(compiled.keys, eager.keys)
        torch.testing.assert_close(compiled.values, eager.values)
    assert cache_sized_allocations(code, buffers_of(compiled_cache)) == []


@pytest.mark.parametrize("device", DEVICES)
def test_a_longflow_decode_step_writes_in_place(device):
    model = longflow_patch.apply(tiny_model("llama", "gqa").to(device), budget=23, compile=False)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1)).to(device)
    cache = longflow_patch.new_cache(model)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    position = torch.full((2, 1), 40, device=device)
    _, code = compiled_code(throughput._greedy_step, model, cache_keyword(model), cache, ids[:, -1:], position)
    assert cache_sized_allocations(code, buffers_of(cache)) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("draft", ["self", "glide-tree"])
def test_compiled_speculative_rounds_write_in_place(draft, device, monkeypatch):
    """A compiled round (draft steps and the verification forward, one graph) under inductor: the
    output is greedy ``generate``'s, and neither the target's cache nor the draft's is copied."""
    caches = []
    for cls in (SpeculativeCache, GlideCache):
        original = cls.__init__

        def recording_init(self, *args, original=original, **kwargs):
            original(self, *args, **kwargs)
            caches.append(self)

        monkeypatch.setattr(cls, "__init__", recording_init)
    model = longflow_patch.apply(tiny_model("qwen3", "gqa").to(device), compile=False)
    model.generation_config.eos_token_id = None
    ids = prompt(length=30).to(device)
    options = dict(num_draft_tokens=3, budget=24)
    if draft == "glide-tree":
        torch.manual_seed(1)
        glide = GlideDraft(GlideConfig.from_target(model.config, sink_tokens=2, window=8)).init_from_target(model)
        options = dict(draft=glide.to(device).eval(), draft_tree=(2, 2, 2))
    expected = greedy(model, ids, 12)
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        got, codes = run_and_get_code(
            lambda: longflow_patch.speculative_generate(
                model, ids, max_new_tokens=12, compile=dict(fullgraph=True, dynamic=False), **options
            )
        )
    assert torch.equal(got, expected)
    kinds = {SpeculativeCache} if draft == "self" else {SpeculativeCache, GlideCache}
    assert {type(cache) for cache in caches} == kinds
    buffers = [tensor for cache in caches for tensor in buffers_of(cache)]
    assert cache_sized_allocations("\n".join(codes), buffers) == []
