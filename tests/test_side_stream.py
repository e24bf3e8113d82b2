"""The scoring pass beside the model's next kernels (`kernels/side_stream.py`): the same steps as
inline, eager, under a captured CUDA graph and through compiled generation; and a cache that leaves
no side work behind a forward."""

import pytest
import torch

import longflow_patch
from longflow_patch import cache as cache_module
from longflow_patch import ops
from longflow_patch.compat import cache_keyword
from longflow_patch.kernels import side_stream

from models import left_padded_prompts, tiny_model
from test_decode_kernel import random_step

ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def record_overlap_flags(monkeypatch) -> list[bool]:
    """The ``overlap_scoring`` of every decode call the caches make, in order."""
    flags = []
    step = cache_module.decode_step

    def recording(*args, overlap_scoring=False, **kwargs):
        flags.append(overlap_scoring)
        return step(*args, overlap_scoring=overlap_scoring, **kwargs)

    monkeypatch.setattr(cache_module, "decode_step", recording)
    return flags


def test_a_forward_lets_every_layer_but_the_last_leave_its_scoring_beside(monkeypatch):
    """Each decode forward asks the op to overlap the scoring pass in layers 0..L-2 and never in the
    last, whose call joins the others' and runs its own inline: a step ends with nothing pending."""
    model = tiny_model("qwen3", "gqa", layers=3)
    longflow_patch.apply(model, budget=24, compile=False)
    flags = record_overlap_flags(monkeypatch)
    ids, mask = left_padded_prompts(batch=2, length=12)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                   pad_token_id=0)  # fmt: skip
    assert flags == [True, True, False] * 4  # the first token comes from the prefill


def test_a_call_of_several_tokens_overlaps_only_its_last(monkeypatch):
    """A layer decoding ``n`` tokens in one call reads its own state before each token's op call
    (compacting policies), so only the last token's pass may run beside."""
    model = tiny_model("llama", "gqa", layers=2)
    longflow_patch.apply(model, budget=24, compile=False)
    cache = longflow_patch.new_cache(model)
    ids, mask = left_padded_prompts(batch=2, length=12)
    model(input_ids=ids, attention_mask=mask, **{cache_keyword(model): cache}, use_cache=True)
    flags = record_overlap_flags(monkeypatch)
    attention = torch.cat([mask, torch.ones_like(mask[:, :3])], dim=1)
    model(input_ids=ids[:, :3], attention_mask=attention, **{cache_keyword(model): cache}, use_cache=True)
    assert flags == [False, False, True, False, False, False]


def record_beside(monkeypatch) -> list[bool]:
    """Whether each kernel call asked `side_stream.beside` to run its scoring pass beside, in order."""
    calls = []
    beside = side_stream.beside
    monkeypatch.setattr(side_stream, "beside", lambda enabled, keep: calls.append(enabled) or beside(enabled, keep))
    return calls


def layer_states(layers: int, seed: int) -> list[dict]:
    """``layers`` random decode states whose budget (100 slots) fits one attention tile: one split per
    head at any batch, the only case where the pass may run beside."""
    torch.manual_seed(seed)
    return [random_step(8, 2, 4, 100, 64, torch.bfloat16, 90) for _ in range(layers)]


def new_tokens(states: list[dict], step: int) -> list[tuple[torch.Tensor, ...]]:
    """Each layer's new query, key and value at ``step`` (the same in every run)."""
    generator = torch.Generator(device="cuda").manual_seed(step)
    return [
        tuple(torch.randn(state[name].shape, generator=generator, device="cuda", dtype=state[name].dtype)
              for name in ("q", "k_new", "v_new"))
        for state in states
    ]  # fmt: skip


def run_layers(states: list[dict], tokens: list[tuple], position: torch.Tensor, workspaces: dict | None):
    """One forward over the layers, as a cache runs them: each but the last may overlap its scoring.
    Between layers, a matmul allocates and writes new memory, as a model's projections do."""
    outputs = []
    for index, (state, (q, k_new, v_new)) in enumerate(zip(states, tokens, strict=True)):
        cache = [state[name] for name in ("k_cache", "v_cache", "value_norm", "slot_pos", "write_slot")]
        args = (q, k_new, v_new, *cache, position.clone(), state["slot_limit"], None, 64**-0.5, 2, 4, True, 0)
        overlap = index < len(states) - 1
        if workspaces is None:
            outputs.append(ops.decode_attention(*args, overlap_scoring=overlap))
        else:
            outputs.append(ops.decode_step(*args, overlap_scoring=overlap, workspaces=workspaces))
        filler = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
        outputs[-1] = outputs[-1] + (filler @ filler)[0, 0] * 0
    return outputs


def cache_tensors(states: list[dict]) -> list[torch.Tensor]:
    return [state[name] for state in states for name in ("k_cache", "v_cache", "value_norm", "slot_pos", "write_slot")]


@ON_GPU
@pytest.mark.parametrize("kept_workspaces", [True, False], ids=["eager-kept-scratch", "fresh-scratch"])
def test_scoring_beside_gives_the_inline_steps(monkeypatch, kept_workspaces):
    """Thirty steps of three layers with the scoring pass beside the next kernels give the outputs,
    caches and write slots of the same steps inline, bit for bit; eager decoding keeps one
    workspace for all layers (the next layer's attention pass reuses what the pass beside reads)."""

    def run(overlap: bool) -> tuple[list, list]:
        monkeypatch.setattr(side_stream, "OVERLAP_SCORING", overlap)
        states, outputs = layer_states(3, seed=0), []
        workspaces = {} if kept_workspaces else None
        for step in range(30):
            position = torch.full((8,), 400 + step, dtype=torch.int32, device="cuda")
            outputs += run_layers(states, new_tokens(states, step), position, workspaces)
            assert not side_stream.pending(), "the last layer left side work behind"
        torch.cuda.synchronize()
        return outputs, cache_tensors(states)

    beside_calls = record_beside(monkeypatch)
    inline = run(False)
    overlapped = run(True)
    assert beside_calls[:3] == [False] * 3 and beside_calls[90:93] == [True, True, False]
    for got, expected in zip(overlapped[0] + overlapped[1], inline[0] + inline[1], strict=True):
        assert torch.equal(got, expected)


@ON_GPU
def test_scoring_beside_replays_from_a_cuda_graph(monkeypatch):
    """A captured forward of three layers forks the side stream and joins it inside the graph; ten
    replays give the caches and outputs of ten inline steps."""
    monkeypatch.setattr(side_stream, "OVERLAP_SCORING", True)
    states, reference = layer_states(3, seed=1), layer_states(3, seed=1)
    tokens = [tuple(t.clone() for t in layer) for layer in new_tokens(states, 0)]
    position = torch.full((8,), 400, dtype=torch.int32, device="cuda")

    side = torch.cuda.Stream()  # warm up (compile the kernels) off the capture, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = layer_states(3, seed=2)
        run_layers(warm, tokens, position, None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_layers(states, tokens, position, None)
    assert not side_stream.pending()

    for step in range(10):
        for layer, fresh in zip(tokens, new_tokens(states, step), strict=True):
            for tensor, value in zip(layer, fresh, strict=True):
                tensor.copy_(value)
        position.fill_(400 + step)
        graph.replay()
        monkeypatch.setattr(side_stream, "OVERLAP_SCORING", False)
        expected = run_layers(reference, [tuple(t.clone() for t in layer) for layer in tokens], position, {})
        monkeypatch.setattr(side_stream, "OVERLAP_SCORING", True)
        torch.cuda.synchronize()
        for got, want in zip(captured, expected, strict=True):
            assert torch.equal(got, want), f"replay {step}: outputs differ"
        for got, want in zip(cache_tensors(states), cache_tensors(reference), strict=True):
            assert torch.equal(got, want), f"replay {step}: caches differ"


@ON_GPU
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_generation_with_scoring_beside_gives_the_inline_tokens(monkeypatch, compile):
    """A patched model generates the same tokens and ends with the same caches with the scoring pass
    beside as inline: eager, and compiled under CUDA graphs (apply's default on a GPU)."""
    model = tiny_model("qwen3", "gqa", layers=3, head_dim=64, dtype=torch.bfloat16).cuda()
    ids, mask = (tensor.cuda() for tensor in left_padded_prompts(batch=8, length=20))

    def generate(overlap: bool):
        monkeypatch.setattr(side_stream, "OVERLAP_SCORING", overlap)
        torch._dynamo.reset()
        longflow_patch.apply(model, budget=48, compile=compile)
        model.__dict__.pop("_compiled_call", None)
        cache = longflow_patch.new_cache(model)
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=120, min_new_tokens=120,
                                do_sample=False, pad_token_id=0, **{cache_keyword(model): cache})  # fmt: skip
        torch.cuda.synchronize()
        assert not side_stream.pending(), "generation left side work behind"
        return tokens, [t.clone() for layer in cache.layers for t in (layer.slot_pos, layer.write_slot)]

    beside_calls = record_beside(monkeypatch)
    inline = generate(False)
    assert not any(beside_calls)
    overlapped = generate(True)
    assert any(beside_calls), "no scoring pass ran beside"
    assert torch.equal(overlapped[0], inline[0])
    for got, expected in zip(overlapped[1], inline[1], strict=True):
        assert torch.equal(got, expected)
