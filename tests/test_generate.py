"""KV-cache decoding: cache == full recomputation, EOS and padding, sampling,
bucketing without recompilation, and greedy parity with transformers.

Models are tiny and random. Greedy comparisons are exact (token for token):
the top-2 logit gaps of these models (~1e-2) are far above float32 rounding
differences (~1e-6), so an argmax cannot flip between implementations.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_adapters.generate import (GenerationConfig, filter_top_p, generate, num_compilations,
                                    sample_logits)
from flax_adapters.models import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
PROMPTS = [[5, 17, 99, 3, 42], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


@pytest.fixture(scope="module")
def tiny():
    model = LlamaForCausalLM(CFG)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return model, params


def greedy_without_cache(model, params, prompts, n_new):
    """Oracle: recompute the whole left-padded sequence for every new token.

    One fixed-width buffer (prompt columns, then n_new columns filled as we
    go) keeps a single compiled shape; causality makes the unfilled columns
    to the right irrelevant to the logits we read.
    """
    width = max(map(len, prompts))
    seqs = np.zeros((len(prompts), width + n_new), np.int32)
    valid = np.zeros(seqs.shape, bool)
    for row, p in enumerate(prompts):
        seqs[row, width - len(p):width], valid[row, width - len(p):] = p, True
    forward = jax.jit(lambda p, s, v: model.apply({"params": p}, s, v)[0])
    for step in range(n_new):
        logits = forward(params, seqs, valid)[:, width - 1 + step]
        seqs[:, width + step] = np.asarray(jnp.argmax(logits, axis=-1))
    return seqs[:, width:]


def test_cache_decoding_equals_full_recomputation(tiny):
    model, params = tiny
    gen_cfg = GenerationConfig(max_new_tokens=8, eos_token_ids=())
    ours = generate(model, params, PROMPTS, gen_cfg)
    np.testing.assert_array_equal(ours, greedy_without_cache(model, params, PROMPTS, 8))


def test_eos_stops_rows_and_pads_after(tiny):
    model, params = tiny
    free = generate(model, params, PROMPTS, GenerationConfig(max_new_tokens=8, eos_token_ids=()))
    eos = int(free[0, 2])  # row 0 emits it at step 2 (if not earlier)
    pad = next(t for t in range(CFG.vocab_size) if t != eos)
    stopped = generate(model, params, PROMPTS, GenerationConfig(
        max_new_tokens=8, eos_token_ids=(eos,), pad_token_id=pad))
    for row_free, row in zip(free, stopped):
        hits = np.flatnonzero(row_free == eos)
        end = hits[0] + 1 if hits.size else len(row)  # the EOS itself is kept
        np.testing.assert_array_equal(row[:end], row_free[:end])
        assert (row[end:] == pad).all()
    # Every token an EOS: one step, then only padding.
    one = generate(model, params, PROMPTS, GenerationConfig(
        max_new_tokens=5, eos_token_ids=tuple(range(CFG.vocab_size)), pad_token_id=0))
    np.testing.assert_array_equal(one[:, 0], free[:, 0])
    assert (one[:, 1:] == 0).all()


def test_sampling_top_k_1_is_greedy_and_reproducible(tiny):
    model, params = tiny
    greedy = generate(model, params, PROMPTS, GenerationConfig(max_new_tokens=6, eos_token_ids=()))
    top1 = generate(model, params, PROMPTS, GenerationConfig(
        max_new_tokens=6, temperature=1.0, top_k=1, eos_token_ids=()), key=jax.random.key(3))
    np.testing.assert_array_equal(top1, greedy)

    sampled = GenerationConfig(max_new_tokens=6, temperature=1.5, top_p=0.95, eos_token_ids=())
    a = generate(model, params, PROMPTS, sampled, key=jax.random.key(1))
    b = generate(model, params, PROMPTS, sampled, key=jax.random.key(1))
    c = generate(model, params, PROMPTS, sampled, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # A row's samples do not depend on the batch (bucket) it is decoded in.
    np.testing.assert_array_equal(
        generate(model, params, PROMPTS[:1], sampled, key=jax.random.key(1)), a[:1])


def test_top_p_and_top_k_filters():
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda p: np.isfinite(np.asarray(filter_top_p(logits, p)))[0]  # noqa: E731
    np.testing.assert_array_equal(kept(0.4), [False, True, False, False])  # top-1 always kept
    np.testing.assert_array_equal(kept(0.75), [False, True, False, True])  # 0.5 + 0.3 >= 0.75
    np.testing.assert_array_equal(kept(0.9), [True, True, False, True])
    np.testing.assert_array_equal(kept(1.0), [True, True, True, True])
    np.testing.assert_allclose(np.asarray(filter_top_p(logits, 0.75))[0, [1, 3]],
                               np.log(probs[[1, 3]]), rtol=1e-6)

    keys = jax.random.split(jax.random.key(0), 512)
    many = jnp.repeat(logits, 512, axis=0)
    draws = lambda **kw: set(np.asarray(sample_logits(many, keys, 1.0, **kw)).tolist())  # noqa: E731
    assert draws(top_k=2) == {1, 3}
    assert draws(top_p=0.75) == {1, 3}
    assert draws(top_k=3, top_p=0.6) == {1, 3}  # nucleus taken within the top 3
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=1) == {1}


def test_same_bucket_does_not_recompile(tiny):
    model, params = tiny
    gen_cfg = GenerationConfig(max_new_tokens=4, eos_token_ids=())
    before = num_compilations()
    generate(model, params, [[1, 2, 3], [4] * 9, [5] * 2], gen_cfg)  # prompt 16, batch 4
    first = num_compilations()
    generate(model, params, [[6] * 14, [7], [8, 9], [1, 2, 3, 4]], gen_cfg)  # same buckets
    assert first - before <= 1  # 0 if an earlier test compiled this bucket
    assert num_compilations() == first


def test_greedy_equals_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax_adapters.checkpoints.hf import hf_state_to_params

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    torch_model.save_pretrained(tmp_path)
    cfg = LlamaConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    params = hf_state_to_params(cfg, {k: v.numpy() for k, v in torch_model.state_dict().items()})
    model = LlamaForCausalLM(cfg)

    width, pad = max(map(len, PROMPTS)), 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])

    def reference(n_new, eos):
        with torch.no_grad():
            seqs = torch_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                        max_new_tokens=n_new, min_new_tokens=0,
                                        eos_token_id=eos, pad_token_id=pad)
        ref = seqs[:, width:].numpy()
        # transformers stops when every row is done; the rest is padding.
        return np.pad(ref, ((0, 0), (0, n_new - ref.shape[1])), constant_values=pad)

    ours = generate(model, params, PROMPTS, GenerationConfig(max_new_tokens=10, eos_token_ids=(),
                                                             pad_token_id=pad))
    np.testing.assert_array_equal(ours, reference(10, None))
    eos = int(ours[1, 3])  # an EOS that some row meets mid-way
    ours_eos = generate(model, params, PROMPTS, GenerationConfig(
        max_new_tokens=10, eos_token_ids=(eos,), pad_token_id=pad))
    np.testing.assert_array_equal(ours_eos, reference(10, eos))
