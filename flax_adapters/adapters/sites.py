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


@dataclasses.dataclass(frozen=True)
class Settings:
    """Hyperparameters of the active adapter that the forward pass needs."""

    lora_scale: float = 1.0
    lora_dropout: float = 0.0


def _leaf(mdl: nn.Module, name: str):
    return mdl.get_variable("params", name) if mdl.has_variable("params", name) else None


def _dropout(mdl: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    if deterministic or rate == 0.0:
        return x
    keep = jax.random.bernoulli(mdl.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def linear_in(mdl: nn.Module, x: jax.Array, settings: Settings, deterministic: bool) -> jax.Array:
    """Input side of a linear site (series adapters placed before a projection)."""
    return x


def linear(mdl: nn.Module, x: jax.Array, y: jax.Array, settings: Settings,
           deterministic: bool) -> jax.Array:
    """Output side of a linear site: y = x @ W (+ b) on entry."""
    a, b = _leaf(mdl, "lora_a"), _leaf(mdl, "lora_b")
    if a is not None:
        # LoRA: (dropout(x) @ A) @ B -- the (in, out) delta is never formed.
        h = _dropout(mdl, x, settings.lora_dropout, deterministic) @ a.astype(y.dtype)
        y = y + settings.lora_scale * (h @ b.astype(y.dtype))
    return y


def kv(mdl: nn.Module, k_bskn: jax.Array, v_bskn: jax.Array, valid_bs: jax.Array):
    """Attention keys/values site (prefix tuning prepends its keys here)."""
    return k_bskn, v_bskn, valid_bs


def embed(mdl: nn.Module, h_btd: jax.Array) -> jax.Array:
    """Input embeddings site (prompt tuning)."""
    return h_btd
