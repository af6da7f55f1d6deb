"""The adapter methods, each registered once.

A method file (lora.py, ia3.py, ...) ends with one `register(Method(...))`
that says everything the rest of the library needs to know about it: its
config class, the leaves it adds (the allowlist of what trains), how to
initialise it, the static settings the model's sites read, whether and how
it merges, and its on-disk schema (`Schema`: the PEFT-style
adapter_config.json fields and tensors). Everything else -- `api.inject`,
`api.trainable`, `api.merge`, `checkpoints.save_adapter` /
`load_adapter`, `python -m train`'s `adapter.method` -- reads this table,
so a new method is one file plus its registration (and, at most, a branch
at a site in sites.py).

    method = method_of(LoraConfig(r=8))    # the Method registered for that config
    method.init(base, cfg, key, ctx)       # base + the method's leaves
    is_adapter_path(('layers_0', 'self_attn', 'q_proj', 'lora_a'))  -> True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from flax_adapters.adapters.targeting import Context, Presets
from flax_adapters.tree import Path


@dataclasses.dataclass(frozen=True)
class Schema:
    """How a method's adapter is written as a PEFT-style directory
    (`adapter_config.json` + `adapter_model.safetensors`; the file IO and
    the Hugging Face module names are checkpoints/adapter.py's).

    peft_type: the config's `peft_type` ("LORA", ... "BOTTLENECK").
    loader: who reads the directory in PyTorch ("PEFT" or "LLM-Adapters").
    site_tensors: {our leaf: PEFT key suffix} of the tensors kept per
      adapted module (`<module>.<suffix>`; 2-D leaves are transposed into
      PyTorch's layout); aliases: {other suffix: our leaf}, read on import.
    to_json(cfg, adapter, peft_targets) -> the method's config fields;
      `peft_targets(spec, sites)` spells a target spec as PEFT matches it.
    from_json(config, found, base) -> the config; `found` is {site: {leaf:
      array}} (site tensors) or {name: array} (whole tensors).
    to_tensors / from_tensors: methods whose tensors are not per module
      (prompt and prefix tuning: one `prompt_embeddings`).
    """

    peft_type: str
    loader: str
    to_json: Callable[..., dict]
    from_json: Callable[..., Any]
    site_tensors: Mapping[str, str] = dataclasses.field(default_factory=dict)
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    to_tensors: Callable[[dict, Any], dict] | None = None
    from_tensors: Callable[[dict, dict, dict], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """One adapter method (see the module docstring).

    leaves: names of the leaves, or of the top-level subtrees, the method
      adds; a path through any of them is trainable (`is_adapter_path`).
    init(base, cfg, key, ctx) -> the base tree plus fresh adapter leaves.
    settings(cfg, presets) -> `sites.Settings` fields for the forward pass.
    merge(tree, cfg) -> a plain base tree; unmerge(merged, adapter, cfg,
      **extra) -> the adapted tree again; None where the method cannot.
    materialize(tree) -> the tree the model reads (a reparameterised
      method computes its leaves here); None: the identity.
    trains_base: every base leaf is trainable (full fine-tuning).
    schema: the on-disk format; None when the trained tree is a model
      (full fine-tuning exports a Hugging Face model directory).
    """

    name: str
    config: type
    leaves: frozenset[str]
    init: Callable[[dict, Any, jax.Array, Context], dict]
    settings: Callable[[Any, Presets], dict] = lambda cfg, presets: {}
    merge: Callable[[dict, Any], dict] | None = None
    unmerge: Callable[..., dict] | None = None
    materialize: Callable[[dict], dict] | None = None
    trains_base: bool = False
    schema: Schema | None = None


METHODS: dict[str, Method] = {}
_BY_CONFIG: dict[type, Method] = {}
_BY_PEFT_TYPE: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds `method` to the table (each name, config class and peft_type once)."""
    if method.name in METHODS or method.config in _BY_CONFIG:
        raise ValueError(f"adapter method {method.name!r} ({method.config.__name__}) is "
                         "registered twice")
    METHODS[method.name] = method
    _BY_CONFIG[method.config] = method
    if method.schema is not None:
        if method.schema.peft_type in _BY_PEFT_TYPE:
            raise ValueError(f"peft_type {method.schema.peft_type!r} is registered twice")
        _BY_PEFT_TYPE[method.schema.peft_type] = method
    return method


def method_of(cfg: Any) -> Method:
    """The method a config object belongs to."""
    method = _BY_CONFIG.get(type(cfg))
    if method is None:
        raise TypeError(f"{type(cfg).__name__} is not an adapter config; the methods are "
                        f"{', '.join(f'{m.name} ({m.config.__name__})' for m in METHODS.values())}")
    return method


def by_name(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown adapter method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def by_peft_type(peft_type: Any) -> Method:
    if peft_type not in _BY_PEFT_TYPE:
        raise ValueError(f"adapter type {peft_type!r} is not supported; supported: "
                         f"{', '.join(_BY_PEFT_TYPE)}")
    return _BY_PEFT_TYPE[peft_type]


def adapter_leaf_names() -> frozenset[str]:
    """Every leaf (or subtree) name a registered method adds."""
    return frozenset().union(*(m.leaves for m in METHODS.values()))


def is_adapter_path(path: Path) -> bool:
    """Whether a leaf path runs through a name some method declared."""
    names = adapter_leaf_names()
    return any(p in names for p in path)
