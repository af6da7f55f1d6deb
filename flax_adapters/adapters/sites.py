"""The adapter sites: where the model applies the adapter leaves it finds.

The model calls these functions at fixed places (every linear projection,
the attention keys/values, the input embeddings). Each looks at the leaves
present in the calling module's scope and applies them; with no adapter
leaves it returns its input unchanged and adds nothing to the graph.

Static hyperparameters that are not arrays (scales, dropout rates) come
from `Settings`, a frozen, hashable dataclass held by the model, so that
they are compile-time constants and never trainable.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.adapters import bottleneck, dora, prefix, prompt
from flax_adapters.quant import array as qarray


@dataclasses.dataclass(frozen=True)
class Settings:
    """Hyperparameters of the active adapter that the forward pass needs."""

    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    # Bottleneck adapters (bottleneck.py): series placement by module name
    # ((name, 'input' | 'output'), ...), or parallel at every adapted site.
    bottleneck_series: tuple[tuple[str, str], ...] = ()
    bottleneck_parallel: bool = False
    bottleneck_act: str = "tanh"
    bottleneck_dropout: float = 0.0
    bottleneck_scaling: float = 1.0  # a learned `adapter_scaling` leaf overrides it
    # Prefix tuning (prefix.py): how many virtual key/value slots precede the
    # sequence; the real tokens' positions start after them.
    prefix_tokens: int = 0


def _leaf(mdl: nn.Module, name: str):
    return mdl.get_variable("params", name) if mdl.has_variable("params", name) else None


def _dropout(mdl: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    """Inverted dropout. The mask compares raw uint32 draws with (1 - rate) * 2^32
    (exact to 2^-32): `jax.random.bernoulli` also converts every draw to a float,
    which made LoRA dropout markedly dearer (one mask per site, as PEFT's one
    Dropout module per LoRA layer)."""
    if deterministic or rate == 0.0:
        return x
    threshold = min(round((1.0 - rate) * 2.0**32), 2**32 - 1)
    keep = jax.random.bits(mdl.make_rng("dropout"), x.shape, jnp.uint32) < jnp.uint32(threshold)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def linear_in(mdl: nn.Module, x: jax.Array, settings: Settings, deterministic: bool) -> jax.Array:
    """Input side of a linear site (series adapters placed before a projection)."""
    l = _leaf(mdl, "ia3")
    if l is not None and l.shape[1] == 1:
        # (IA)^3 at a feedforward site: l (in, 1) scales the input (ia3.py).
        x = x * l[:, 0].astype(x.dtype)
    if _bottleneck_placement(mdl, settings) == "input":
        x = x + _bottleneck(mdl, x, settings, deterministic)
    return x


def linear(mdl: nn.Module, x: jax.Array, y: jax.Array, settings: Settings,
           deterministic: bool) -> jax.Array:
    """Output side of a linear site: y = x @ W (+ b) on entry."""
    a, b = _leaf(mdl, "lora_a"), _leaf(mdl, "lora_b")
    m = _leaf(mdl, "lora_magnitude")
    if a is not None and m is not None:
        y = _dora(mdl, x, y, a, b, m, settings, deterministic)
    elif a is not None:
        # LoRA: (dropout(x) @ A) @ B -- the (in, out) delta is never formed.
        h = _dropout(mdl, x, settings.lora_dropout, deterministic) @ a.astype(y.dtype)
        y = y + settings.lora_scale * (h @ b.astype(y.dtype))
    l = _leaf(mdl, "ia3")
    if l is not None and l.shape[0] == 1:
        # (IA)^3 at an ordinary site: l (1, out) scales the output, bias included.
        y = y * l[0].astype(y.dtype)
    where = _bottleneck_placement(mdl, settings)
    if where == "output":
        y = y + _bottleneck(mdl, y, settings, deterministic)
    elif where == "parallel":
        y = y + _bottleneck(mdl, x, settings, deterministic)
    return y


def grouped_linear(mdl: nn.Module, x_ri: jax.Array, group_sizes_e: jax.Array, y_ro: jax.Array,
                   settings: Settings) -> jax.Array:
    """Output side of a grouped site: E experts' stacked kernels (E, in, out)
    applied to rows sorted by expert (group_sizes_e[e] rows for expert e), y =
    ragged_dot(x, kernels) on entry (models/moe.py). LoRA on the experts
    (PEFT's target_parameters, lora.py), A (E, in, r) and B (E, r, out):
    y + scale * ragged_dot(ragged_dot(x, A), B), each row through its own
    expert's factors; no (E, in, out) delta is formed. No dropout: PEFT's
    ParamWrapper has none (the dropped input cannot be factored out of the
    merged expert weight), and no other method reaches these sites."""
    a, b = _leaf(mdl, "lora_a"), _leaf(mdl, "lora_b")
    if a is None:
        return y_ro
    h_rr = jax.lax.ragged_dot(x_ri, a.astype(y_ro.dtype), group_sizes_e)
    return y_ro + settings.lora_scale * jax.lax.ragged_dot(h_rr, b.astype(y_ro.dtype),
                                                           group_sizes_e)


def _bottleneck_placement(mdl: nn.Module, settings: Settings) -> str | None:
    """Where this site's bottleneck adapter sits, or None without one."""
    if not mdl.has_variable("params", "adapter_down"):
        return None
    if settings.bottleneck_parallel:
        return "parallel"
    where = dict(settings.bottleneck_series).get(mdl.name)
    if where is None:  # leaves the settings do not place: never skip them silently
        raise ValueError(f"{mdl.name} holds a bottleneck adapter but the model's Settings do not "
                         "place it; build the model with settings=fa.settings_for(cfg, model_type)")
    return where


def _bottleneck(mdl: nn.Module, x: jax.Array, settings: Settings, deterministic: bool):
    """LLM-Adapters' adapter(x) = up(act(down(dropout(x)))) * scaling."""
    scaling = _leaf(mdl, "adapter_scaling")
    return bottleneck.apply(_dropout(mdl, x, settings.bottleneck_dropout, deterministic),
                            _leaf(mdl, "adapter_down"), _leaf(mdl, "adapter_up"),
                            settings.bottleneck_scaling if scaling is None else scaling,
                            settings.bottleneck_act)


def _dora(mdl, x, y, a, b, m, settings: Settings, deterministic: bool) -> jax.Array:
    """DoRA as PEFT computes it (dora.py): with x' = dropout(x) and the
    detached column norms n = ||W + s A B||,
    y + (m / n - 1) * (x' W) + (m / n) * s (x' A) B."""
    kernel = mdl.get_variable("params", "kernel")
    n = jax.lax.stop_gradient(dora.column_norm(kernel, a, b, settings.lora_scale))
    f = (m / n).astype(y.dtype)
    if deterministic or settings.lora_dropout == 0.0:
        # PEFT reuses the base output here, minus its bias: x' W = x W.
        x_d, base = x, y
        if mdl.has_variable("params", "bias"):
            base = y - mdl.get_variable("params", "bias").astype(y.dtype)
    else:
        # Under dropout PEFT recomputes the base path on the dropped input.
        x_d = _dropout(mdl, x, settings.lora_dropout, deterministic)
        base = qarray.matmul(x_d, kernel, y.dtype)
    low = (x_d @ a.astype(y.dtype)) @ b.astype(y.dtype)
    return y + (f - 1) * base + f * settings.lora_scale * low


def kv(mdl: nn.Module, k_bskn: jax.Array, v_bskn: jax.Array, mask_bts: jax.Array):
    """Attention keys/values site. Prefix tuning (prefix.py) prepends its P
    key/value slots, as stored (no rotary embedding) and always visible."""
    prefix_k = _leaf(mdl, "prefix_k")
    if prefix_k is None:
        if mdl.settings.prefix_tokens:  # the positions are shifted for a prefix that is absent
            raise ValueError(f"the model's Settings say prefix_tokens="
                             f"{mdl.settings.prefix_tokens} but {mdl.name} holds no prefix_k; "
                             "inject or materialize the prefix into the full tree")
        return k_bskn, v_bskn, mask_bts
    p = prefix_k.shape[0]
    if p != mdl.settings.prefix_tokens:  # the positions would be shifted by the wrong amount
        raise ValueError(f"{mdl.name} holds a {p}-token prefix but the model's Settings say "
                         f"prefix_tokens={mdl.settings.prefix_tokens}; build the model with "
                         "settings=fa.settings_for(cfg, model_type)")
    b, _, k, n = k_bskn.shape

    def prepend(leaf_pd, x_bskn):
        leaf_bpkn = jnp.broadcast_to(leaf_pd.reshape(p, k, n).astype(x_bskn.dtype), (b, p, k, n))
        return jnp.concatenate([leaf_bpkn, x_bskn], axis=1)

    visible_btp = jnp.ones(mask_bts.shape[:2] + (p,), bool)
    return (prepend(prefix_k, k_bskn), prepend(_leaf(mdl, "prefix_v"), v_bskn),
            jnp.concatenate([visible_btp, mask_bts], axis=2))


# A KV cache that holds a prompt's virtual tokens says how many, under this key.
CACHED_PROMPT = "prompt_tokens"


def embed(mdl: nn.Module, h_btd: jax.Array, valid_bt: jax.Array, positions_bt: jax.Array,
          cache: dict | None):
    """Input embeddings site, before the attention mask is built.

    Prompt tuning / P-tuning (prompt.py) prepend their P virtual tokens:
    always valid, at positions 0..P-1, the real tokens' positions shifted by
    P. With a KV cache this happens on the cache's first call only: the
    cache grows by P slots for them and records that it holds them
    (`CACHED_PROMPT`), so later calls just shift positions. Prefix tuning
    (prefix.py) only shifts the positions by its P. Returns (h, valid,
    positions, cache), with t + P rows when the prompt was prepended.
    """
    if mdl.has_variable("params", prefix.ENCODER):
        raise ValueError("the tree holds a prefix_encoder (prefix tuning with projection); the "
                         "model reads the per-layer prefixes it computes: apply the model to "
                         "fa.materialize(tree)")
    if mdl.settings.prefix_tokens:
        positions_bt = positions_bt + mdl.settings.prefix_tokens
    prompts_pd = prompt.prompts(mdl.get_variable("params", prompt.EMBEDDINGS),
                                mdl.get_variable("params", prompt.ENCODER))
    if prompts_pd is None:
        return h_btd, valid_bt, positions_bt, cache
    p = prompts_pd.shape[0]
    positions_bt = positions_bt + p
    if cache is not None and CACHED_PROMPT in cache:
        return h_btd, valid_bt, positions_bt, cache
    b, _, d = h_btd.shape
    h_btd = jnp.concatenate([jnp.broadcast_to(prompts_pd.astype(h_btd.dtype), (b, p, d)), h_btd],
                            axis=1)
    valid_bt = jnp.concatenate([jnp.ones((b, p), bool), valid_bt], axis=1)
    virtual_bp = jnp.broadcast_to(jnp.arange(p, dtype=positions_bt.dtype), (b, p))
    positions_bt = jnp.concatenate([virtual_bp, positions_bt], axis=1)
    if cache is not None:
        # P more slots at the end of every per-slot array: the prompt takes slots
        # index..index+P-1 and the sequence keeps all the room it was given.
        grow = lambda x: jnp.pad(x, [(0, 0), (0, p)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        cache = {**{k: jax.tree_util.tree_map(grow, v) if k.startswith("layers_") else v
                    for k, v in cache.items()},
                 "valid": grow(cache["valid"]), CACHED_PROMPT: jnp.int32(p)}
    return h_btd, valid_bt, positions_bt, cache
