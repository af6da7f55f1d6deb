"""Quantizing the frozen base tree: which leaves, along which axis.

    quantize_params(params, QuantConfig("nf4")) -> tree
    before: {'layers_0': {'self_attn': {'q_proj': {'kernel': W (in, out) float}}},
             'embed_tokens': E (v, d), 'norm': {'scale': (d,)}, ...}
    after:  {'layers_0': {'self_attn': {'q_proj': {'kernel': QuantizedArray (in, out)}}},
             'embed_tokens': QuantizedArray (v, d), 'norm': {'scale': (d,)}, ...}

Quantized: every linear kernel (blocks along its input axis, the axis it
contracts), and with `embeddings` the family's embedding table and output
head (blocks along the model width d). Norm scales and biases stay float:
they are tiny and numerically delicate. QLoRA / bitsandbytes keep the
embeddings and the head in 16 bits; on a small model with a large
vocabulary (SmolLM2-135M: the tied 49152 x 576 table is 21% of the
weights) that alone would be 40% of the bfloat16 model, so they are
quantized by default here -- set `embeddings=False` to follow bitsandbytes.
`skip` keeps modules in float, named as PEFT names modules (a plain
suffix of the module name, as modules_to_save; see models/names.py):
modules that are trained must not be quantized.

Only the layers that read their weights through quant/array.py's ops can
hold a quantized leaf: every `Linear` does, so every family's kernels can
be quantized, and so can every family's embeddings and head (EMBEDDINGS).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from flax_adapters.models import names
from flax_adapters.quant.array import KINDS, dequantize, is_quantized, quantize

# Top-level leaf -> the axis its blocks run along. Every family reads these
# through models/decoder.py, i.e. quant.array.take (rows of the table: blocks
# along d) and quant.array.apply (the head). Other top-level leaves (OPT's
# learned positions, GPT-J's head bias) stay float.
EMBEDDINGS: dict[str, int] = {"embed_tokens": 1, "lm_head": 0}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    kind: str = "nf4"  # "nf4" or "int8"
    block_size: int = 64  # nf4: values per absmax (QLoRA: 64)
    double_quant: bool = True  # nf4: quantize the absmax values too (QLoRA)
    embeddings: bool = True  # also the embedding table and output head
    skip: tuple[str, ...] = ()  # module names kept in float (PEFT-style suffixes)
    model_type: str | None = None  # whose module names `skip` matches (loading sets it)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown quantization {self.kind!r}; choose one of "
                             f"{', '.join(KINDS)} (or none)")
        if self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"quantization block_size must be even and >= 2, got "
                             f"{self.block_size}")
        object.__setattr__(self, "skip", tuple(self.skip))


def quant_axis(path: tuple[str, ...], cfg: QuantConfig) -> int | None:
    """The axis leaf `path` of a base tree is quantized along, or None to keep it."""
    if cfg.skip:
        if cfg.model_type is None:
            raise ValueError("QuantConfig.skip names modules by their Hugging Face names, which "
                             "depend on the model family: set QuantConfig.model_type")
        if names.selects(cfg.skip, path, cfg.model_type):
            return None
    if path[-1] == "kernel":
        return 0
    if len(path) == 1 and cfg.embeddings:
        return EMBEDDINGS.get(path[0])
    return None


def quantize_leaf(path: tuple[str, ...], value: Any, cfg: QuantConfig | None,
                  dtype: Any = None) -> Any:
    """`value` quantized if `cfg` says leaf `path` is (dequantizing to `dtype`,
    default value's), else `value` itself."""
    axis = None if cfg is None else quant_axis(path, cfg)
    if axis is None:
        return value
    return quantize(value, cfg.kind, axis, cfg.block_size, cfg.double_quant, dtype)


def quantize_params(params: dict, cfg: QuantConfig) -> dict:
    """A new tree with the leaves `cfg` selects quantized (module docstring)."""
    def walk(node: dict, prefix: tuple[str, ...]) -> dict:
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out[k] = walk(v, prefix + (k,))
            elif is_quantized(v):
                out[k] = v
            else:
                out[k] = quantize_leaf(prefix + (k,), v, cfg)
        return out
    return walk(params, ())


def dequantize_params(tree: Any, dtype: Any = None) -> Any:
    """A new tree with every QuantizedArray replaced by its float array (in
    `dtype`, default the dtype it was quantized from)."""
    return jax.tree_util.tree_map(lambda x: _dequantize(x, dtype) if is_quantized(x) else x,
                                  tree, is_leaf=is_quantized)


# Compiled once per shape: op-by-op dispatch of the unpacking is slow outside jit.
_dequantize = jax.jit(dequantize, static_argnums=1)
