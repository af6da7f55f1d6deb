"""PyTorch's default initialisations, for methods whose reference (PEFT)
builds its adapter from torch modules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def torch_linear(key: jax.Array, fan_in: int, fan_out: int) -> tuple[jax.Array, jax.Array]:
    """torch.nn.Linear's default init as (kernel (in, out), bias (out,)), both
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform_ with a=sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)
    k_w, k_b = jax.random.split(key)
    return (jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound, bound),
            jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound))
