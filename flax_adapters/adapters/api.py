"""The adapter methods behind one interface, dispatched on the config type.

    tree = inject(base, cfg, key, model_type)      # base + adapter leaves
    model = LlamaForCausalLM(mcfg, settings=settings_for(cfg))
    frozen, trainable = split(tree)                # train `trainable` only
    base2 = merge(tree, cfg)                       # mergeable methods only
"""

from __future__ import annotations

from typing import Union

import jax

from flax_adapters.adapters import lora, sites

AdapterConfig = Union[lora.LoraConfig]


def _method(cfg):
    for cls, module in ((lora.LoraConfig, lora),):
        if isinstance(cfg, cls):
            return module
    raise TypeError(f"unknown adapter config type {type(cfg).__name__}")


def inject(base: dict, cfg: AdapterConfig, key: jax.Array, model_type: str = "llama") -> dict:
    """A new tree: `base` with freshly initialised adapter leaves at the sites."""
    return _method(cfg).init(base, cfg, key, model_type)


def settings_for(cfg: AdapterConfig | None) -> sites.Settings:
    """The static hyperparameters the model's sites need for `cfg`."""
    if cfg is None:
        return sites.Settings()
    if isinstance(cfg, lora.LoraConfig):
        return sites.Settings(lora_scale=cfg.scale, lora_dropout=cfg.dropout)
    raise TypeError(f"unknown adapter config type {type(cfg).__name__}")


def merge(tree: dict, cfg: AdapterConfig) -> dict:
    """Folds a mergeable adapter into the base kernels; a plain base tree."""
    module = _method(cfg)
    if not hasattr(module, "merge"):
        raise ValueError(f"{type(cfg).__name__} adapters cannot be merged into the base weights")
    return module.merge(tree, cfg)
