"""Hugging Face names of our parameter trees, per model family.

Each family file states its table (`HF_NAMES`): our top-level entries to
Hugging Face names -- a bare leaf (embed_tokens, lm_head, ...) to its full
tensor name, a module (norm, ln_f, project_in, ...) to its module name --
plus "layers", the prefix of the layer stack (`model.layers` + `.3` <->
`layers_3`), "base_prefix", what checkpoints saved from the bare base model
omit, and "aliases", older names of tensors. Inside a layer our names are
Hugging Face's, so

    'model.layers.0.self_attn.q_proj.weight' <-> ('layers_0', 'self_attn', 'q_proj', 'kernel')

(a kernel transposed to (in, out)). A family may add "parameters": within a
layer, parameters that are not a Linear's weight, by their transformers 5
(live) names, each with the published checkpoint tensors it is saved as
(models/moe.py):

    'model.layers.0.mlp.gate.weight'          <-> ('layers_0', 'mlp', 'gate', 'weight')  as is
    'model.layers.0.mlp.experts.gate_up_proj' <-> ('layers_0', 'mlp', 'experts', 'gate_up_proj',
                                                   'kernels')  (E, 2f, d) -> (E, d, 2f)
    checkpoint: 'model.layers.0.block_sparse_moe.experts.3.w1.weight' -> kernels[3, :, :f].T

PEFT files use the live names (`hf_name_to_path`, `path_to_hf_name`);
checkpoints the published ones (`checkpoint_entry`, `checkpoint_tensors`).
These functions are the one place that
maps names; weights files (checkpoints/hf.py), PEFT-style adapter
directories (checkpoints/adapter.py), modules_to_save and the quantization
skip list (PEFT's suffix rule over module names) all go through them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from flax_adapters.models.registry import family

# A module holding a `weight` that is a norm's scale, not a kernel: the names
# the families use (input_layernorm, self_attn_layer_norm, norm, ln_1, ln_f, ...).
_NORM = re.compile(r"(.*layer_?norm|norm|[qk]_norm|ln_\w+)")  # q_norm, k_norm: Qwen3's per-head
_SPECIAL = ("layers", "base_prefix", "aliases", "parameters")
# our leaf -> Hugging Face's; `weight`: a parameter kept in its Hugging Face layout
# (a router), `kernels`: experts' stacked kernels, named by their module alone.
_LEAF_KIND = {"kernel": "weight", "scale": "weight", "bias": "bias", "weight": "weight"}


def _names(model_type: str) -> dict:
    return family(model_type).hf_names


def _parameter_leaf(live: str, published: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """A family parameter's path inside a layer, and whether it is transposed:
    one published tensor per expert ({e}) makes a stack of (in, out) kernels."""
    parts = tuple(live.split("."))
    if any("{e}" in p for p in published):
        return (*parts, "kernels"), True
    return parts, False


def hf_name_to_path(name: str, model_type: str) -> tuple[tuple[str, ...], bool] | None:
    """'model.layers.0.self_attn.q_proj.weight' -> (('layers_0', 'self_attn',
    'q_proj', 'kernel'), transpose=True); None for names we do not know."""
    names = _names(model_type)
    for key, hf in names.items():
        if key not in _SPECIAL and hf == name:  # a bare leaf: only the head is transposed
            return (key,), key == "lm_head"
    parameters = names.get("parameters", {})
    m = re.fullmatch(re.escape(names["layers"]) + r"\.(\d+)\.(.+)", name)
    if m is not None and m.group(2) in parameters:
        leaf, transpose = _parameter_leaf(m.group(2), parameters[m.group(2)])
        return (f"layers_{m.group(1)}", *leaf), transpose
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
    if rest[-1] == "kernels":  # a module's stacked parameter: the name ends at it
        return ".".join([names["layers"], head.removeprefix("layers_"), *rest[:-1]])
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


@dataclasses.dataclass(frozen=True)
class Piece:
    """One published tensor of a stacked (E, in, out) leaf: expert `expert`'s
    `part`-th of `parts` equal slices of the output axis, transposed (Mixtral's
    w1 is gate_up_proj's [e, :, :f], w3 its [e, :, f:])."""

    expert: int
    part: int
    parts: int

    def index(self, shape: Sequence[int]) -> tuple[int, slice, slice]:
        n = shape[-1] // self.parts
        return self.expert, slice(None), slice(self.part * n, (self.part + 1) * n)


def checkpoint_entry(name: str, model_type: str
                     ) -> tuple[tuple[str, ...], bool, Piece | None] | None:
    """Where checkpoint tensor `name` goes: (path, transposed, None) for a
    whole leaf (`canonical`, or a parameter's published spelling), (path of
    the stack, True, its Piece) for one expert's tensor; None if unknown."""
    names = _names(model_type)
    for live, published in names.get("parameters", {}).items():
        leaf, transpose = _parameter_leaf(live, published)
        for part, spelling in enumerate(published):
            pattern = (re.escape(names["layers"]) + r"\.(\d+)\."
                       + re.escape(spelling).replace(r"\{e\}", r"(\d+)"))
            m = (re.fullmatch(pattern, name)
                 or re.fullmatch(pattern, names["base_prefix"] + name))
            if m is not None:
                piece = Piece(int(m.group(2)), part, len(published)) if transpose else None
                return (f"layers_{m.group(1)}", *leaf), transpose, piece
    mapped = canonical(name, model_type)
    return None if mapped is None else (*mapped, None)


def checkpoint_tensors(path: tuple[str, ...], shape: Sequence[int], model_type: str
                       ) -> list[tuple[str, bool, Piece | None]]:
    """The published tensors base leaf `path` (of `shape`) is saved as: the
    inverse of `checkpoint_entry`, every expert's Piece of a stack."""
    names = _names(model_type)
    live = path_to_hf_name(path, model_type)
    layer, _, inner = live.removeprefix(names["layers"] + ".").partition(".")
    published = names.get("parameters", {}).get(inner) if path[0].startswith("layers_") else None
    if published is None:
        return [(live, hf_name_to_path(live, model_type)[1], None)]
    prefix = f"{names['layers']}.{layer}."
    if not _parameter_leaf(inner, published)[1]:
        return [(prefix + published[0], False, None)]
    return [(prefix + spelling.format(e=e), True, Piece(e, part, len(published)))
            for e in range(shape[0]) for part, spelling in enumerate(published)]


def module_parameters(module: str, model_type: str) -> list[str]:
    """The full names of Hugging Face module `module`'s family parameters
    (HF_NAMES["parameters"]) in the order transformers registers them:
    'model.layers.0.mlp.experts' -> ['model.layers.0.mlp.experts.gate_up_proj',
    'model.layers.0.mlp.experts.down_proj']; [] for other modules."""
    names = _names(model_type)
    m = re.fullmatch(re.escape(names["layers"]) + r"\.(\d+)\.(.+)", module)
    if m is None:
        return []
    return [f"{module}.{p.rpartition('.')[2]}" for p in names.get("parameters", {})
            if p.rpartition(".")[0] == m.group(2)]


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
