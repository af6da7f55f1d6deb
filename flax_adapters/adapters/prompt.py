"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691) and P-tuning (Liu et
al. 2021, arXiv:2103.10385) as PEFT 0.21's PROMPT_TUNING and P_TUNING do them
for causal LMs.

P virtual-token embeddings are prepended to the input embeddings
(sites.embed): always valid, at positions 0..P-1, with the real tokens
following from position P, as in PEFT's forward (which concatenates them to
`inputs_embeds` and ones to the attention mask). PEFT's logits include the P
virtual positions; ours are for the real tokens only.

Positions. An explicit `positions_bt` numbers the real tokens; the model
adds P. The default numbers them by counting valid tokens, so left padding
changes nothing. PEFT ignores explicit position ids for these methods and
numbers the whole [virtual, padding, real] row, so its left-padded rows put
the padding between prompt and text; `positions_bt = arange(t)` reproduces
that exactly (the parity test does), and unpadded rows agree either way.

Tree (top level, beside `embed_tokens`):

    before:       {'embed_tokens': (v, d), ...}
    prompt tuning {'embed_tokens': (v, d), ..., 'prompt_embeddings': (P, d)}
    P-tuning      {'embed_tokens': (v, d), ..., 'prompt_encoder': {
                       'embedding': (P, d), 'dense_in': (d, h), 'dense_in_bias': (h,),
                       'dense_mid': (h, h), 'dense_mid_bias': (h,),
                       'dense_out': (h, d), 'dense_out_bias': (d,)}}

P-tuning's prompts are PEFT's MLP encoder, computed by the model on every
call: relu(relu(E W_in + b_in) W_mid + b_mid) W_out + b_out. `fold` replaces
the encoder by its output (the prompt-tuning form), which is also what PEFT
saves. PEFT's LSTM encoder is not implemented.

Init as PEFT: prompt tuning "random" N(0, 1) (torch.nn.Embedding's default),
"sample_vocab" the embeddings of random vocabulary ids, "text" the
embeddings of the tokenized `init_text` repeated / truncated to P (both as
the family's embedding module gives them: Gemma's times sqrt(d));
P-tuning's embedding N(0, 1) and its MLP torch.nn.Linear's default.

KV cache: the first call on a cache prepends the prompt and grows the cache
by P slots; later calls find it there (see sites.embed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.adapters.inits import torch_linear
from flax_adapters.adapters.registry import Method, Schema, register
from flax_adapters.adapters.targeting import Context
from flax_adapters.quant import array as qarray

EMBEDDINGS, ENCODER = "prompt_embeddings", "prompt_encoder"


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: Literal["random", "sample_vocab", "text"] = "random"
    init_text: str | None = None  # init="text": tokenized with tokenizer_name_or_path
    tokenizer_name_or_path: str | None = None

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init not in ("random", "sample_vocab", "text"):
            raise ValueError(f"init must be 'random', 'sample_vocab' or 'text', got {self.init!r}")
        if self.init == "text" and not (self.init_text and self.tokenizer_name_or_path):
            raise ValueError("init='text' needs init_text and tokenizer_name_or_path (the "
                             "tokenizer of the base model)")


@dataclasses.dataclass(frozen=True)
class PTuningConfig:
    num_virtual_tokens: int = 20
    encoder_hidden_size: int | None = None  # None: the model width d, PEFT's default
    encoder_reparameterization_type: Literal["MLP"] = "MLP"

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got "
                             f"{self.encoder_hidden_size}")
        if self.encoder_reparameterization_type != "MLP":
            raise ValueError(f"encoder_reparameterization_type "
                             f"{self.encoder_reparameterization_type!r} is not supported; only "
                             "'MLP' (PEFT's recommended encoder)")


def text_token_ids(token_ids: list[int], n: int) -> list[int]:
    """PEFT's PromptEmbedding: the init text's ids truncated, or repeated, to n."""
    if not token_ids:
        raise ValueError("init_text tokenizes to no tokens")
    return (token_ids * math.ceil(n / len(token_ids)))[:n]


def init(base: dict, cfg: PromptTuningConfig | PTuningConfig, key: jax.Array,
         ctx: Context) -> dict:
    """A new tree with the float32 prompt (or P-tuning encoder) at the top;
    the text init tokenizes through `ctx.tokenize`."""
    vocab = base["embed_tokens"]
    p, d = cfg.num_virtual_tokens, vocab.shape[1]
    k_emb, k_in, k_mid, k_out = jax.random.split(key, 4)
    if isinstance(cfg, PTuningConfig):
        h = cfg.encoder_hidden_size or d
        dense_in, dense_in_bias = torch_linear(k_in, d, h)
        dense_mid, dense_mid_bias = torch_linear(k_mid, h, h)
        dense_out, dense_out_bias = torch_linear(k_out, h, d)
        return {**base, ENCODER: {
            "embedding": jax.random.normal(k_emb, (p, d), jnp.float32),
            "dense_in": dense_in, "dense_in_bias": dense_in_bias,
            "dense_mid": dense_mid, "dense_mid_bias": dense_mid_bias,
            "dense_out": dense_out, "dense_out_bias": dense_out_bias}}
    if cfg.init == "random":
        prompts = jax.random.normal(k_emb, (p, d), jnp.float32)
    else:
        if cfg.init == "sample_vocab":
            ids = jax.random.randint(k_emb, (p,), 0, vocab.shape[0])
        else:
            if ctx.tokenize is None:
                raise ValueError("init='text' needs a tokenizer; inject through fa.inject, "
                                 "which provides one")
            ids = jnp.asarray(text_token_ids(
                ctx.tokenize(cfg.tokenizer_name_or_path, cfg.init_text), p))
        prompts = qarray.take(vocab, ids, jnp.float32)
        if ctx.presets.embedding_scale is not None:  # rows as the embedding module gives them
            prompts = prompts * jnp.float32(ctx.presets.embedding_scale(d))
    return {**base, EMBEDDINGS: prompts}


def encode(encoder: dict) -> jax.Array:
    """PEFT's P-tuning MLP head: the prompts (P, d)."""
    h = jax.nn.relu(encoder["embedding"] @ encoder["dense_in"] + encoder["dense_in_bias"])
    h = jax.nn.relu(h @ encoder["dense_mid"] + encoder["dense_mid_bias"])
    return h @ encoder["dense_out"] + encoder["dense_out_bias"]


def prompts(embeddings: jax.Array | None, encoder: dict | None) -> jax.Array | None:
    """The virtual tokens' input embeddings (P, d) from whichever leaf is present."""
    if embeddings is not None and encoder is not None:
        raise ValueError("the tree holds both prompt_embeddings and a prompt_encoder; keep one")
    return encode(encoder) if encoder is not None else embeddings


def fold(tree: dict) -> dict:
    """A P-tuning tree in prompt-tuning form (the encoder replaced by its
    output, for inference); any other tree unchanged."""
    if ENCODER not in tree:
        return tree
    rest = {k: v for k, v in tree.items() if k != ENCODER}
    return {**rest, EMBEDDINGS: encode(tree[ENCODER])}


# ----------------------------------------------------------------------------- PEFT schema

def to_json(cfg: PromptTuningConfig | PTuningConfig, adapter: dict, peft_targets) -> dict:
    """PEFT's PROMPT_TUNING or P_TUNING fields (a P-tuning prompt is saved
    folded, as PEFT saves it)."""
    del peft_targets
    p, d = to_tensors(adapter, cfg)["prompt_embeddings"].shape
    # PEFT fills the base model's layer and head counts when it loads.
    common = {"num_virtual_tokens": p, "token_dim": d, "num_transformer_submodules": 1,
              "num_attention_heads": None, "num_layers": None}
    if isinstance(cfg, PTuningConfig):
        return {**common, "encoder_reparameterization_type": "MLP",
                "encoder_hidden_size": cfg.encoder_hidden_size or d, "encoder_num_layers": 2,
                "encoder_dropout": 0.0}
    return {**common, "prompt_tuning_init": cfg.init.upper(),
            "prompt_tuning_init_text": cfg.init_text,
            "tokenizer_name_or_path": cfg.tokenizer_name_or_path, "tokenizer_kwargs": None}


def to_tensors(adapter: dict, cfg: PromptTuningConfig | PTuningConfig) -> dict:
    """One `prompt_embeddings` (P, d): the encoder's output for P-tuning."""
    del cfg
    emb = prompts(adapter.get(EMBEDDINGS), adapter.get(ENCODER))
    if emb is None:
        raise ValueError("the tree holds no prompt (no prompt_embeddings or prompt_encoder)")
    return {"prompt_embeddings": np.asarray(jax.device_get(emb), np.float32)}


def _check_shape(config: dict, tensors: dict, base: dict) -> None:
    p, d = int(config["num_virtual_tokens"]), base["embed_tokens"].shape[1]
    if config.get("num_transformer_submodules") not in (None, 1):
        raise ValueError("an encoder-decoder prompt (num_transformer_submodules=2) does not "
                         "fit a decoder-only model")
    got = tuple(tensors["prompt_embeddings"].shape)
    if got != (p, d):
        raise ValueError(f"prompt_embeddings has shape {got}, but this base model needs "
                         f"({p}, {d}); was it trained on another model?")


def from_json(config: dict, tensors: dict, base: dict) -> PromptTuningConfig | PTuningConfig:
    _check_shape(config, tensors, base)
    p = int(config["num_virtual_tokens"])
    if config["peft_type"] == "P_TUNING":
        return PTuningConfig(num_virtual_tokens=p,
                             encoder_hidden_size=config.get("encoder_hidden_size"),
                             encoder_reparameterization_type=config.get(
                                 "encoder_reparameterization_type", "MLP"))
    init_ = str(config.get("prompt_tuning_init") or "RANDOM").lower()
    text, tok = config.get("prompt_tuning_init_text"), config.get("tokenizer_name_or_path")
    return PromptTuningConfig(num_virtual_tokens=p,
                              init=init_ if init_ != "text" or (text and tok) else "random",
                              init_text=text, tokenizer_name_or_path=tok)


def from_tensors(config: dict, tensors: dict, base: dict) -> dict:
    """base + the prompt (a P-tuning adapter arrives folded, as PEFT saves it)."""
    _check_shape(config, tensors, base)
    return {**base, EMBEDDINGS: jnp.asarray(np.asarray(tensors["prompt_embeddings"],
                                                       np.float32))}


def _schema(peft_type: str) -> Schema:
    return Schema(peft_type=peft_type, loader="PEFT", to_json=to_json, from_json=from_json,
                  to_tensors=to_tensors, from_tensors=from_tensors)


register(Method(name="prompt", config=PromptTuningConfig, leaves=frozenset({EMBEDDINGS}),
                init=init, schema=_schema("PROMPT_TUNING")))
register(Method(name="p_tuning", config=PTuningConfig, leaves=frozenset({EMBEDDINGS, ENCODER}),
                init=init, schema=_schema("P_TUNING")))
