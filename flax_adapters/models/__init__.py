"""Flax model families."""

from flax_adapters.models.bloom import BloomConfig, BloomForCausalLM
from flax_adapters.models.config import LlamaConfig, RopeScaling
from flax_adapters.models.gpt_neox import GPTNeoXConfig, GPTNeoXForCausalLM
from flax_adapters.models.gptj import GPTJConfig, GPTJForCausalLM
from flax_adapters.models.llama import LlamaForCausalLM
from flax_adapters.models.opt import OPTConfig, OPTForCausalLM
from flax_adapters.models.registry import (SUPPORTED_MODEL_TYPES, abstract_params,
                                           config_from_hf, init_cache, logical_axes,
                                           model_class)

__all__ = ["LlamaConfig", "RopeScaling", "SUPPORTED_MODEL_TYPES", "LlamaForCausalLM",
           "BloomConfig", "BloomForCausalLM", "OPTConfig", "OPTForCausalLM", "GPTJConfig",
           "GPTJForCausalLM", "GPTNeoXConfig", "GPTNeoXForCausalLM", "abstract_params",
           "config_from_hf", "init_cache", "logical_axes", "model_class"]
