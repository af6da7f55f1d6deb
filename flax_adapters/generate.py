"""Batched autoregressive decoding with the explicit KV cache.

`generate(model, params, prompt_tokens, gen_cfg, key)` returns the new token
ids of a batch of prompts; `generate_text` wraps it with a tokenizer (chat
template, decoding, stop strings). Greedy, temperature, top-k and top-p
(nucleus) sampling, applied in that order as in transformers'
`LogitsProcessor`s.

How it runs. The whole decode is ONE jitted function (`_decode`): prefill,
then a `lax.while_loop` of single-token steps that exits as soon as every row
has emitted an EOS. The cache lives in the loop carry, so XLA updates it in
place; the parameters are an argument of the jitted function, never a closed
over constant. Choices worth knowing:

- Prompts are left-padded (the `valid` mask hides the padding) so every row's
  last prompt token sits in the same column. The prefill runs over all but
  that last token and discards its logits, which lets XLA drop the lm_head
  from the prefill entirely (49152-wide logits for every prompt position are
  most of a small model's prefill cost); the first decode step then feeds
  the last prompt token and yields the first new token.
- Shapes are bucketed so a long evaluation compiles once per bucket, not once
  per batch: the padded prompt length is the next of 16, 24, 32, 48, 64,
  96, ... (powers of two and 1.5x powers of two: at most 1/3 padding) and the
  batch is padded with inactive rows to the next power of two. The cache has
  exactly `prompt bucket - 1 + max_new_tokens` slots. `num_compilations()`
  counts the compiled variants; it must stay flat across same-bucket calls.
- Randomness: one key per row, `fold_in(key, row)`, then `fold_in(., step)`
  per step, so a row's samples do not depend on the batch bucket size.

Reference for the sampling semantics: transformers' `TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper` (top-k keeps every token tied with the
k-th; the nucleus keeps the smallest set of most likely tokens whose
probability reaches `top_p`, and at least one). tests/test_generate.py
compares `warp_logits` and the sampled frequencies with them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.models.registry import init_cache

MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to generate. Hashable: it is a static argument of the jitted decode.

    eos_token_ids: None takes the model config's `eos_token_id`; () disables
    EOS (every row generates exactly `max_new_tokens`). pad_token_id fills the
    positions after a row's EOS; None takes the model config's pad id, else
    its first EOS id, else 0. Stop strings are applied on the host, by
    `generate_text`.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (exact argmax)
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    eos_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if isinstance(self.eos_token_ids, int):  # accept a bare id for convenience
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        elif self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    def resolve(self, eos: int | Sequence[int] | None, pad: int | None) -> "GenerationConfig":
        """Fills unset EOS and pad ids from a model config's `eos`, `pad`."""
        eos_ids = self.eos_token_ids
        if eos_ids is None:
            eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        pad_id = self.pad_token_id
        if pad_id is None:
            pad_id = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
        return dataclasses.replace(self, eos_token_ids=eos_ids, pad_token_id=pad_id)


# ----------------------------------------------------------------------------- sampling

def _nucleus(sorted_logits_bk: jax.Array, top_p: float) -> jax.Array:
    """Masks (to -inf) logits sorted in descending order outside the nucleus:
    a token is kept while the probability mass strictly before it is < top_p,
    so the most likely token always survives."""
    probs_bk = jax.nn.softmax(sorted_logits_bk, axis=-1)
    mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
    return jnp.where(mass_before_bk < top_p, sorted_logits_bk, -jnp.inf)


def filter_top_k(logits_bv: jax.Array, top_k: int) -> jax.Array:
    """Logits with every token below the k-th largest set to -inf. Ties with
    the k-th are kept (more than k tokens then survive), as transformers'
    `TopKLogitsWarper` does; top_k >= vocab keeps everything."""
    kth_b1 = jax.lax.top_k(logits_bv, min(top_k, logits_bv.shape[-1]))[0][:, -1:]
    return jnp.where(logits_bv >= kth_b1, logits_bv, -jnp.inf)


def filter_top_p(logits_bv: jax.Array, top_p: float) -> jax.Array:
    """Logits with every token outside the top-p nucleus set to -inf: the
    smallest set of most likely tokens whose probability reaches top_p. Tokens
    tied at the edge of the nucleus are taken lowest index first (transformers'
    choice there follows torch.sort's unspecified order of equal values)."""
    b, v = logits_bv.shape
    sorted_bv, idx_bv = jax.lax.top_k(logits_bv, v)  # ties: lower index first
    kept_bv = _nucleus(sorted_bv, top_p)
    return jnp.full_like(logits_bv, -jnp.inf).at[jnp.arange(b)[:, None], idx_bv].set(kept_bv)


def warp_logits(logits_bv: jax.Array, temperature: float, top_k: int = 0,
                top_p: float = 1.0) -> jax.Array:
    """float32 logits that sampling draws from: divided by `temperature`,
    then top-k, then top-p filtered (-inf outside), the order of
    transformers' `generate` (`_get_logits_processor`). temperature > 0."""
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if top_k:
        logits_bv = filter_top_k(logits_bv, top_k)
    if top_p < 1:
        logits_bv = filter_top_p(logits_bv, top_p)
    return logits_bv


def sample_logits(logits_bv: jax.Array, keys_b: jax.Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Next token per row (int32 (b,)): a draw from softmax(warp_logits(...)).
    temperature 0 is exact argmax."""
    if temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    warped_bv = warp_logits(logits_bv, temperature, top_k, top_p)
    return jax.vmap(jax.random.categorical)(keys_b, warped_bv).astype(jnp.int32)  # a key per row


# ----------------------------------------------------------------------------- bucketing

def bucket_length(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """Smallest of 16, 24, 32, 48, 64, 96, ... (2^i and 1.5 * 2^i) that is >= n."""
    size = minimum
    while size < n:
        half_step = size // 2 if size & (size - 1) == 0 else size // 3
        size += half_step  # 2^i -> 1.5 * 2^i -> 2^(i+1)
    return size


def bucket_batch(n: int) -> int:
    """Next power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


# ----------------------------------------------------------------------------- decoding

@functools.partial(jax.jit, static_argnames=("model", "gen_cfg"))
def _decode(model: nn.Module, gen_cfg: GenerationConfig, params: Any,
            tokens_bp: jax.Array, valid_bp: jax.Array, key: jax.Array) -> jax.Array:
    """New tokens (b, max_new_tokens) for left-padded prompts (b, p), p >= 2.

    Rows with no valid token are batch padding: inactive from the start.
    """
    b, p = tokens_bp.shape
    n_new = gen_cfg.max_new_tokens
    eos_e = jnp.asarray(gen_cfg.eos_token_ids, jnp.int32)
    pad = jnp.int32(gen_cfg.pad_token_id)
    variables = {"params": params}

    cache = init_cache(model.cfg, b, p - 1 + n_new, model.dtype)
    # The logits of the prefill are unused, so XLA removes the lm_head here.
    _, cache = model.apply(variables, tokens_bp[:, :-1], valid_bp[:, :-1], cache=cache)

    row_keys_b = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(b))

    def step(carry):
        i, token_b, done_b, out_bn, cache = carry
        logits_b1v, cache = model.apply(variables, token_b[:, None], cache=cache)
        keys_b = jax.vmap(jax.random.fold_in, (0, None))(row_keys_b, i)
        next_b = sample_logits(logits_b1v[:, 0], keys_b, gen_cfg.temperature, gen_cfg.top_k,
                               gen_cfg.top_p)
        next_b = jnp.where(done_b, pad, next_b)
        out_bn = jax.lax.dynamic_update_slice(out_bn, next_b[:, None], (0, i))
        done_b = done_b | jnp.isin(next_b, eos_e)
        return i + 1, next_b, done_b, out_bn, cache

    def not_finished(carry):
        i, _, done_b, _, _ = carry
        return (i < n_new) & ~jnp.all(done_b)

    done_b = ~jnp.any(valid_bp, axis=1)
    out_bn = jnp.full((b, n_new), pad, jnp.int32)
    init = (jnp.int32(0), tokens_bp[:, -1], done_b, out_bn, cache)
    return jax.lax.while_loop(not_finished, step, init)[3]


def num_compilations() -> int:
    """How many shape/config variants of the decode are compiled so far.

    Compare it before and after a loop over batches: it grows by one per new
    (prompt bucket, batch bucket, model, GenerationConfig, parameter tree
    structure and dtypes) and by nothing else.
    """
    return _decode._cache_size()


def generate(model: nn.Module, params: Any, prompt_tokens: Sequence[Sequence[int]],
             gen_cfg: GenerationConfig, key: jax.Array | None = None) -> np.ndarray:
    """New tokens, int32 (len(prompt_tokens), gen_cfg.max_new_tokens).

    Each row holds the tokens after its prompt, up to and including its first
    EOS, then `pad_token_id`. `key` seeds sampling (default: key 0, so runs
    are reproducible); greedy decoding ignores it.
    """
    cfg = model.cfg
    if not prompt_tokens:
        raise ValueError("prompt_tokens is empty; pass a list of token id lists")
    lengths = [len(p) for p in prompt_tokens]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} has no tokens; every prompt needs at "
                         "least one (e.g. the BOS token)")
    gen_cfg = gen_cfg.resolve(cfg.eos_token_id, cfg.pad_token_id)
    limit = getattr(cfg, "position_limit", None)  # models with learned positions (OPT)
    # The last new token is never fed back: a row feeds prompt + max_new_tokens - 1.
    if limit is not None and max(lengths) + gen_cfg.max_new_tokens - 1 > limit:
        raise ValueError(f"the longest prompt ({max(lengths)} tokens) and max_new_tokens="
                         f"{gen_cfg.max_new_tokens} need {max(lengths) + gen_cfg.max_new_tokens - 1}"
                         f" positions, but the model has {limit}; shorten the prompt or lower "
                         "max_new_tokens")
    b, p = bucket_batch(len(prompt_tokens)), bucket_length(max(lengths))
    tokens_bp = np.full((b, p), gen_cfg.pad_token_id, np.int32)
    valid_bp = np.zeros((b, p), bool)
    for row, prompt in enumerate(prompt_tokens):
        tokens_bp[row, p - len(prompt):] = prompt  # left padding
        valid_bp[row, p - len(prompt):] = True
    bad = (tokens_bp < 0) | (tokens_bp >= cfg.vocab_size)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise ValueError(f"prompt {row} has token ids outside [0, {cfg.vocab_size}): "
                         f"{sorted(set(tokens_bp[row][bad[row]].tolist()))[:5]}")
    key = jax.random.key(0) if key is None else key
    out_bn = _decode(model, gen_cfg, params, tokens_bp, valid_bp, key)
    return np.asarray(out_bn)[:len(prompt_tokens)]


def eos_ids(model_cfg: Any, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a generation: the model config's EOS ids and the
    tokenizer's (e.g. a chat model's end-of-turn), sorted."""
    eos = model_cfg.eos_token_id
    ids = set(() if eos is None else (eos,) if isinstance(eos, int) else eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def generate_text(model: nn.Module, params: Any, tokenizer: Any, prompts: Sequence[str],
                  gen_cfg: GenerationConfig, chat: bool = False, stop: Sequence[str] = (),
                  key: jax.Array | None = None) -> list[str]:
    """Completions of `prompts` as text.

    chat=True wraps each prompt as a user turn with the tokenizer's chat
    template (and the generation prompt) when the tokenizer has one; without
    a template the prompt is used as is. Each completion is cut at its first
    EOS and at the earliest of the `stop` strings (which are not included).
    """
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        add_special = False  # the template already wrote the special tokens
    else:
        texts, add_special = list(prompts), True
    ids = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]
    if gen_cfg.eos_token_ids is None:
        gen_cfg = dataclasses.replace(gen_cfg, eos_token_ids=eos_ids(model.cfg, tokenizer))
    out_bn = generate(model, params, ids, gen_cfg, key)
    eos_set = set(gen_cfg.eos_token_ids)
    texts_out = []
    for row in out_bn.tolist():
        cut = next((i for i, tok in enumerate(row) if tok in eos_set), len(row))
        text = tokenizer.decode(row[:cut], skip_special_tokens=True)
        ends = [text.find(s) for s in stop if s and s in text]
        texts_out.append(text[:min(ends)] if ends else text)
    return texts_out
