"""The model families by name: one plain table from `model_type` (as in a
Hugging Face config.json) to the family's config class, Flax module and
Hugging Face parameter names. Everything that builds a model from a loaded
config (train, eval, generate, checkpoint loading, PEFT I/O) goes through
these functions, so every family runs through the same code.

    cfg = config_from_hf(json.load(open("config.json")))   # BloomConfig, OPTConfig, ...
    model = model_class(cfg)(cfg, settings=...)            # BloomForCausalLM, ...
    cache = init_cache(cfg, batch, max_len)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.adapters.targeting import Presets
from flax_adapters.models import bloom, gpt_neox, gptj, llama, opt
from flax_adapters.models import phi3
from flax_adapters.models import gemma
from flax_adapters.models import moe
from flax_adapters.models.config import SUPPORTED_MODEL_TYPES as LLAMA_TYPES
from flax_adapters.models.config import LlamaConfig
from flax_adapters.models.decoder import init_cache


@dataclasses.dataclass(frozen=True)
class Family:
    config: type
    module: type[nn.Module]
    hf_names: Mapping[str, Any]  # see names.py
    presets: Presets  # the adapter methods' default targets (adapters/targeting.py)


def _family(file: Any, config: type, module: type[nn.Module]) -> Family:
    return Family(config, module, file.HF_NAMES, file.PRESETS)


_LLAMA = _family(llama, LlamaConfig, llama.LlamaForCausalLM)
_QWEN = dataclasses.replace(_LLAMA, presets=llama.QWEN_PRESETS)  # LLaMA with PEFT's Qwen IA3
FAMILIES: dict[str, Family] = {
    **{t: _LLAMA for t in LLAMA_TYPES}, "qwen2": _QWEN, "qwen3": _QWEN,
    "bloom": _family(bloom, bloom.BloomConfig, bloom.BloomForCausalLM),
    "opt": _family(opt, opt.OPTConfig, opt.OPTForCausalLM),
    "gptj": _family(gptj, gptj.GPTJConfig, gptj.GPTJForCausalLM),
    "gpt_neox": _family(gpt_neox, gpt_neox.GPTNeoXConfig, gpt_neox.GPTNeoXForCausalLM),
    "phi3": _family(phi3, phi3.Phi3Config, phi3.Phi3ForCausalLM),
    **{t: _family(gemma, gemma.GemmaConfig, gemma.GemmaForCausalLM) for t in gemma.MODEL_TYPES},
    **{t: Family(moe.MoeConfig, moe.MoeForCausalLM, moe.HF_NAMES[t], moe.PRESETS[t])
       for t in moe.MODEL_TYPES},  # Mixtral, Qwen3-MoE: the names and presets differ
}
# model_type -> why it is refused (a known model this library does not run).
_REFUSED: dict[str, str] = {**gemma.REFUSED}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family(model_type: str) -> Family:
    if model_type in _REFUSED:
        raise ValueError(_REFUSED[model_type])
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return FAMILIES[model_type]


def config_from_hf(hf: Mapping[str, Any]) -> Any:
    """Our config of a Hugging Face config.json (as a dict), by its model_type."""
    return family(hf.get("model_type")).config.from_hf(hf)


def model_class(cfg: Any) -> type[nn.Module]:
    """The Flax causal-LM module of a config (of any family)."""
    return family(cfg.model_type).module


def _abstract_init(cfg: Any) -> dict:
    return jax.eval_shape(lambda: model_class(cfg)(cfg).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))


def abstract_params(cfg: Any) -> dict:
    """The base tree's shapes, without allocating (jax.eval_shape of init)."""
    return nn.unbox(_abstract_init(cfg))["params"]


def logical_axes(cfg: Any) -> dict:
    """The base tree's logical axis names, e.g. {'embed_tokens': ('vocab', 'embed'),
    'layers_0': {'self_attn': {'q_proj': {'kernel': ('embed', 'heads')}}}, ...}."""
    specs = nn.get_partition_spec(_abstract_init(cfg))["params"]
    return jax.tree_util.tree_map(lambda s: tuple(s), specs,
                                  is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "Family", "abstract_params", "config_from_hf",
           "family", "init_cache", "logical_axes", "model_class"]
