"""The adapter methods behind one interface, dispatched on the config type.

    tree = inject(base, cfg, key, model_type)      # base + adapter leaves
    model = LlamaForCausalLM(mcfg, settings=settings_for(cfg))
    frozen, trainable = split(tree)                # train `trainable` only
    base2 = merge(tree, cfg)                       # mergeable methods only
    tree2 = unmerge(base2, trainable, cfg)         # == tree, to rounding
    params = materialize(combine(frozen, trainable))  # what model.apply reads

`materialize` computes what a reparameterised adapter feeds the model (the
per-layer prefixes of prefix tuning with projection); it is the identity
for every other tree, and differentiable, so a loss can always call it.

Named adapters share one base: `adapters = {'math': (cfg, trainable), ...}`
and `activate(base, adapters, 'math')` gives the tree and settings to run.
"""

from __future__ import annotations

from typing import Mapping, Union

import jax

from flax_adapters.adapters import bottleneck, dora, ia3, lora, prefix, prompt, sites
from flax_adapters.adapters.tree import combine

AdapterConfig = Union[lora.LoraConfig, ia3.IA3Config, bottleneck.BottleneckConfig,
                      prefix.PrefixConfig, prompt.PromptTuningConfig, prompt.PTuningConfig]

# The methods by name, for configs and the command line. Each entry is the
# method's config class; the name is what `adapter.method` says.
METHODS: dict[str, type] = {
    "lora": lora.LoraConfig,  # DoRA is LoRA with use_dora=True, as in PEFT
    "ia3": ia3.IA3Config,
    # AdapterH / AdapterP / parallel: use_adapterp, use_parallel_adapter
    "bottleneck": bottleneck.BottleneckConfig,
    "prefix": prefix.PrefixConfig,
    "prompt": prompt.PromptTuningConfig,
    "p_tuning": prompt.PTuningConfig,
}


def _method(cfg):
    if isinstance(cfg, lora.LoraConfig) and cfg.use_dora:
        return dora
    for cls, module in ((lora.LoraConfig, lora), (ia3.IA3Config, ia3),
                        (bottleneck.BottleneckConfig, bottleneck), (prefix.PrefixConfig, prefix),
                        (prompt.PromptTuningConfig, prompt), (prompt.PTuningConfig, prompt)):
        if isinstance(cfg, cls):
            return module
    raise TypeError(f"unknown adapter config type {type(cfg).__name__}")


def inject(base: dict, cfg: AdapterConfig, key: jax.Array, model_type: str = "llama") -> dict:
    """A new tree: `base` with freshly initialised adapter leaves at the sites."""
    return _method(cfg).init(base, cfg, key, model_type)


def settings_for(cfg: AdapterConfig | None, model_type: str = "llama") -> sites.Settings:
    """The static hyperparameters the model's sites need for `cfg`."""
    if cfg is None:
        return sites.Settings()
    if isinstance(cfg, lora.LoraConfig):
        return sites.Settings(lora_scale=cfg.scale, lora_dropout=cfg.dropout)
    if isinstance(cfg, ia3.IA3Config):
        return sites.Settings()  # the leaves' shapes say everything (ia3.py)
    if isinstance(cfg, bottleneck.BottleneckConfig):
        return sites.Settings(**bottleneck.settings_kwargs(cfg, model_type))
    if isinstance(cfg, prefix.PrefixConfig):
        return sites.Settings(prefix_tokens=cfg.num_virtual_tokens)
    if isinstance(cfg, (prompt.PromptTuningConfig, prompt.PTuningConfig)):
        return sites.Settings()  # the prompt's shape says everything (prompt.py)
    raise TypeError(f"unknown adapter config type {type(cfg).__name__}")


def materialize(tree: dict) -> dict:
    """The tree `model.apply` reads (see the module docstring)."""
    return prefix.materialize(tree)


def merge(tree: dict, cfg: AdapterConfig) -> dict:
    """Folds a mergeable adapter into the base kernels; a plain base tree."""
    module = _method(cfg)
    if not hasattr(module, "merge"):
        raise ValueError(f"{type(cfg).__name__} adapters cannot be merged into the base weights")
    return module.merge(tree, cfg)


def unmerge(merged: dict, adapter: dict, cfg: AdapterConfig, *,
            dora_norms: dict | None = None) -> dict:
    """Inverse of `merge`: takes the merged base and the adapter (the adapted
    tree or just its trainable part) and returns the adapted tree again.
    DoRA also needs `dora_norms = dora.weight_norms(tree, cfg)`, taken before
    the merge (see dora.py for why)."""
    module = _method(cfg)
    if not hasattr(module, "unmerge"):
        raise ValueError(f"{type(cfg).__name__} adapters cannot be unmerged")
    if module is dora:
        return dora.unmerge(merged, adapter, cfg, dora_norms)
    return module.unmerge(merged, adapter, cfg)


def activate(base: dict, adapters: Mapping[str, tuple[AdapterConfig, dict]],
             name: str, model_type: str = "llama") -> tuple[dict, sites.Settings]:
    """Selects one of several named adapters on a shared base:
    {name: (cfg, trainable tree)} -> (base + that adapter's leaves, its settings)."""
    if name not in adapters:
        raise KeyError(f"no adapter named {name!r}; the adapters are {sorted(adapters)}")
    cfg, trainable = adapters[name]
    return combine(base, trainable), settings_for(cfg, model_type)
