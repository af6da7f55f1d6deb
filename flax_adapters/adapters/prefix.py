"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190) as PEFT 0.21's
PREFIX_TUNING does it for decoder-only LLaMA-family models.

Every layer's attention sees P learned key/value slots before the sequence.
PEFT hands them to transformers as an already filled KV cache
(`past_key_values`), and we reproduce what that implies (sites.kv, and the
position shift in sites.embed):

- the prefix slots are always visible (PEFT prepends ones to the mask);
- no rotary embedding is applied to them: transformers rotates only the
  new keys, cached keys are used as stored;
- the real tokens' positions start at P: transformers continues the
  position ids from the cache length, and PEFT adds P to explicit ones;
- with grouped-query attention the prefix has the kv heads' width,
  td = kv_heads * head_dim (PEFT issue #1901).

Tree, per layer (prefix leaves laid out like k_proj's output features),
in the layer's attention module (`self_attn` here; `self_attention` on
BLOOM, `attn` on GPT-J, `attention` on GPT-NeoX, found in the tree):

    before: {'layers_i': {'self_attn': {'q_proj': ..., ...}}}
    after:  {'layers_i': {'self_attn': {'q_proj': ..., ...,
                                        'prefix_k': (P, td), 'prefix_v': (P, td)}}}

The reparameterised form (PEFT's `prefix_projection=True`, its PrefixEncoder)
trains a shared MLP instead, at the top of the tree:

    {'prefix_encoder': {'embedding': (P, td), 'dense_in': (td, h), 'dense_in_bias': (h,),
                        'dense_out': (h, L*2*td), 'dense_out_bias': (L*2*td,)}}
    flat = tanh(embedding @ dense_in + dense_in_bias) @ dense_out + dense_out_bias

whose (P, L*2*td) output is laid out [layer][key | value][td], as PEFT's.
The model reads only the per-layer leaves, so a loss function calls
`materialize` (differentiable: gradients reach the encoder) before
`model.apply`, and inference folds it once; the model refuses an
unmaterialised tree rather than ignore it. Export writes the folded prefix,
as PEFT's own save does.

Init as PEFT: embeddings N(0, 1) (torch.nn.Embedding's default), the MLP's
weights and biases torch.nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
init="zero" zeroes what produces the prefix, as PEFT's `init_weights="zero"`;
note that this is not an identity: zero keys still draw softmax weight.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.adapters.inits import torch_linear
from flax_adapters.adapters.registry import Method, Schema, register
from flax_adapters.adapters.targeting import Context

ENCODER = "prefix_encoder"


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    num_virtual_tokens: int = 30  # LLM-Adapters' finetune.py default
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # None: td, PEFT's default (its token_dim)
    init: Literal["random", "zero"] = "random"

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got "
                             f"{self.encoder_hidden_size}")
        if self.init not in ("random", "zero"):
            raise ValueError(f"init must be 'random' or 'zero', got {self.init!r}")


def layer_names(tree: dict) -> list[str]:
    """'layers_0', 'layers_1', ... present at the top of `tree`, in order."""
    names = [k for k in tree if re.fullmatch(r"layers_\d+", k)]
    return sorted(names, key=lambda k: int(k.split("_")[1]))


# The key projections of the families: td is k_proj's output width, or a third of
# a fused query_key_value's (BLOOM, GPT-NeoX: multi-head, laid out per head), or
# half of what a fused qkv_proj's holds beyond the queries, o_proj's input width
# (Phi-3: [q | k | v] with grouped-query attention).
_KEY_PROJECTIONS = {"k_proj": 1, "query_key_value": 3, "qkv_proj": None}


def attention_module(layer: dict) -> str | None:
    """The name of a layer's attention module (self_attn on LLaMA and OPT,
    self_attention on BLOOM, attn on GPT-J, attention on GPT-NeoX): the child
    holding a key projection or a prefix; None if the layer shows neither."""
    for name, child in layer.items():
        if isinstance(child, dict) and ("prefix_k" in child
                                        or any(k in child for k in _KEY_PROJECTIONS)):
            return name
    return None


def kv_width(base: dict) -> int:
    """td = kv_heads * head_dim: the width of the keys of layer 0."""
    attn = base["layers_0"][attention_module(base["layers_0"])]
    for name, parts in _KEY_PROJECTIONS.items():
        if name in attn:
            width = attn[name]["kernel"].shape[1]
            if parts is None:
                return (width - attn["o_proj"]["kernel"].shape[0]) // 2
            return width // parts
    raise ValueError(f"layers_0's attention holds none of {sorted(_KEY_PROJECTIONS)}")


def init(base: dict, cfg: PrefixConfig, key: jax.Array, ctx: Context | None = None) -> dict:
    """A new tree with float32 prefix leaves (or the prefix encoder). The
    attention module and the key width are read off the tree."""
    del ctx
    p, n_layers, td = cfg.num_virtual_tokens, len(layer_names(base)), kv_width(base)
    k_emb, k_in, k_out = jax.random.split(key, 3)
    if not cfg.prefix_projection:
        flat = jax.random.normal(k_emb, (p, n_layers * 2 * td), jnp.float32)
        if cfg.init == "zero":
            flat = jnp.zeros_like(flat)
        return with_flat_prefix(base, flat)
    hidden = cfg.encoder_hidden_size or td
    dense_in, dense_in_bias = torch_linear(k_in, td, hidden)
    dense_out, dense_out_bias = torch_linear(k_out, hidden, n_layers * 2 * td)
    if cfg.init == "zero":
        dense_out, dense_out_bias = jnp.zeros_like(dense_out), jnp.zeros_like(dense_out_bias)
    encoder = {"embedding": jax.random.normal(k_emb, (p, td), jnp.float32),
               "dense_in": dense_in, "dense_in_bias": dense_in_bias,
               "dense_out": dense_out, "dense_out_bias": dense_out_bias}
    return {**base, ENCODER: encoder}


def with_flat_prefix(tree: dict, flat: jax.Array, attention: str | None = None) -> dict:
    """A new tree with PEFT's flat prefix (P, L*2*td) split into the
    `prefix_k`, `prefix_v` of every layer (the `layers_i` entries of `tree`),
    inside the layer's attention module: found in the tree, else `attention`,
    else LLaMA's `self_attn` (a misplaced prefix is an error at the model's
    prefix site, never ignored)."""
    names = layer_names(tree)
    p, width = flat.shape
    if not names:
        raise ValueError("the tree has no layers_i entries to place the prefix in")
    if width % (2 * len(names)):
        raise ValueError(f"a prefix of width {width} does not split into {len(names)} layers "
                         "of keys and values")
    td = width // (2 * len(names))
    x = flat.reshape(p, len(names), 2, td)
    attention = attention_module(tree[names[0]]) or attention or "self_attn"
    out = dict(tree)
    for i, name in enumerate(names):
        layer = dict(out.get(name, {}))
        layer[attention] = {**layer.get(attention, {}),
                            "prefix_k": x[:, i, 0], "prefix_v": x[:, i, 1]}
        out[name] = layer
    return out


def flat_prefix(tree: dict) -> jax.Array:
    """PEFT's flat prefix (P, L*2*td) from the per-layer leaves (after
    `materialize`); the inverse of `with_flat_prefix`."""
    tree = materialize(tree)
    attns = {n: tree[n].get(attention_module(tree[n]), {}) for n in layer_names(tree)}
    names = [n for n in layer_names(tree) if "prefix_k" in attns[n]]
    if not names:
        raise ValueError("the tree holds no prefix (no layers_i/<attention>/prefix_k leaf)")
    parts = [jnp.stack([attns[n]["prefix_k"], attns[n]["prefix_v"]], 1)
             for n in names]  # each (P, 2, td)
    return jnp.stack(parts, 1).reshape(parts[0].shape[0], -1)


def encode(encoder: dict) -> jax.Array:
    """PEFT's PrefixEncoder.transform: the flat prefix (P, L*2*td)."""
    h = jnp.tanh(encoder["embedding"] @ encoder["dense_in"] + encoder["dense_in_bias"])
    return h @ encoder["dense_out"] + encoder["dense_out_bias"]


def materialize(tree: dict, attention: str | None = None) -> dict:
    """The tree the model reads: a `prefix_encoder` is replaced by the
    per-layer prefix leaves it computes. Identity for any other tree.

    Works on a full tree and on a bare trainable tree, e.g. in a loss:
    model.apply({'params': combine(frozen, materialize(trainable))}, ...);
    a bare tree of a family other than LLaMA / OPT names its attention
    module (`attention='self_attention'` on BLOOM, see `with_flat_prefix`).
    """
    if ENCODER not in tree:
        return tree
    encoder = tree[ENCODER]
    rest = {k: v for k, v in tree.items() if k != ENCODER}
    flat = encode(encoder)
    names = layer_names(rest)
    if not names:  # a bare encoder: its output width says how many layers
        n_layers = flat.shape[1] // (2 * encoder["embedding"].shape[1])
        rest = {**rest, **{f"layers_{i}": {} for i in range(n_layers)}}
    return with_flat_prefix(rest, flat, attention)


# ----------------------------------------------------------------------------- PEFT schema

def to_json(cfg: PrefixConfig, adapter: dict, peft_targets) -> dict:
    """PEFT's PREFIX_TUNING fields for the adapter leaves `adapter`."""
    del peft_targets
    tree = materialize(adapter)
    p, width = flat_prefix(tree).shape
    n_layers = len([n for n in layer_names(tree)
                    if "prefix_k" in tree[n].get(attention_module(tree[n]) or "", {})])
    td = width // (2 * n_layers)
    return {
        "num_virtual_tokens": p, "num_layers": n_layers, "num_transformer_submodules": 1,
        # PEFT derives both from the base model's config when it loads: the kv heads and
        # their width under GQA. A token_dim of td would be divided by the query heads
        # where the config has no head_dim (Phi-3: 2 kv heads of 16 read as 4 of 8).
        "token_dim": None, "num_attention_heads": None,
        "encoder_hidden_size": cfg.encoder_hidden_size or td,
        "prefix_projection": cfg.prefix_projection,
        "init_weights": "zero" if cfg.init == "zero" else None,
    }


def to_tensors(adapter: dict, cfg: PrefixConfig) -> dict:
    """One `prompt_embeddings` (P, L*2*td): the prefix folded, as PEFT saves it."""
    del cfg
    return {"prompt_embeddings": np.asarray(jax.device_get(flat_prefix(adapter)), np.float32)}


def _check_shape(config: dict, tensors: dict, base: dict) -> None:
    n_layers, td = len(layer_names(base)), kv_width(base)
    if config.get("num_transformer_submodules") not in (None, 1):
        raise ValueError("an encoder-decoder prefix (num_transformer_submodules=2) does not "
                         "fit a decoder-only model")
    want = (int(config["num_virtual_tokens"]), n_layers * 2 * td)
    got = tuple(tensors["prompt_embeddings"].shape)
    if got != want:
        raise ValueError(f"prompt_embeddings has shape {got}, but this base model needs {want} "
                         f"({n_layers} layers x key/value x {td} kv width); was the adapter "
                         "trained on another model?")


def from_json(config: dict, tensors: dict, base: dict) -> PrefixConfig:
    _check_shape(config, tensors, base)
    return PrefixConfig(num_virtual_tokens=int(config["num_virtual_tokens"]),
                        prefix_projection=bool(config.get("prefix_projection", False)),
                        encoder_hidden_size=config.get("encoder_hidden_size"),
                        init="zero" if config.get("init_weights") == "zero" else "random")


def from_tensors(config: dict, tensors: dict, base: dict) -> dict:
    """base + the per-layer prefix leaves of PEFT's folded `prompt_embeddings`."""
    _check_shape(config, tensors, base)
    return with_flat_prefix(base, jnp.asarray(np.asarray(tensors["prompt_embeddings"],
                                                         np.float32)))


register(Method(
    name="prefix", config=PrefixConfig, leaves=frozenset({"prefix_k", "prefix_v", ENCODER}),
    init=init, settings=lambda cfg, presets: {"prefix_tokens": cfg.num_virtual_tokens},
    materialize=materialize,
    schema=Schema(peft_type="PREFIX_TUNING", loader="PEFT", to_json=to_json,
                  from_json=from_json, to_tensors=to_tensors, from_tensors=from_tensors),
))
