"""The adapter methods behind one interface, dispatched on the config type.

    tree = inject(base, cfg, key, model_type)      # base + adapter leaves
    model = LlamaForCausalLM(mcfg, settings=settings_for(cfg))
    frozen, trainable = split(tree, trainable(cfg))  # train `trainable` only
    base2 = merge(tree, cfg)                       # mergeable methods only
    tree2 = unmerge(base2, trainable, cfg)         # == tree, to rounding
    params = materialize(combine(frozen, trainable))  # what model.apply reads

`materialize` computes what a reparameterised adapter feeds the model (the
per-layer prefixes of prefix tuning with projection); it is the identity
for every other tree, and differentiable, so a loss can always call it.

`trainable(cfg)` picks the adapter leaves, plus the base modules of
`cfg.modules_to_save` (saved.py), or every leaf for full fine-tuning
(full.py). A quantized base (quant/) works with every method; merging into
it is refused (see `merge`).

Named adapters share one base: `adapters = {'math': (cfg, trainable), ...}`
and `activate(base, adapters, 'math')` gives the tree and settings to run.
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

import jax

from flax_adapters.adapters import bottleneck, dora, full, ia3, lora, prefix, prompt, saved, sites
from flax_adapters.adapters.tree import combine, split
from flax_adapters.quant.params import quantized_leaves

AdapterConfig = Union[lora.LoraConfig, ia3.IA3Config, bottleneck.BottleneckConfig,
                      prefix.PrefixConfig, prompt.PromptTuningConfig, prompt.PTuningConfig,
                      full.FullConfig]

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
    "full": full.FullConfig,  # full fine-tuning, the paper's baseline
}


def _method(cfg):
    if isinstance(cfg, lora.LoraConfig) and cfg.use_dora:
        return dora
    for cls, module in ((lora.LoraConfig, lora), (ia3.IA3Config, ia3),
                        (bottleneck.BottleneckConfig, bottleneck), (prefix.PrefixConfig, prefix),
                        (prompt.PromptTuningConfig, prompt), (prompt.PTuningConfig, prompt),
                        (full.FullConfig, full)):
        if isinstance(cfg, cls):
            return module
    raise TypeError(f"unknown adapter config type {type(cfg).__name__}")


def inject(base: dict, cfg: AdapterConfig, key: jax.Array, model_type: str = "llama") -> dict:
    """A new tree: `base` with freshly initialised adapter leaves at the sites.
    `cfg.modules_to_save` is checked against it (saved.check)."""
    tree = _method(cfg).init(base, cfg, key, model_type)
    saved.check(tree, getattr(cfg, "modules_to_save", ()), model_type)
    return tree


def trainable(cfg: AdapterConfig, model_type: str = "llama"
              ) -> Callable[[tuple[str, ...]], bool]:
    """The predicate `tree.split` trains: the adapter leaves and the base
    leaves of `cfg.modules_to_save` (named as in `model_type`'s Hugging Face
    model); every leaf for full fine-tuning."""
    if isinstance(cfg, full.FullConfig):
        return full.trainable
    return saved.trainable(getattr(cfg, "modules_to_save", ()), model_type)


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
    if isinstance(cfg, full.FullConfig):
        return sites.Settings()
    raise TypeError(f"unknown adapter config type {type(cfg).__name__}")


def materialize(tree: dict) -> dict:
    """The tree `model.apply` reads (see the module docstring)."""
    return prefix.materialize(tree)


def merge(tree: dict, cfg: AdapterConfig) -> dict:
    """Folds a mergeable adapter into the base kernels; a plain base tree.

    A quantized base is refused rather than merged and re-quantized: the
    re-quantization would round the adapter's small delta away (PEFT's
    bitsandbytes merge does that, lossily). Dequantize first, then merge:
    `merge(quant.params.dequantize_params(tree), cfg)` gives a float model."""
    module = _method(cfg)
    if not hasattr(module, "merge"):
        raise ValueError(f"{type(cfg).__name__} adapters cannot be merged into the base weights")
    _refuse_quantized(tree, "merge")
    return module.merge(tree, cfg)


def _refuse_quantized(tree: dict, what: str) -> None:
    quantized = quantized_leaves(tree)
    if quantized:
        raise ValueError(f"cannot {what} into a quantized base ({len(quantized)} quantized "
                         f"weights, e.g. {quantized[0]}): re-quantizing would round the "
                         "adapter away. Dequantize first: quant.params.dequantize_params(tree)")


def unmerge(merged: dict, adapter: dict, cfg: AdapterConfig, *,
            dora_norms: dict | None = None) -> dict:
    """Inverse of `merge`: takes the merged base and the adapter (the adapted
    tree or just its trainable part) and returns the adapted tree again.
    DoRA also needs `dora_norms = dora.weight_norms(tree, cfg)`, taken before
    the merge (see dora.py for why)."""
    module = _method(cfg)
    if not hasattr(module, "unmerge"):
        raise ValueError(f"{type(cfg).__name__} adapters cannot be unmerged")
    _refuse_quantized(merged, "unmerge")
    if module is dora:
        return dora.unmerge(merged, adapter, cfg, dora_norms)
    return module.unmerge(merged, adapter, cfg)


def activate(base: dict, adapters: Mapping[str, tuple[AdapterConfig, dict]],
             name: str, model_type: str = "llama") -> tuple[dict, sites.Settings]:
    """Selects one of several named adapters on a shared base:
    {name: (cfg, trainable tree)} -> (base + that adapter's leaves, its settings)."""
    if name not in adapters:
        raise KeyError(f"no adapter named {name!r}; the adapters are {sorted(adapters)}")
    cfg, leaves = adapters[name]
    # Base modules this adapter trains (modules_to_save) come from its own leaves.
    return (combine(split(base, trainable(cfg, model_type)).frozen, leaves),
            settings_for(cfg, model_type))
