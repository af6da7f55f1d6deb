"""Logits parity of our LLaMA-family model against transformers (PyTorch CPU),
in float32 and with bfloat16 storage, and mutation controls: deliberate
errors injected into our model that the comparison must catch.

Tiny random models are built with transformers, re-initialised by
`families.sensitize` (logits spanning tens, peaked attention, MLP inputs in
the non-linear range; an RMSNorm epsilon of 1e-3, not the default), saved
with save_pretrained (safetensors) and loaded through our loader. Measured
on 2026-12-04 (AMD EPYC): max |ours - transformers| / max |logit| is
6e-7..1.8e-6 in float32 (summation order only); the tolerance is REL_TOL = 1e-5
of the logit scale. Every mutation moves the logits by more than 10x that.
"""

import copy
import dataclasses

import numpy as np
from families import REL_TOL, sensitize
from tiny import padded_batch as tiny_padded_batch
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.models import LlamaForCausalLM, init_cache, layers, llama  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=256, rms_norm_eps=1e-3)

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
    # head_dim 32 != hidden / heads: q_proj is (64 -> 128), o_proj (128 -> 64).
    "qwen3": (transformers.Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=32)),
    # Every layer windowed: max_window_layers 0 (Qwen3's window starts at that layer).
    "qwen3_sliding": (transformers.Qwen3Config, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, use_sliding_window=True,
        sliding_window=5, max_window_layers=0)),
}


def save_tiny(tmp_path, name):
    config_cls, extra = VARIANTS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**TINY, **extra)).eval()
    sensitize(model)
    model.save_pretrained(tmp_path / name)
    return model


def relative_error(torch_model, pre, config=None) -> float:
    """max |ours - transformers| / max |transformers| over the valid positions
    of the padded test batch; `config` replaces the loaded one (a mutation)."""
    tokens, mask = padded_batch()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(tokens),
                          attention_mask=torch.tensor(mask)).logits.numpy()
    ours, _ = LlamaForCausalLM(config or pre.config).apply(
        {"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    valid = mask.astype(bool)
    return float(np.abs(np.asarray(ours)[valid] - ref[valid]).max() / np.abs(ref[valid]).max())


def padded_batch():
    return tiny_padded_batch(TINY["vocab_size"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    torch_model = save_tiny(tmp_path, name)
    err = relative_error(torch_model, load_pretrained(tmp_path / name))
    print(f"{name}: max |ours - transformers| / max |logit| = {err:.1e}")
    assert err <= REL_TOL


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
    np.testing.assert_allclose(stepped[valid], np.asarray(full)[valid], rtol=0,
                               atol=REL_TOL * np.abs(np.asarray(full)[valid]).max())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bfloat16_storage_matches_transformers_on_the_same_weights(tmp_path, name):
    """Loaded with dtype=bfloat16 (float32 compute), against transformers with
    the same bf16-rounded weights computing in float32: the storage is the
    only change, so the float32 tolerance holds."""
    torch_model = save_tiny(tmp_path, name)
    pre = load_pretrained(tmp_path / name, dtype="bfloat16")
    assert pre.params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    rounded = copy.deepcopy(torch_model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert relative_error(rounded, pre) <= REL_TOL
    assert relative_error(torch_model, pre) > 10 * REL_TOL  # the rounding shows


def _interleaved_rope(monkeypatch, cfg):
    monkeypatch.setattr(llama, "apply_rope", layers.apply_rope_interleaved)
    return cfg


def _kv_head_of_query_head_modulo(monkeypatch, cfg):
    """Query head h reads kv head h % k (repeat_kv's order is h // g)."""
    attend = llama.attend

    def wrong(mdl, q_btkgn, *args, **kwargs):
        b, t, k, g, n = q_btkgn.shape
        swap = lambda x, a, c: x.reshape(b, t, a, c, n).swapaxes(2, 3)  # noqa: E731
        out, cache = attend(mdl, swap(q_btkgn, g, k), *args, **kwargs)
        return swap(out, k, g), cache
    monkeypatch.setattr(llama, "attend", wrong)
    return cfg


def _qk_norm_after_rope(monkeypatch, cfg):
    monkeypatch.setattr(llama, "rope_heads",
                        lambda norm, x, positions, inv_freq: norm(layers.apply_rope(
                            x, positions, inv_freq)))
    return cfg


def _config(**changes):
    return lambda monkeypatch, cfg: dataclasses.replace(cfg, **changes)


MUTATIONS = {  # variant -> {deliberate error: inject(monkeypatch, config) -> config}
    "llama_gqa": {
        "rope on interleaved pairs in place of halves": _interleaved_rope,
        "query head h on kv head h % k": _kv_head_of_query_head_modulo,
        "RMSNorm epsilon left at the default 1e-6": _config(rms_norm_eps=1e-6),
        "rope theta 1e4 read as 1e5": _config(rope_theta=1e5),
    },
    "llama3_rope": {"llama3 rope scaling ignored": _config(rope_scaling=None)},
    "mistral": {"sliding window ignored": _config(sliding_window=None)},
    "qwen2": {"q/k/v bias dropped": _config(attention_bias=False)},
    "qwen3": {"q/k norm dropped": _config(qk_norm=False),
              "q/k norm after rope": _qk_norm_after_rope},
    "qwen3_sliding": {"sliding window ignored": _config(sliding_window=None)},
}


@pytest.mark.parametrize("name, mutation", [(n, m) for n in MUTATIONS for m in MUTATIONS[n]])
def test_a_deliberate_error_fails_the_logits_comparison(tmp_path, monkeypatch, name, mutation):
    torch_model = save_tiny(tmp_path, name)
    pre = load_pretrained(tmp_path / name)
    err = relative_error(torch_model, pre, MUTATIONS[name][mutation](monkeypatch, pre.config))
    print(f"{name}, {mutation}: {err:.1e}")
    assert err > 10 * REL_TOL
