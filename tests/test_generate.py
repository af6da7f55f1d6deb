"""KV-cache decoding: cache == full recomputation, EOS and padding, sampling,
bucketing without recompilation, and greedy parity with transformers.
Sampling (temperature, top-k, top-p) is checked against transformers' own
logits processors, both the filtered logits and the sampled frequencies.

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
                                    sample_logits, warp_logits)
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


# --- sampling against transformers' logits processors ---------------------

def hf_warp(logits, temperature, top_k, top_p):
    """transformers' processed scores: the warpers `generate(do_sample=True)`
    appends in `_get_logits_processor` (temperature, then top-k, then top-p),
    each only when it is on, with min_tokens_to_keep=1."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    procs = []
    if temperature != 1.0:
        procs.append(tf.TemperatureLogitsWarper(float(temperature)))
    if top_k:
        procs.append(tf.TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(tf.TopPLogitsWarper(top_p))
    scores = tf.LogitsProcessorList(procs)(None, torch.tensor(logits))
    return scores.numpy(), scores.softmax(-1).numpy()


def warp_mismatch(ours, ref, ref_probs, logits, temperature, top_p):
    """Why processed logits `ours` differ from transformers' `ref`, or None.

    The kept tokens must be the same, except that among tokens tied with the
    smallest kept value of a nucleus either side may pick any (transformers'
    pick there follows torch.sort's unspecified order of equal values: only
    how many it keeps is defined); probabilities within 1e-6 (float32
    softmax rounding is ~1e-7)."""
    kept, kept_ref = np.isfinite(ours), np.isfinite(ref)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(ours), axis=-1))
    scaled = logits / np.float32(temperature)
    edge = np.where(kept_ref, ref, np.inf).min(-1, keepdims=True)
    free = (scaled != edge) if top_p < 1 else np.ones_like(kept)
    if (kept.sum(-1) != kept_ref.sum(-1)).any():
        return f"kept counts differ in rows {np.flatnonzero(kept.sum(-1) != kept_ref.sum(-1))}"
    if (kept != kept_ref)[free].any():
        return f"kept sets differ in rows {np.flatnonzero(((kept != kept_ref) & free).any(-1))}"
    err = max(np.abs(probs - ref_probs)[free].max(),
              np.abs(np.sort(probs, -1) - np.sort(ref_probs, -1)).max())
    return f"probabilities differ by {err:.2e}" if err > 1e-6 else None


def sampling_logits(temperature):
    """Rows of 40 logits: Gaussian (two -inf: a masked vocabulary); rounded to
    0.5 (ties at every top-k and nucleus edge); and a row of dyadic
    probabilities 1/2, 1/4, 1/8, 1/16, 1/16 (the rest -inf), exact in float32,
    so top_p 0.5, 0.75, 0.875 lie exactly on a cumulative boundary. At
    temperatures that divide exactly (powers of two) also near-ties: the
    rounded rows + 16, moved up by 1-2 ulps at random. Elsewhere XLA's float32
    division on CPU is not correctly rounded (3.0000002 / 0.3 gives
    10.000001, torch 10.0), which can merge or split near-ties and so move a
    top-k edge by one token: a 1-ulp difference, not a sampling bug."""
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal((48, 40)).astype(np.float32) * 2
    gauss[:4, -2:] = -np.inf
    ties = (np.round(gauss * 2) / 2).astype(np.float32)
    dyadic = np.full((1, 40), -np.inf, np.float32)
    dyadic[0, rng.choice(40, 5, replace=False)] = np.log([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 16])
    rows = [gauss, ties, dyadic]  # the dyadic row is DYADIC_ROW
    if np.log2(temperature) % 1 == 0:
        near = ties + np.float32(16)  # away from 0: XLA flushes denormals to zero
        for _ in range(2):
            moved = (rng.random(near.shape) < 0.3) & np.isfinite(near)
            near[moved] = np.nextafter(near[moved], np.float32(np.inf))
        rows.append(near)
    return np.concatenate(rows)


DYADIC_ROW = 96

# (temperature, top_k, top_p): top_p 1e-6 (~0, top-1 only), 1.0 (off) and on
# the dyadic row's boundaries; top_k 1, = vocab and > vocab.
WARP_CASES = [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 10, 0.8), (0.5, 0, 1e-6), (1.0, 1000, 0.95),
              (2.0, 3, 0.5), (0.8, 40, 0.6), (1.0, 1, 1.0), (0.3, 7, 0.99), (1.0, 0, 0.75),
              (1.0, 0, 0.875), (1.0, 0, 0.5), (0.5, 0, 0.75)]


@pytest.mark.parametrize("temperature, top_k, top_p", WARP_CASES)
def test_warp_logits_equals_transformers_warpers(temperature, top_k, top_p):
    """`warp_logits` (what `sample_logits` draws from) against transformers'
    TemperatureLogitsWarper / TopKLogitsWarper / TopPLogitsWarper applied in
    generate's order: same kept tokens (ties: see warp_mismatch), probabilities
    to 1e-6."""
    logits = sampling_logits(temperature)
    if temperature == 0.5 and top_p == 0.75:
        logits = logits * np.float32(0.5)  # dividing by 0.5 is exact: dyadic again
    ref, ref_probs = hf_warp(logits, temperature, top_k, top_p)
    ours = np.asarray(warp_logits(jnp.asarray(logits), temperature, top_k, top_p))
    assert warp_mismatch(ours, ref, ref_probs, logits, temperature, top_p) is None
    if top_k == 0 and top_p in (0.5, 0.75, 0.875):  # dyadic: exactly the 1, 2 or 3 largest
        assert np.isfinite(ours[DYADIC_ROW]).sum() == {0.5: 1, 0.75: 2, 0.875: 3}[top_p]


def _exact_k(x, k):
    """Top-k keeping exactly k tokens (lax.top_k's, ties by index): this
    library's filter before issue 18, which dropped tokens tied with the k-th."""
    vals, idx = jax.lax.top_k(x, min(k, x.shape[-1]))
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.full_like(x, -jnp.inf).at[rows, idx].set(vals)


def _nucleus_variant(x, top_p, keep):
    """A top-p filter whose rule `keep(mass_before, p, top_p)` may be wrong."""
    vals, idx = jax.lax.top_k(x, x.shape[-1])
    p = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p
    vals = jnp.where(keep(before, p, top_p) | (before == 0), vals, -jnp.inf)
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.full_like(x, -jnp.inf).at[rows, idx].set(vals)


def too_few(x, top_p):  # drops the token that crosses top_p
    return _nucleus_variant(x, top_p, lambda before, p, tp: before + p < tp)


def too_many(x, top_p):  # keeps one past a nucleus that reached top_p exactly
    return _nucleus_variant(x, top_p, lambda before, p, tp: before <= tp)


def test_the_transformers_comparison_fails_wrong_filters():
    """Mutation controls for warp_mismatch: on inputs where `warp_logits`
    passes, each wrong filter must be reported."""
    wrong = {
        (0.7, 5, 1.0): lambda x: _exact_k(x / 0.7, 5),  # ties at the k-th dropped
        (1.3, 10, 0.8): lambda x: too_few(warp_logits(x, 1.3, 10), 0.8),
        (1.0, 0, 0.75): lambda x: too_many(x, 0.75),  # only the dyadic row differs
        (0.7, 0, 0.8): lambda x: filter_top_p(x, 0.8) / 0.7,  # temperature after top-p
    }
    for (t, k, p), mutant in wrong.items():
        logits = sampling_logits(t)
        ref, ref_probs = hf_warp(logits, t, k, p)
        x = jnp.asarray(logits)
        assert warp_mismatch(np.asarray(warp_logits(x, t, k, p)), ref, ref_probs, logits, t,
                             p) is None
        assert warp_mismatch(np.asarray(mutant(x)), ref, ref_probs, logits, t, p) is not None, \
            (t, k, p)


def frequencies_fit(draws, probs):
    """Whether integer draws fit the distribution `probs`: no draw outside its
    support, and a chi-square goodness-of-fit p-value above 1e-3."""
    from scipy.stats import chisquare

    counts = np.bincount(draws, minlength=probs.size)
    support = probs > 0
    if counts[~support].any():
        return False
    expected = probs[support].astype(np.float64)
    pvalue = chisquare(counts[support], expected / expected.sum() * counts.sum()).pvalue
    return pvalue > 1e-3


@pytest.mark.parametrize("case", ["nucleus", "top_k_tie"])
def test_sampled_frequencies_match_transformers(case):
    """20000 draws of `sample_logits` (generate's per-step sampler) from one row
    of logits, against transformers' processed probabilities: chi-square
    p > 1e-3 (seed fixed, so the run is deterministic). Mutation controls on
    the same draws' keys: temperature after top-p, a nucleus that drops the
    token crossing top_p (8.6% of the mass here), a top-k that drops a token
    tied with the k-th -- each must fail the same check."""
    base = np.array([2.0, 1.6, 1.5, 1.0, 0.8, 0.5, 0.3, 0.0, -0.5, -1.0, -1.5, -2.0], np.float32)
    if case == "nucleus":
        temperature, top_k, top_p = 0.7, 0, 0.8  # keeps 4 tempered, 5 untempered
        logits = base
    else:
        temperature, top_k, top_p = 1.5, 4, 1.0
        logits = base.copy()
        logits[4] = logits[3]  # the 4th and 5th largest tie: transformers keeps 5
    perm = np.random.default_rng(1).permutation(logits.size)  # order in the vocab is not rank
    logits = logits[perm][None]
    _, ref_probs = hf_warp(logits, temperature, top_k, top_p)
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    many = jnp.repeat(jnp.asarray(logits), n, axis=0)
    ours = np.asarray(sample_logits(many, keys, temperature, top_k, top_p))
    assert frequencies_fit(ours, ref_probs[0])

    x = many / temperature
    if case == "nucleus":
        mutants = [filter_top_p(many, top_p) / temperature, too_few(x, top_p)]
    else:
        mutants = [_exact_k(x, top_k)]
    for mutant in mutants:
        draws = np.asarray(jax.vmap(jax.random.categorical)(keys, mutant))
        assert not frequencies_fit(draws, ref_probs[0])


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
