"""Hugging Face names of our parameter trees, per model family.

Each family file states its table (`HF_NAMES`): our top-level entries to
Hugging Face names -- a bare leaf (embed_tokens, lm_head, ...) to its full
tensor name, a module (norm, ln_f, project_in, ...) to its module name --
plus "layers", the prefix of the layer stack (`model.layers` + `.3` <->
`layers_3`), "base_prefix", what checkpoints saved from the bare base model
omit, and "aliases", older names of tensors. Inside a layer our names are
Hugging Face's, so

    'model.layers.0.self_attn.q_proj.weight' <-> ('layers_0', 'self_attn', 'q_proj', 'kernel')

(a kernel transposed to (in, out)). These functions are the one place that
maps names; weights files (checkpoints/hf.py), PEFT-style adapter
directories (checkpoints/adapter.py), modules_to_save and the quantization
skip list (PEFT's suffix rule over module names) all go through them.
"""

from __future__ import annotations

import re
from typing import Sequence

from flax_adapters.models.registry import family

# A module holding a `weight` that is a norm's scale, not a kernel: the names
# the families use (input_layernorm, self_attn_layer_norm, norm, ln_1, ln_f, ...).
_NORM = re.compile(r"(.*layer_?norm|norm|ln_\w+)")
_SPECIAL = ("layers", "base_prefix", "aliases")
_LEAF_KIND = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _names(model_type: str) -> dict:
    return family(model_type).hf_names


def hf_name_to_path(name: str, model_type: str) -> tuple[tuple[str, ...], bool] | None:
    """'model.layers.0.self_attn.q_proj.weight' -> (('layers_0', 'self_attn',
    'q_proj', 'kernel'), transpose=True); None for names we do not know."""
    names = _names(model_type)
    for key, hf in names.items():
        if key not in _SPECIAL and hf == name:  # a bare leaf: only the head is transposed
            return (key,), key == "lm_head"
    module, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    m = re.fullmatch(re.escape(names["layers"]) + r"\.(\d+)\.(.+)", module)
    if m is not None:
        parts = (f"layers_{m.group(1)}", *m.group(2).split("."))
    else:
        top = [k for k, hf in names.items() if k not in _SPECIAL and hf == module]
        if not top:
            return None
        parts = (top[0],)
    if kind == "bias":
        return (*parts, "bias"), False
    if _NORM.fullmatch(parts[-1]):
        return (*parts, "scale"), False
    return (*parts, "kernel"), True


def path_to_hf_name(path: tuple[str, ...], model_type: str) -> str:
    """Inverse of `hf_name_to_path` for base parameters."""
    names = _names(model_type)
    head, *rest = path
    if not rest:
        return names[head]
    leaf = _LEAF_KIND[rest[-1]]
    if head.startswith("layers_"):
        return ".".join([names["layers"], head.removeprefix("layers_"), *rest[:-1], leaf])
    return ".".join([names[head], *rest[:-1], leaf])


def canonical(name: str, model_type: str) -> tuple[tuple[str, ...], bool] | None:
    """`hf_name_to_path` of a checkpoint's tensor name, also under its
    family's aliases and with the base-model prefix that checkpoints of the
    bare model omit."""
    names = _names(model_type)
    name = names.get("aliases", {}).get(name, name)
    mapped = hf_name_to_path(name, model_type)
    if mapped is None and not name.startswith(names["base_prefix"]):
        mapped = hf_name_to_path(names["base_prefix"] + name, model_type)
    return mapped


def module_name(site: str, model_type: str) -> str:
    """'layers_0/self_attn/q_proj' -> 'model.layers.0.self_attn.q_proj': the
    Hugging Face module of a linear site (on bloom
    'layers_0/self_attention/query_key_value' ->
    'transformer.h.0.self_attention.query_key_value')."""
    return path_to_hf_name((*site.split("/"), "kernel"), model_type).removesuffix(".weight")


def site_name(module: str, model_type: str) -> str | None:
    """Inverse of `module_name`; None for modules that are not linear sites."""
    mapped = hf_name_to_path(module + ".weight", model_type)
    if mapped is None or mapped[0][-1] != "kernel":
        return None
    return "/".join(mapped[0][:-1])


def module_of(path: Sequence[str], model_type: str) -> str:
    """The Hugging Face name of the module holding base leaf `path`:
    ('layers_0', 'input_layernorm', 'scale') -> 'model.layers.0.input_layernorm';
    GPT-J's ('lm_head_bias',) -> 'lm_head' (the bias of the head module)."""
    return path_to_hf_name(tuple(path), model_type).rpartition(".")[0]


def selects(names: Sequence[str], path: Sequence[str], model_type: str) -> bool:
    """Whether PEFT's suffix rule selects base leaf `path` by its module:
    the module's name ends with one of `names` (a plain string suffix, so
    on LLaMA "norm" selects the final norm and every layer's norms)."""
    if not names:
        return False
    module = module_of(path, model_type)
    return any(module.endswith(n) for n in names)
