"""Flax model families."""

from flax_adapters.models.config import LlamaConfig, RopeScaling, SUPPORTED_MODEL_TYPES
from flax_adapters.models.llama import LlamaForCausalLM, init_cache, logical_axes

__all__ = ["LlamaConfig", "RopeScaling", "SUPPORTED_MODEL_TYPES", "LlamaForCausalLM",
           "init_cache", "logical_axes"]
