"""BLOOM, OPT, GPT-J and GPT-NeoX against transformers (PyTorch CPU): logits
on a left-padded batch (float32 and bfloat16 storage), KV-cache decoding
against full recomputation, greedy generation against transformers'
`generate`, and mutation controls: deliberate errors injected into our
model that the logits comparison must catch.

Tiny random models are built by transformers, re-initialised by
`families.sensitize` (logits up to ~35, peaked attention, MLP inputs in the
non-linear range), saved with save_pretrained (safetensors) and loaded
through our loader. Measured on 2026-12-04 (AMD EPYC): max |ours -
transformers| / max |logit| is 6e-7..1.9e-6 in float32 (summation order
only); the tolerance is REL_TOL = 1e-5 of the logit scale, a margin of 5x.
Every mutation below moves the logits by more than 10x REL_TOL. Greedy
comparisons are exact: the smallest top-2 logit gap on the test batch is
~6e-2, far above float32 rounding.
"""

import copy
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from families import FAMILIES, REL_TOL, VARIANTS, VOCAB, save_tiny, tiny_models  # noqa: E402
from tiny import padded_batch  # noqa: E402

from flax_adapters.activations import ACTIVATIONS  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.generate import GenerationConfig, generate  # noqa: E402
from flax_adapters.models import bloom, gptj, init_cache, layers, model_class  # noqa: E402
from flax_adapters.models import phi3  # noqa: E402
from flax_adapters.models import gemma  # noqa: E402
from flax_adapters.models import moe  # noqa: E402


def relative_error(torch_model, pre, config=None) -> float:
    """max |ours - transformers| / max |transformers| over the valid positions
    of the padded test batch; `config` replaces the loaded one (a mutation)."""
    tokens, mask = padded_batch(VOCAB)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(tokens),
                          attention_mask=torch.tensor(mask)).logits.float().numpy()
    config = config or pre.config
    ours, _ = model_class(config)(config).apply({"params": pre.params}, jnp.asarray(tokens),
                                                jnp.asarray(mask, bool))
    valid = mask.astype(bool)
    return float(np.abs(np.asarray(ours)[valid] - ref[valid]).max() / np.abs(ref[valid]).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (torch model, our Pretrained), built once per module."""
    get = tiny_models(tmp_path_factory)
    return lambda name: get(name)[1:]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tiny, name):
    torch_model, pre = tiny(name)
    err = relative_error(torch_model, pre)
    print(f"{name}: max |ours - transformers| / max |logit| = {err:.1e}")
    assert err <= REL_TOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bfloat16_storage_matches_transformers_on_the_same_weights(tiny, tmp_path, name):
    """Loaded with dtype=bfloat16 (float32 compute), against transformers with
    the same bf16-rounded weights computing in float32: the storage is the
    only change, so the float32 tolerance holds (a weight rounded another way,
    e.g. truncated, moves the logits by ~1e-3)."""
    torch_model, _ = tiny(name)
    path = tmp_path / name
    torch_model.save_pretrained(path)
    pre = load_pretrained(path, dtype="bfloat16")
    kernels = [x for x in jax.tree_util.tree_leaves(pre.params) if x.ndim == 2]
    assert kernels and all(x.dtype == jnp.bfloat16 for x in kernels)
    rounded = copy.deepcopy(torch_model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert relative_error(rounded, pre) <= REL_TOL
    assert relative_error(torch_model, pre) > 10 * REL_TOL  # the rounding shows


def _roll_slopes(monkeypatch):
    slopes = bloom.alibi_slopes
    monkeypatch.setattr(bloom, "alibi_slopes", lambda h: np.roll(slopes(h), 1))


def _power_of_two_slopes(monkeypatch):
    slopes = bloom.alibi_slopes  # 6 heads as the first 6 of 8: no interleaved extra slopes
    monkeypatch.setattr(bloom, "alibi_slopes", lambda h: slopes(8)[:h])


def _exact_gelu_for_bloom(monkeypatch):
    monkeypatch.setattr(bloom, "bloom_gelu", ACTIVATIONS["gelu"])


def _half_split_rope_for_gptj(monkeypatch):
    monkeypatch.setattr(gptj, "apply_rope_interleaved", layers.apply_rope)


def _swap_k_and_v_of_phi3(monkeypatch):
    split = phi3.split_qkv
    monkeypatch.setattr(phi3, "split_qkv", lambda x, q, kv: tuple(split(x, q, kv)[i]
                                                                  for i in (0, 2, 1)))


def _swap_gate_and_up_of_phi3(monkeypatch):
    split = phi3.split_gate_up
    monkeypatch.setattr(phi3, "split_gate_up", lambda x: split(x)[::-1])


def _llama_norm_for_gemma(monkeypatch):  # scale * x, not (1 + scale) * x
    monkeypatch.setattr(gemma, "GemmaRMSNorm", layers.RMSNorm)


def _unscaled_gemma_embeddings(monkeypatch):
    monkeypatch.setattr(gemma, "embedding_scale", lambda d: 1.0)


def _swap_gate_and_up_of_experts(monkeypatch):  # Mixtral's w1 and w3 exchanged
    swiglu = moe.swiglu
    monkeypatch.setattr(moe, "swiglu", lambda h: swiglu(jnp.concatenate(
        jnp.split(h, 2, axis=-1)[::-1], axis=-1)))


def _softmax_after_top_k(monkeypatch):  # i.e. the top k renormalised
    def route(logits_ne, k, normalize):
        top_nk, e_nk = jax.lax.top_k(logits_ne.astype(jnp.float32), k)
        return jax.nn.softmax(top_nk, axis=-1), e_nk
    monkeypatch.setattr(moe, "route", route)


def _config(**changes):
    return lambda monkeypatch, cfg: dataclasses.replace(cfg, **changes)


def _patch(fn):
    return lambda monkeypatch, cfg: fn(monkeypatch) or cfg


# variant -> {deliberate error: how to inject it (returns the config to use)}
MUTATIONS = {
    "mixtral": {
        "top-k weights not renormalised": _config(norm_topk_prob=False),
        "top-1 routing in place of top-2": _config(num_experts_per_tok=1),
        "experts' w1 and w3 (gate and up) swapped": _patch(_swap_gate_and_up_of_experts),
        "sliding window ignored": _config(sliding_window=None),
    },
    "qwen3_moe": {
        "softmax over the top-k logits in place of the top k of the softmax":
            _patch(_softmax_after_top_k),
        "q/k norms dropped": _config(qk_norm=False),
    },
    "bloom": {
        "ALiBi slopes shifted by one head": _patch(_roll_slopes),
        "exact GELU in place of BLOOM's tanh GELU": _patch(_exact_gelu_for_bloom),
        "layer-norm epsilon left at the default 1e-5": _config(layer_norm_epsilon=1e-5),
    },
    "bloom_6heads_postln": {
        "ALiBi slopes of 6 heads taken from the 8-head sequence": _patch(_power_of_two_slopes),
        "residual taken before the layer norm": _config(
            apply_residual_connection_post_layernorm=False),
    },
    "opt": {
        "GELU in place of OPT's ReLU": _config(activation_function="gelu"),
        "layer norm after attention in place of before": _config(do_layer_norm_before=False),
    },
    "gptj": {
        "exact GELU in place of gelu_new": _config(activation_function="gelu"),
        "rope on halves in place of GPT-J's interleaved pairs": _patch(_half_split_rope_for_gptj),
        "rotary_dim 16 in place of 8": _config(rotary_dim=16),
        "layer-norm epsilon left at the default 1e-5": _config(layer_norm_epsilon=1e-5),
    },
    "gpt_neox": {
        "tanh GELU in place of exact": _config(hidden_act="gelu_new"),
        "sequential residual in place of parallel": _config(use_parallel_residual=False),
        "layer-norm epsilon left at the default 1e-5": _config(layer_norm_eps=1e-5),
    },
    "gpt_neox_sequential": {
        "rope on the whole head in place of rotary_pct 0.25": _config(rotary_ndims=16),
    },
    "phi3": {
        "k and v swapped in qkv_proj's output": _patch(_swap_k_and_v_of_phi3),
        "gate and up halves of gate_up_proj swapped": _patch(_swap_gate_and_up_of_phi3),
        "rope on the whole head in place of partial_rotary_factor 0.5": _config(
            rotary_ndims=16),
        "sliding window ignored": _config(sliding_window=None),
        "RMSNorm epsilon left at the default 1e-5": _config(rms_norm_eps=1e-5),
    },
    "gemma": {
        "LLaMA's RMSNorm (no + 1) in place of Gemma's": _patch(_llama_norm_for_gemma),
        "exact GELU in place of the tanh GELU": _config(hidden_activation="gelu"),
        "RMSNorm epsilon left at the default 1e-6": _config(rms_norm_eps=1e-6),
    },
    "gemma2": {
        "LLaMA's RMSNorm (no + 1) in place of Gemma's": _patch(_llama_norm_for_gemma),
        "embeddings not scaled by sqrt(hidden_size)": _patch(_unscaled_gemma_embeddings),
        "attention soft-capping ignored": _config(attn_logit_softcapping=None),
        "final logit soft-capping ignored": _config(final_logit_softcapping=None),
        "every layer full attention (no window alternation)": _config(
            layer_types=(gemma.FULL, gemma.FULL)),
        "query_pre_attn_scalar ignored (head_dim^-1/2)": _config(query_pre_attn_scalar=16.0),
        "LLaMA's layer (no sandwich norms)": _config(sandwich_norms=False),
    },
    "gemma3": {
        "q_norm and k_norm skipped": _config(qk_norm=False),
        "sliding layer with the global rope base": lambda monkeypatch, cfg: dataclasses.replace(
            cfg, rope_local_theta=cfg.rope_theta),
        "full layer's linear rope scaling ignored": _config(rope_scaling=None),
        "every layer sliding (no window alternation)": _config(
            layer_types=(gemma.SLIDING, gemma.SLIDING)),
        "embeddings not scaled by sqrt(hidden_size)": _patch(_unscaled_gemma_embeddings),
    },
}


@pytest.mark.parametrize("name, mutation", [(n, m) for n in MUTATIONS for m in MUTATIONS[n]])
def test_a_deliberate_error_fails_the_logits_comparison(tiny, monkeypatch, name, mutation):
    torch_model, pre = tiny(name)
    config = MUTATIONS[name][mutation](monkeypatch, pre.config)
    err = relative_error(torch_model, pre, config)
    print(f"{name}, {mutation}: {err:.1e}")
    assert err > 10 * REL_TOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cache_prefill_then_decode_equals_full(tiny, name):
    _, pre = tiny(name)
    tokens, mask = padded_batch(VOCAB)
    model = model_class(pre.config)(pre.config)
    apply = jax.jit(model.apply)
    full, _ = apply({"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    cache = init_cache(pre.config, 3, 16)
    first, cache = apply({"params": pre.params}, jnp.asarray(tokens[:, :8]),
                         jnp.asarray(mask[:, :8], bool), cache=cache)
    pieces = [first]
    for t in range(8, 12):
        step, cache = apply({"params": pre.params}, jnp.asarray(tokens[:, t:t + 1]),
                            jnp.asarray(mask[:, t:t + 1], bool), cache=cache)
        pieces.append(step)
    stepped = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    valid = mask.astype(bool)
    # Same float32 operations over a longer (masked) key axis.
    np.testing.assert_allclose(stepped[valid], np.asarray(full)[valid], rtol=0,
                               atol=REL_TOL * np.abs(np.asarray(full)[valid]).max())


PROMPTS = [[5, 17, 99, 3, 42], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_transformers_generate(tiny, name):
    torch_model, pre = tiny(name)
    model = model_class(pre.config)(pre.config)
    width, pad, n_new = max(map(len, PROMPTS)), 0, 10
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        seqs = torch_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=n_new, min_new_tokens=n_new,
                                    eos_token_id=None, pad_token_id=pad)
    ours = generate(model, pre.params, PROMPTS, GenerationConfig(
        max_new_tokens=n_new, eos_token_ids=(), pad_token_id=pad))
    np.testing.assert_array_equal(ours, seqs[:, width:].numpy())


def test_opt_generation_past_its_learned_positions_is_refused(tiny):
    _, pre = tiny("opt")  # max_position_embeddings=64
    model = model_class(pre.config)(pre.config)
    prompt = [[5] * 60]
    fits = generate(model, pre.params, prompt, GenerationConfig(max_new_tokens=5,
                                                                eos_token_ids=()))
    assert fits.shape == (1, 5)  # feeds positions 0..63: the last one there is
    with pytest.raises(ValueError, match="need 65 positions, but the model has 64"):
        generate(model, pre.params, prompt, GenerationConfig(max_new_tokens=6, eos_token_ids=()))


@pytest.mark.parametrize("name, rename", [
    # bigscience's BLOOM checkpoints are saved from the bare BloomModel: no "transformer.".
    ("bloom", lambda k: k.removeprefix("transformer.")),
    # OPT checkpoints saved from OPTModel: "decoder.layers..." without "model.".
    ("opt", lambda k: k.removeprefix("model.")),
    # GPT-NeoX's head: "embed_out" as published (transformers 5 also saves that name),
    # "lm_head" as transformers' module calls it.
    ("gpt_neox", lambda k: {"embed_out.weight": "lm_head.weight",
                            "lm_head.weight": "embed_out.weight"}.get(k, k)),
])
def test_published_checkpoint_spellings_load(tmp_path, name, rename):
    import shutil

    from safetensors.numpy import load_file, save_file

    save_tiny(tmp_path / "saved", name)
    pre = load_pretrained(tmp_path / "saved")
    (tmp_path / "renamed").mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", tmp_path / "renamed" / "config.json")
    tensors = load_file(tmp_path / "saved" / "model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()},
              tmp_path / "renamed" / "model.safetensors")
    assert set(map(rename, tensors)) != set(tensors)
    again = load_pretrained(tmp_path / "renamed")
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, pre.params)


def test_unknown_tensor_is_named(tiny, tmp_path):
    from safetensors.numpy import save_file

    _, pre = tiny("gptj")
    # one layer, as the file holds (a layer count the weights lack is refused first)
    (tmp_path / "config.json").write_text(__import__("json").dumps({**pre.hf_config, "n_layer": 1}))
    save_file({"transformer.h.0.attn.q_proj.weight": np.zeros((64, 64), np.float32),
               "transformer.h.0.attn.qkv_proj.weight": np.zeros((64, 64), np.float32)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.0.attn.qkv_proj"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_at_selected_positions(tiny, name):
    """`logits_at_ba` (the train step's loss window) gives the full logits'
    rows at those positions: the head is per position."""
    _, pre = tiny(name)
    tokens, mask = padded_batch(VOCAB)
    model = model_class(pre.config)(pre.config)
    full, _ = model.apply({"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    at = jnp.asarray([[0, 5, 11], [4, 4, 7], [9, 10, 11]])
    picked, _ = model.apply({"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool),
                            logits_at_ba=at)
    want = np.take_along_axis(np.asarray(full), np.asarray(at)[..., None], axis=1)
    np.testing.assert_allclose(picked, want, atol=1e-6)
