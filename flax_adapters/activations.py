"""Activation functions by transformers' ACT2FN names, for the model
families' MLPs and the bottleneck adapters (LLM-Adapters looks its
`non_linearity` up in ACT2FN). "gelu" is the exact erf form; "gelu_new",
"gelu_pytorch_tanh" and GPT-NeoX-20B's "gelu_fast" are the tanh formula.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The function named `name`; an error listing the supported names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; choose one of "
                         f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
