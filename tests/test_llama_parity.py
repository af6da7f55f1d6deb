"""Logits parity of our LLaMA-family model against transformers (PyTorch CPU).

Tiny random models are built with transformers, saved with save_pretrained
(safetensors) and loaded through our loader. Tolerance 1e-4 in float32: both
sides compute the same operations in float32; differences come from
summation order only (observed ~1e-6).
"""

import numpy as np
from tiny import padded_batch as tiny_padded_batch
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.models import LlamaForCausalLM, init_cache  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=256)

VARIANTS = {
    "llama_mha": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama3_rope": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_tied": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama_bias": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "qwen2": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": (transformers.MistralConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=5)),
}


def save_tiny(tmp_path, name):
    config_cls, extra = VARIANTS[name]
    torch.manual_seed(0)
    hf_cfg = config_cls(**TINY, **extra)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # random biases/norms, so no parameter is a trivial 0 or 1
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / name)
    return model



def padded_batch():
    return tiny_padded_batch(TINY["vocab_size"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    torch_model = save_tiny(tmp_path, name)
    pre = load_pretrained(tmp_path / name)
    tokens, mask = padded_batch()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(tokens),
                          attention_mask=torch.tensor(mask)).logits.numpy()
    model = LlamaForCausalLM(pre.config)
    ours, _ = model.apply({"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(ours)[valid] - ref[valid]).max()
    assert diff <= 1e-4, f"{name}: max abs logit difference {diff}"


def test_cache_prefill_then_decode_equals_full(tmp_path):
    save_tiny(tmp_path, "llama_gqa")
    pre = load_pretrained(tmp_path / "llama_gqa")
    tokens, mask = padded_batch()
    model = LlamaForCausalLM(pre.config)
    full, _ = model.apply({"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    cache = init_cache(pre.config, 3, 16)
    first, cache = model.apply({"params": pre.params}, jnp.asarray(tokens[:, :8]),
                               jnp.asarray(mask[:, :8], bool), cache=cache)
    pieces = [first]
    for t in range(8, 12):
        step, cache = model.apply({"params": pre.params}, jnp.asarray(tokens[:, t:t + 1]),
                                  jnp.asarray(mask[:, t:t + 1], bool), cache=cache)
        pieces.append(step)
    stepped = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(stepped[valid], np.asarray(full)[valid], atol=1e-5)


def test_bfloat16_storage_is_close(tmp_path):
    torch_model = save_tiny(tmp_path, "llama_gqa")
    pre = load_pretrained(tmp_path / "llama_gqa", dtype="bfloat16")
    assert pre.params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    tokens, mask = padded_batch()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(tokens),
                          attention_mask=torch.tensor(mask)).logits.numpy()
    ours, _ = LlamaForCausalLM(pre.config).apply({"params": pre.params}, jnp.asarray(tokens),
                                                 jnp.asarray(mask, bool))
    valid = mask.astype(bool)
    # bf16 weights (8-bit mantissa) with float32 compute: ~1e-2 relative error.
    assert np.abs(np.asarray(ours)[valid] - ref[valid]).max() < 5e-2
