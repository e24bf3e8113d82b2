"""``generate`` reads its stop check one step late for the caches the patched ``generate`` makes
(`longflow_patch.compat.defer_stop_check_on_cuda`): the per-step check's tokens, one extra step
when every row stops on an end-of-sequence token, and the caller's caches keep transformers' rule.
Besides that check, a decode step reads no tensor on the host (each such read waits for the GPU).

The deferred check runs on CUDA only (it records ``torch.Event`` s, which the CPU lacks); here the
CPU stands in for CUDA, with an event that completes at once (CPU work is synchronous)."""

import sys
from collections import Counter

import pytest
import torch
from transformers import CompileConfig
from transformers.generation import utils as generation_utils

import longflow_patch
from longflow_patch import compat
from longflow_patch.compat import cache_keyword

from models import left_padded_prompts, tiny_model


class HostEvent:
    """``torch.Event`` for the CPU, where every copy has finished when it returns."""

    def __init__(self, device=None, blocking=False):
        pass

    def record(self):
        pass

    def synchronize(self):
        pass


def record_deferred_checks(monkeypatch) -> list:
    """The list that every `DeferredStopCheck` built from now on (for the test) is appended to."""
    built = []
    original_init = generation_utils.DeferredStopCheck.__init__

    def recording_init(check, *args, **kwargs):
        built.append(check)
        original_init(check, *args, **kwargs)

    monkeypatch.setattr(generation_utils.DeferredStopCheck, "__init__", recording_init)
    return built


@pytest.fixture
def deferred_checks(monkeypatch) -> list:
    """Let the CPU defer like CUDA; returns the list of `DeferredStopCheck` s that calls build."""
    monkeypatch.setattr(compat, "DEFERRED_STOP_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch, "Event", HostEvent)
    return record_deferred_checks(monkeypatch)


def end_tokens(model, ids, mask, step: int) -> list[int]:
    """Each row's greedy token at new position ``step``: with all of them as end-of-sequence
    tokens every row stops by then."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=step + 1, do_sample=False,
                         pad_token_id=0, eos_token_id=None)  # fmt: skip
    return sorted(set(out[:, ids.shape[1] + step].tolist()))


@pytest.mark.parametrize("budget", [24, 512])
def test_deferred_stop_gives_the_per_step_checks_tokens(deferred_checks, monkeypatch, budget):
    """Budget 24 evicts from the first steps; 512 evicts nothing, so the tokens are also plain
    transformers' (whose cache keeps the per-step check)."""
    model = tiny_model("qwen3", "gqa")
    ids, mask = left_padded_prompts(batch=3, length=10)
    longflow_patch.apply(model, budget=budget, compile=False)
    eos = end_tokens(model, ids, mask, step=6)
    deferred_checks.clear()

    def generate():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                              pad_token_id=0, eos_token_id=eos)  # fmt: skip

    deferred = generate()
    assert len(deferred_checks) == 1, "the patched generate's own cache did not get the deferred stop check"
    assert deferred_checks[0].stop_reported and deferred_checks[0].finish() == 1, "no extra step was undone"
    monkeypatch.setattr(compat, "DEFERRED_STOP_DEVICES", ())
    per_step = generate()
    assert len(deferred_checks) == 1
    assert deferred.shape[1] <= ids.shape[1] + 7, "the rows did not stop on their end tokens"
    assert torch.equal(deferred, per_step)
    if budget >= 512:
        longflow_patch.unapply(model)
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                               pad_token_id=0, eos_token_id=eos)  # fmt: skip
        assert torch.equal(deferred, plain)


def test_returned_and_callers_caches_keep_the_per_step_check(deferred_checks):
    """A cache the caller gets back (``return_dict_in_generate``) or passed in holds exactly the
    returned tokens: no deferred check, whose extra step an evicting cache could not roll back."""
    model = longflow_patch.apply(tiny_model("qwen3", "gqa"), budget=24, compile=False)
    ids, mask = left_padded_prompts(batch=2, length=10)
    eos = end_tokens(model, ids, mask, step=4)
    deferred_checks.clear()
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                    eos_token_id=eos)  # fmt: skip
    returned = model.generate(**settings, return_dict_in_generate=True)
    assert returned.past_key_values.made_by_generate and not returned.past_key_values._is_user_defined
    returned.past_key_values.reset()  # to be filled afresh, as a new one
    for cache in (longflow_patch.new_cache(model), returned.past_key_values):  # a new one; one handed back
        given = model.generate(**settings, **{cache_keyword(model): cache})
        assert not cache.made_by_generate and cache._is_user_defined
        assert int(cache.get_seq_length()) == given.shape[1] - 1, "the caller's cache holds a step it did not return"
        assert torch.equal(returned.sequences, given)
    assert deferred_checks == []


HOST_READS = ("__bool__", "item", "tolist", "__int__", "__index__", "__float__", "cpu", "numpy")
"""Tensor methods that bring a value to the host: on a GPU, each waits for the device."""


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_decode_step_reads_nothing_on_the_host_but_the_stop_check(monkeypatch, compiled):
    """Per step, the patched ``generate`` reads one value on the host: transformers' stop check
    (deferred on CUDA). The mask builder once read the cache's token count, its offset, every step."""
    model = longflow_patch.apply(tiny_model("qwen3", "gqa"), budget=24, compile=False)
    if compiled:
        config = CompileConfig(fullgraph=True, backend="eager", mode=None)
        config._compile_all_devices = True  # transformers compiles decode steps only on accelerators otherwise
        model.generation_config.compile_config = config
    ids, mask = left_padded_prompts(batch=3, length=10)
    stop_check = generation_utils.StopCheck.__call__.__code__
    reads, counting = Counter(), [False]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def read(tensor, *args, _original=original, _name=name, **kwargs):
            if counting[0] and not torch.compiler.is_compiling():
                caller = sys._getframe(1).f_code
                where = "stop check" if caller is stop_check else f"{_name} in {caller.co_filename}:{caller.co_name}"
                reads[where] += 1
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    def reads_of(new_tokens: int) -> Counter:
        reads.clear()
        counting[0] = True
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)  # fmt: skip
        counting[0] = False
        return Counter(reads)

    reads_of(4)  # compiles
    short, long = reads_of(4), reads_of(24)
    long.subtract(short)
    assert +long == Counter({"stop check": 20})
