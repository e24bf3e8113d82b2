"""``longflow_hf``: lm-eval's ``hf`` model, generating with `longflow_patch.apply`'s compressed cache.

    lm_eval --model longflow_hf \\
        --model_args pretrained=PATH_OR_NAME,policy=longflow,budget=2048 \\
        --tasks longflow_reasoning --include_path TASKS_DIR --apply_chat_template

Every ``hf`` model argument means the same here. Added arguments: ``policy`` (any name in
`longflow_patch.POLICIES`; default ``longflow``) with its settings (``budget``, ``sink_tokens``,
``recent_window``, ``per_head``, ``observation_window``, ``pooling_kernel`` and policy-specific ones
such as ``buffer``), ``compile`` (see `longflow_patch.apply`), and ``max_gen_toks``: the default
generation length when a task sets none, 32768 (``hf`` has 256, too short for reasoning models).

Generation (``generate_until``) decodes with the fixed-budget cache. As with ``hf``, the prompt
is cut to ``max_length - max_gen_toks`` tokens (``max_length``: the model's context window unless
given); lower ``max_gen_toks`` (``--gen_kwargs``) or set ``max_length`` for models with a shorter
window. Loglikelihood requests run one full forward with no cache at all, as ``hf`` scores them.

``batch_size=auto``: ``hf`` sizes batches by running full-context forwards, which says nothing
about generation with a fixed-budget cache. For generation this model instead probes with the
work a batch really does: the longest prompt of the requests, followed by a few decode steps on
the cache that generation will allocate (``budget`` slots; for the ``full`` policy, prompt +
``max_gen_toks``), halving on out-of-memory from ``max_batch_size`` (default 64). Loglikelihood
keeps ``hf``'s probe. A fixed ``batch_size=N`` always overrides the probe.
"""

import dataclasses
import inspect
import logging

import torch
from accelerate import find_executable_batch_size
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.models.utils_hf import clear_torch_cache
from transformers import StoppingCriteria, StoppingCriteriaList

import longflow_patch
from longflow_patch.eval.policy_options import as_bool, policy_options, reject_mistyped_settings, setting_names

DEFAULT_MAX_GEN_TOKS = 32768
PROBE_STEPS = 4  # decode steps per batch-size probe: the cache is allocated whole at the prompt

logger = logging.getLogger(__name__)


@register_model("longflow_hf")
class LongFlowLM(HFLM):
    """`HFLM` whose model is patched by `longflow_patch.apply` once loaded."""

    def __init__(
        self,
        pretrained: str,
        policy: str = "longflow",
        budget: int = 2048,
        compile: bool = False,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        **kwargs,
    ) -> None:
        if not isinstance(pretrained, str):
            raise TypeError(
                "longflow_hf loads the model itself: pass `pretrained` as a name or path (a ready model "
                "object would turn off distributed evaluation). For a model object, call "
                "longflow_patch.apply on it and wrap it in lm_eval's HFLM."
            )
        settings = {name: kwargs.pop(name) for name in setting_names() & kwargs.keys()}
        options = policy_options(str(policy), {"budget": budget, **settings})
        reject_mistyped_settings(str(policy), kwargs.keys() - inspect.signature(HFLM.__init__).parameters.keys())
        compile = as_bool(compile, "compile")
        self._max_gen_toks = int(max_gen_toks)
        super().__init__(pretrained=pretrained, **kwargs)
        longflow_patch.apply(self.model, policy=str(policy), compile=compile, **options)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def get_model_info(self) -> dict:
        policy = self.model._longflow_policy
        return super().get_model_info() | {"longflow": {"policy": policy.name, **dataclasses.asdict(policy)}}

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits of one full forward with no KV cache (loglikelihood scoring)."""
        if attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(inps, use_cache=False).logits

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        if self.batch_size != "auto" or not requests:
            return super().generate_until(requests, disable_tqdm)
        self.batch_size_per_gpu = self.generation_batch_size(requests)
        try:
            return super().generate_until(requests, disable_tqdm)
        finally:
            self.batch_size_per_gpu = "auto"

    def generation_batch_size(self, requests: list) -> int:
        """The largest batch (up to ``max_batch_size``) that generates ``requests`` without running
        out of memory: prefill of the longest prompt, then `PROBE_STEPS` decode steps."""
        prompt_length = min(max(len(self.tok_encode(request.args[0])) for request in requests), self.max_length)
        new_tokens = max(
            normalize_gen_kwargs(request.args[1], self.max_gen_toks)["max_gen_toks"] for request in requests
        )
        steps = min(PROBE_STEPS, new_tokens)

        @find_executable_batch_size(starting_batch_size=self.max_batch_size)
        def probe(batch_size: int) -> int:
            prompt = torch.ones((batch_size, prompt_length), dtype=torch.long, device=self.device)
            self.model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,  # sizes the cache as the real call will
                min_new_tokens=steps,
                stopping_criteria=StoppingCriteriaList([_StopAfter(prompt_length + steps)]),
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            return batch_size

        try:
            batch_size = probe()
        except RuntimeError as error:
            if "No executable batch size found" not in str(error):
                raise
            batch_size = 1
        if self.world_size > 1:  # every rank must use the same size: the smallest
            sizes = self.all_gather(torch.tensor([batch_size], device=self.device))
            batch_size = int(sizes.min())
        clear_torch_cache()
        logger.info("generation batch size: %d (probed with %d-token prompts)", batch_size, prompt_length)
        return batch_size


class _StopAfter(StoppingCriteria):
    """Stops every sequence once it is ``length`` tokens long."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, device=input_ids.device)
