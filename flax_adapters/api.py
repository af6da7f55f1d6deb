"""The user-level operations over a model family and an adapter method,
dispatched through the method registry (adapters/registry.py):

    tree = inject(base, cfg, key, model_type)        # base + adapter leaves
    model = model_class(mcfg)(mcfg, settings=settings_for(cfg, model_type))
    frozen, trainable = split(tree, cfg, model_type)  # train `trainable` only
    base2 = merge(tree, cfg)                          # mergeable methods only
    tree2 = unmerge(base2, trainable, cfg)            # == tree, to rounding
    params = materialize(combine(frozen, trainable))  # what model.apply reads

or, with the handle that carries them together:

    adapted = adapt(load_pretrained(path), cfg, key)  # .model .params .cfg .model_type
    frozen, trainable = adapted.split()

`model_type` (the Hugging Face config's, `pre.config.model_type`) is an
argument wherever the family changes the result: default targets and
series placements (the family's `Presets`), and modules_to_save, which
names modules as PEFT does, by their Hugging Face names (models/names.py).

Trainable leaves are the ones the methods declare (`is_adapter_path`),
plus the base leaves of `cfg.modules_to_save`, or every leaf for full
fine-tuning: an allowlist, so an unknown leaf is frozen, never trained.

`materialize` computes what a reparameterised adapter feeds the model (the
per-layer prefixes of prefix tuning with projection); it is the identity
for every other tree, and differentiable, so a loss can always call it.

modules_to_save (LoRA, IA3; PEFT's `modules_to_save`, peft/utils/other.py
`_set_trainable` and `ModulesToSaveWrapper`): a module is selected when its
Hugging Face name ends with one of the strings (models/names.py `selects`).
PEFT trains a copy of each selected module while the original stays in the
frozen base; here the selected base leaves themselves are trainable, so no
copy is made and the untouched originals are the base checkpoint itself.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax

from flax_adapters import tree as tree_lib
from flax_adapters.adapters import registry, sites
from flax_adapters.adapters.dora import weight_norms
from flax_adapters.adapters.targeting import Context
from flax_adapters.models import names
from flax_adapters.models.registry import family, model_class
from flax_adapters.quant.array import is_quantized, quantized_leaves
from flax_adapters.tree import Split, combine

AdapterConfig = Any  # an instance of a registered method's config class


@functools.lru_cache(maxsize=8)
def _tokenizer(name_or_path: str):
    from transformers import AutoTokenizer  # tokenizers only, as the DESIGN allows
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)


def _tokenize(name_or_path: str, text: str) -> list[int]:
    return _tokenizer(name_or_path)(text)["input_ids"]


def context(model_type: str) -> Context:
    """What a method's init needs to know of the family (its `Presets`)."""
    return Context(presets=family(model_type).presets, tokenize=_tokenize)


def inject(base: dict, cfg: AdapterConfig, key: jax.Array, model_type: str) -> dict:
    """A new tree: `base` with freshly initialised adapter leaves at the sites.
    `cfg.modules_to_save` is checked against it (`check_modules_to_save`)."""
    out = registry.method_of(cfg).init(base, cfg, key, context(model_type))
    check_modules_to_save(out, getattr(cfg, "modules_to_save", ()), model_type)
    return out


def trainable(cfg: AdapterConfig | None = None, model_type: str | None = None
              ) -> Callable[[tuple[str, ...]], bool]:
    """The predicate `split` trains: the leaves the methods declare, the base
    leaves of `cfg.modules_to_save` (named as in `model_type`'s Hugging Face
    model), or every leaf for full fine-tuning."""
    if cfg is not None and registry.method_of(cfg).trains_base:
        return lambda path: True
    saved = tuple(getattr(cfg, "modules_to_save", ()) or ())
    if not saved:
        return registry.is_adapter_path
    if model_type is None:
        raise ValueError("modules_to_save names modules by their Hugging Face names, which "
                         "depend on the model family: pass model_type")
    return lambda path: registry.is_adapter_path(path) or names.selects(saved, path, model_type)


def split(tree: dict, cfg: AdapterConfig | None = None, model_type: str | None = None) -> Split:
    """(frozen, trainable) parts of an adapted tree (see `trainable`)."""
    return tree_lib.split(tree, trainable(cfg, model_type))


def settings_for(cfg: AdapterConfig | None, model_type: str) -> sites.Settings:
    """The static hyperparameters the model's sites need for `cfg`."""
    if cfg is None:
        return sites.Settings()
    return sites.Settings(**registry.method_of(cfg).settings(cfg, family(model_type).presets))


def materialize(tree: dict) -> dict:
    """The tree `model.apply` reads (see the module docstring)."""
    for method in registry.METHODS.values():
        if method.materialize is not None:
            tree = method.materialize(tree)
    return tree


def _refuse_quantized(tree: dict, what: str) -> None:
    quantized = quantized_leaves(tree)
    if quantized:
        raise ValueError(f"cannot {what} into a quantized base ({len(quantized)} quantized "
                         f"weights, e.g. {quantized[0]}): re-quantizing would round the "
                         "adapter away. Dequantize first: quant.params.dequantize_params(tree)")


def merge(tree: dict, cfg: AdapterConfig) -> dict:
    """Folds a mergeable adapter into the base kernels; a plain base tree.

    A quantized base is refused rather than merged and re-quantized: the
    re-quantization would round the adapter's small delta away (PEFT's
    bitsandbytes merge does that, lossily). Dequantize first, then merge:
    `merge(quant.params.dequantize_params(tree), cfg)` gives a float model."""
    method = registry.method_of(cfg)
    if method.merge is None:
        raise ValueError(f"{type(cfg).__name__} adapters cannot be merged into the base weights")
    _refuse_quantized(tree, "merge")
    return method.merge(tree, cfg)


def dora_norms(tree: dict, cfg: AdapterConfig) -> dict:
    """DoRA's column norms before a merge, which `unmerge` needs (dora.py)."""
    return weight_norms(tree, cfg.scale)


def unmerge(merged: dict, adapter: dict, cfg: AdapterConfig, *,
            dora_norms: dict | None = None) -> dict:
    """Inverse of `merge`: takes the merged base and the adapter (the adapted
    tree or just its trainable part) and returns the adapted tree again.
    DoRA also needs `dora_norms = api.dora_norms(tree, cfg)`, taken before
    the merge (see dora.py for why)."""
    method = registry.method_of(cfg)
    if method.unmerge is None:
        raise ValueError(f"{type(cfg).__name__} adapters cannot be unmerged")
    _refuse_quantized(merged, "unmerge")
    leaves = tree_lib.split(adapter, registry.is_adapter_path).trainable
    extra = {} if dora_norms is None else {"dora_norms": dora_norms}
    return method.unmerge(merged, leaves, cfg, **extra)


def activate(base: dict, adapters: Mapping[str, tuple[AdapterConfig, dict]],
             name: str, model_type: str) -> tuple[dict, sites.Settings]:
    """Selects one of several named adapters on a shared base:
    {name: (cfg, trainable tree)} -> (base + that adapter's leaves, its settings)."""
    if name not in adapters:
        raise KeyError(f"no adapter named {name!r}; the adapters are {sorted(adapters)}")
    cfg, leaves = adapters[name]
    # Base modules this adapter trains (modules_to_save) come from its own leaves.
    return (combine(split(base, cfg, model_type).frozen, leaves),
            settings_for(cfg, model_type))


def trainable_report(tree: dict, cfg: AdapterConfig | None = None,
                     model_type: str | None = None) -> str:
    """Like PEFT's print_trainable_parameters."""
    frozen, train = split(tree, cfg, model_type)
    n_train = tree_lib.num_params(train)
    n_all = tree_lib.num_params(frozen) + n_train
    return (f"trainable params: {n_train:,} || all params: {n_all:,} || "
            f"trainable%: {100 * n_train / max(n_all, 1):.4f}")


def check_modules_to_save(tree: dict, saved: Sequence[str], model_type: str
                          ) -> list[tuple[str, ...]]:
    """The base leaf paths `saved` (modules_to_save) selects in an adapted
    `tree`; an error if a name selects nothing, or a selected module is also
    adapted, quantized or a tied embedding."""
    if not saved:
        return []
    base = [(path, value) for path, value in tree_lib.leaves(tree)
            if not registry.is_adapter_path(path)]
    modules = {path: names.module_of(path, model_type) for path, _ in base}
    chosen = [(p, v) for p, v in base if any(modules[p].endswith(n) for n in saved)]
    for n in saved:
        if not any(modules[p].endswith(n) for p, _ in chosen):
            existing = sorted({m.split(".")[-1] for m in modules.values()})
            raise ValueError(f"modules_to_save {n!r} matches no module that holds weights; "
                             f"the modules are named {existing}")
    for path, value in chosen:
        holder = tree_lib.get(tree, "/".join(path[:-1])) if len(path) > 1 else tree
        if len(path) > 1 and any(registry.is_adapter_path((k,)) and not isinstance(v, dict)
                                 for k, v in holder.items()):
            raise ValueError(f"modules_to_save selects {modules[path]}, which the adapter also "
                             "modifies; a module is either adapted or saved, not both")
        if is_quantized(value):
            raise ValueError(f"modules_to_save selects {modules[path]}, which is quantized and "
                             "so cannot be trained; keep it in float (QuantConfig.skip, which "
                             "python -m train sets to modules_to_save)")
        if path == ("embed_tokens",) and "lm_head" not in tree:
            raise ValueError(f"modules_to_save selects {modules[path]}, but this model ties it "
                             "to the output head; PEFT would train a copy used for the input "
                             "only, which a tied tree cannot hold")
    return [p for p, _ in chosen]


# ----------------------------------------------------------------------------- the handle

@dataclasses.dataclass(frozen=True)
class Adapted:
    """A model family, its parameter tree and the adapter in it, together:
    what `adapt` returns, so that nobody threads four values by hand.

    model: the Flax module, built with the adapter's settings; params: the
    adapted tree; cfg: the adapter config (None: the bare base);
    model_type and config: the family's; tokenizer: the checkpoint's."""

    model: nn.Module
    params: dict
    cfg: AdapterConfig | None
    model_type: str
    config: Any
    tokenizer: Any = None

    def split(self) -> Split:
        """(frozen, trainable): what a train step differentiates."""
        return split(self.params, self.cfg, self.model_type)

    def with_trainable(self, trainable_tree: dict) -> "Adapted":
        """The same model with its trainable leaves replaced (e.g. after training)."""
        return dataclasses.replace(self, params=combine(self.split().frozen, trainable_tree))

    def apply(self, tokens_bt, **kwargs):
        """The model's (logits, cache) on `tokens_bt`, the adapter materialized."""
        return self.model.apply({"params": materialize(self.params)}, tokens_bt, **kwargs)

    def merged(self) -> "Adapted":
        """The adapter folded into the base: a plain model with no adapter code."""
        return adapted_base(merge(self.params, self.cfg), self.config, self.tokenizer)


def adapted_base(params: dict, config: Any, tokenizer: Any = None, **model_kwargs) -> Adapted:
    """A handle on a bare base tree (no adapter)."""
    return Adapted(model_class(config)(config, **model_kwargs), params, None,
                   config.model_type, config, tokenizer)


def adapt(pretrained: Any, cfg: AdapterConfig, key: jax.Array, **model_kwargs) -> Adapted:
    """A fresh `cfg` adapter injected into a loaded base model
    (`load_pretrained(path)`); `model_kwargs` (dtype, remat) go to the module."""
    model_type = pretrained.config.model_type
    params = inject(pretrained.params, cfg, key, model_type)
    model = model_class(pretrained.config)(
        pretrained.config, settings=settings_for(cfg, model_type), **model_kwargs)
    return Adapted(model, params, cfg, model_type, pretrained.config,
                   getattr(pretrained, "tokenizer", None))
