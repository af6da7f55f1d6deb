"""Full fine-tuning as an adapter method: every parameter of the base is
trainable. It is the baseline the LLM-Adapters paper compares adapters
against (arXiv:2304.01933), run through the same loop, checkpoints and
step as every adapter, so the comparison changes one config field
(`adapter.method=full`).

    before: base tree            after: the same tree (nothing is added)
    api.split(tree, FullConfig(), model_type) -> (frozen={}, trainable=tree)

The trained tree is the model itself, so `merge` returns it unchanged and
the export is a Hugging Face model directory (checkpoints/hf.py), not an
adapter. A quantized base cannot be trained: full fine-tuning needs the
float weights.
"""

from __future__ import annotations

import dataclasses

import jax

from flax_adapters.adapters.registry import Method, register
from flax_adapters.adapters.targeting import Context
from flax_adapters.quant.array import quantized_leaves


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """No hyperparameters: the optimiser's settings are the whole method."""


def init(base: dict, cfg: FullConfig, key: jax.Array, ctx: Context) -> dict:
    """The base tree itself (checked to be trainable); `key` is unused."""
    del cfg, key, ctx
    quantized = quantized_leaves(base)
    if quantized:
        raise ValueError(f"full fine-tuning trains every weight, but {len(quantized)} are "
                         f"quantized (e.g. {quantized[0]}); load the base in float "
                         "(model.quantize=none)")
    return base


register(Method(name="full", config=FullConfig, leaves=frozenset(), init=init,
                merge=lambda tree, cfg: tree, trains_base=True))
