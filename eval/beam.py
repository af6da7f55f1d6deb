"""Beam search with the model's KV cache, one jitted function per shape bucket.

LLM-Adapters reports 4-beam results (`num_beams=4` in its evaluate.py; its
temperature/top-p/top-k settings are inert because it does not sample). This
reproduces transformers' `GenerationMixin._beam_search` (v4.50+ vectorised
version) with its defaults, `length_penalty=1.0`, `early_stopping=False`:

- Per step, every beam's log-softmax is added to its running score and the
  best K = max(2, 1 + n_eos) * num_beams of the num_beams * vocab
  continuations are kept; the first beam starts at 0 and the others at -1e9,
  so step one expands a single beam.
- Candidates among the top num_beams that end in EOS (or reach
  max_new_tokens) are offered to the finished set with score
  sum_logprob / generated_length ** length_penalty; the best num_beams
  finished hypotheses are kept.
- The num_beams best unfinished candidates continue; the cache rows are
  gathered from their parent beams.
- A row stops accepting hypotheses once all its num_beams finished slots are
  filled and the best running score / current length cannot beat the worst
  finished one; the loop ends when every row has stopped or at the length limit.

The result per prompt is the best finished hypothesis. Prompts are left
padded and bucketed exactly as in `flax_adapters.generate`; batch padding
rows repeat the first prompt (so no row attends to nothing).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.generate import bucket_batch, bucket_length
from flax_adapters.models.registry import init_cache

NEG = -1.0e9  # transformers' "impossible" score


def _gather(x_bk: jax.Array, idx_bj: jax.Array) -> jax.Array:
    """x[b, idx[b, j], ...] for arrays with leading (batch, beam) axes."""
    idx = idx_bj.reshape(idx_bj.shape + (1,) * (x_bk.ndim - 2))
    return jnp.take_along_axis(x_bk, idx, axis=1)


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "max_new_tokens", "eos_ids",
                                             "pad_id", "length_penalty"))
def _beam_decode(model: nn.Module, params: Any, tokens_bp: jax.Array, valid_bp: jax.Array,
                 num_beams: int, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int,
                 length_penalty: float) -> jax.Array:
    """Best hypothesis per row, (b, max_new_tokens) int32, pad after its EOS."""
    b, p = tokens_bp.shape
    k, n = num_beams, max_new_tokens
    n_keep = max(2, 1 + len(eos_ids)) * k
    variables = {"params": params}
    eos_e = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    # Prefill once per prompt, then copy the cache to its k beams.
    cache = init_cache(model.cfg, b, p - 1 + n, model.dtype)
    _, cache = model.apply(variables, tokens_bp[:, :-1], valid_bp[:, :-1], cache=cache)
    cache = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x, cache)

    def reorder(cache, parent_bk):
        flat = (parent_bk + k * jnp.arange(b)[:, None]).reshape(-1)
        return jax.tree_util.tree_map(lambda x: x[flat] if x.ndim else x, cache)

    def step(carry):
        i, token_m, run_seq, run_score, fin_seq, fin_score, fin_done, open_b, cache = carry
        logits_m1v, cache = model.apply(variables, token_m[:, None], cache=cache)
        logp_bkv = jax.nn.log_softmax(logits_m1v[:, 0].astype(jnp.float32)).reshape(b, k, -1)
        vocab = logp_bkv.shape[-1]
        total_bkv = logp_bkv + run_score[:, :, None]
        top_score, top_idx = jax.lax.top_k(total_bkv.reshape(b, k * vocab), n_keep)
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        cand_seq = _gather(run_seq, parent).at[:, :, i].set(token)
        hits = jnp.isin(token, eos_e) | (i + 1 >= n)

        # Unfinished candidates continue.
        cont_score = top_score + hits * NEG
        _, sel = jax.lax.top_k(cont_score, k)
        run_seq, run_score = _gather(cand_seq, sel), _gather(cont_score, sel)
        cache = reorder(cache, _gather(parent, sel))

        # Finished candidates among the top k join the finished set.
        just_done = hits & (jnp.arange(n_keep) < k)[None, :]
        done_score = top_score / (i + 1.0) ** length_penalty
        done_score = done_score + (~open_b)[:, None] * NEG + (~just_done) * NEG
        all_seq = jnp.concatenate([fin_seq, cand_seq], axis=1)
        all_score = jnp.concatenate([fin_score, done_score], axis=1)
        all_done = jnp.concatenate([fin_done, just_done], axis=1)
        _, keep = jax.lax.top_k(all_score, k)
        fin_seq, fin_score = _gather(all_seq, keep), _gather(all_score, keep)
        fin_done = _gather(all_done, keep)

        # Can a running beam still beat the worst finished one?
        best_running = run_score[:, 0] / (i + 1.0) ** length_penalty
        worst_done = jnp.where(fin_done, jnp.min(fin_score, axis=1, keepdims=True), NEG)
        open_b = open_b & jnp.any(best_running[:, None] > worst_done, axis=1)
        return (i + 1, run_seq[:, :, i].reshape(-1), run_seq, run_score, fin_seq, fin_score,
                fin_done, open_b, cache)

    def running(carry):
        return (carry[0] < n) & jnp.any(carry[7])

    seq = jnp.full((b, k, n), pad_id, jnp.int32)
    run_score = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG)
    init = (jnp.int32(0), jnp.repeat(tokens_bp[:, -1], k), seq, run_score, seq,
            jnp.full((b, k), NEG, jnp.float32), jnp.zeros((b, k), bool), jnp.ones((b,), bool),
            cache)
    fin_seq = jax.lax.while_loop(running, step, init)[4]
    best_bn = fin_seq[:, 0]
    # Positions after the first EOS hold pad, as in transformers' output.
    after_eos = jnp.cumsum(jnp.isin(best_bn, eos_e), axis=1) - jnp.isin(best_bn, eos_e) > 0
    return jnp.where(after_eos, pad_id, best_bn)


def beam_search(model: nn.Module, params: Any, prompt_tokens: Sequence[Sequence[int]],
                num_beams: int, max_new_tokens: int, eos_token_ids: Sequence[int],
                pad_token_id: int, length_penalty: float = 1.0) -> np.ndarray:
    """New tokens (len(prompt_tokens), max_new_tokens) int32 of the best beam.

    Each row holds its tokens up to and including its first EOS, then
    `pad_token_id`.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not prompt_tokens or min(len(t) for t in prompt_tokens) == 0:
        raise ValueError("every prompt needs at least one token")
    b = bucket_batch(len(prompt_tokens))
    p = bucket_length(max(len(t) for t in prompt_tokens))
    rows = list(prompt_tokens) + [prompt_tokens[0]] * (b - len(prompt_tokens))
    tokens_bp = np.full((b, p), pad_token_id, np.int32)
    valid_bp = np.zeros((b, p), bool)
    for r, toks in enumerate(rows):
        tokens_bp[r, p - len(toks):], valid_bp[r, p - len(toks):] = toks, True
    out = _beam_decode(model, params, tokens_bp, valid_bp, num_beams, max_new_tokens,
                       tuple(int(e) for e in eos_token_ids), int(pad_token_id),
                       float(length_penalty))
    return np.asarray(out)[:len(prompt_tokens)]
