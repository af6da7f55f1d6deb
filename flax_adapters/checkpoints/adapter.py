"""Adapters on disk: one `save_adapter` / `load_adapter` for every method.

    save_adapter(tree, cfg, "out/adapter", model_type)     # the method's format
    tree, cfg = load_adapter("out/adapter", base, model_type)

The format is the method's (its registered `Schema`, adapters/registry.py):

- PEFT (LoRA, DoRA, rsLoRA, IA3, prefix, prompt, P-tuning):
  `adapter_config.json` + `adapter_model.safetensors` in PyTorch layouts
  and key names, so `PeftModel.from_pretrained(model, dir)` loads what we
  train and we load what PEFT trains (checked against peft 0.21):

      ours (kernel W (in, out))                 PEFT key (base_model.model.<module>.) layout
      layers_0/self_attn/q_proj/lora_a          ...q_proj.lora_A.weight          (r, in)  = A.T
      layers_0/self_attn/q_proj/lora_b          ...q_proj.lora_B.weight          (out, r) = B.T
      layers_0/self_attn/q_proj/lora_magnitude  ...q_proj.lora_magnitude_vector  (out,)
      layers_0/self_attn/k_proj/ia3 (1, out)    ...k_proj.ia3_l                  (out, 1) = l.T

  <module> is the Hugging Face module name (`model.layers.0.self_attn.q_proj`,
  models/names.py). Prompt learning writes one `prompt_embeddings` tensor.
  LoRA on a mixture's experts (target_parameters) is keyed as PEFT's nested
  ParamWrappers: the parameters of one module are wrapped in the order
  transformers registers them, the last outermost, so with both targeted

      layers_0/mlp/experts/down_proj/lora_a     ...mlp.experts.lora_A.weight             (E*r, f)
      layers_0/mlp/experts/gate_up_proj/lora_a  ...mlp.experts.base_layer.lora_A.weight  (E*r, d)

  in ParamWrapper's layout (lora.to_peft_experts).
- LLM-Adapters' BOTTLENECK (series, AdapterP, parallel adapters): the same
  layout with its own config fields and `adapter_down.weight` /
  `adapter_up.weight` / `adapter_scaling` keys, in safetensors.
- Full fine-tuning: a Hugging Face model directory (checkpoints/hf.py).

modules_to_save (LoRA, DoRA, IA3): the trained base tensors go under their
module's own name in the PyTorch layout (`base_model.model.lm_head.weight`),
and `modules_to_save` lists the names in adapter_config.json -- what peft
0.21 `save_pretrained` writes and what its load map expects.

Targets: PEFT selects modules by a list of name suffixes or a regex over its
module names. A config whose targets are plain names (or a preset, or
"all-linear") is written as that list; anything else (our regexes over tree
paths) as an exact regex of the chosen PEFT module names. On load the sites
are read off the tensors present, and every tensor is checked against the
adapter the loaded config would initialise on `base` (the same sites,
leaves and shapes), so an adapter for another model is an error naming the
tensor, never a silent misfit.

A save goes to a temporary directory beside `out_dir` that is renamed into
place, so an existing export is replaced whole or not at all. Pickled
adapters (`adapter_model.bin`) are refused: unpickling runs code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters import api, tree as tree_lib
from flax_adapters.adapters import registry
from flax_adapters.adapters.full import FullConfig
from flax_adapters.adapters.targeting import linear_sites
from flax_adapters.checkpoints.atomic import write_dir_atomically
from flax_adapters.checkpoints.hf import load_hf_dir, save_hf_dir
from flax_adapters.checkpoints.safetensors_io import iter_tensors, save_file
from flax_adapters.adapters import lora
from flax_adapters.adapters.targeting import grouped_sites
from flax_adapters.models import names
from flax_adapters.models.registry import SUPPORTED_MODEL_TYPES, family

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


# ----------------------------------------------------------------------------- save

def peft_targets(model_type: str):
    """spec, chosen sites -> PEFT's target_modules for them (module docstring)."""
    def spell(spec, chosen: list[str]) -> str | list[str]:
        if spec == "all-linear" and family(model_type).presets.peft_all_linear:
            return spec
        if spec in (None, "all-linear") or (not isinstance(spec, str)
                                            and all("/" not in x for x in spec)):
            # Plain names select the same modules under PEFT's suffix rule.
            return sorted({s.rsplit("/", 1)[-1] for s in chosen})
        return "(" + "|".join(re.escape(names.module_name(s, model_type)) for s in chosen) + ")"
    return spell


def _wrapper_prefix(parameter: str, targeted: set[str], model_type: str) -> str:
    """PEFT's key prefix for the LoRA of a module's parameter (module
    docstring): the module, one `base_layer.` per targeted parameter of it
    that transformers registers later."""
    module = parameter.rpartition(".")[0]
    order = [p for p in names.module_parameters(module, model_type) if p in targeted]
    return f"{module}." + "base_layer." * (len(order) - 1 - order.index(parameter))


def _site_tensors(adapter: dict, schema: registry.Schema, model_type: str) -> dict:
    out = {}
    parameter = lambda site: names.path_to_hf_name((*site.split("/"), "kernels"),  # noqa: E731
                                                   model_type)
    for leaf, suffix in schema.site_tensors.items():
        sites = tree_lib.sites_with(adapter, leaf)
        targeted = {parameter(s) for s in sites if np.ndim(tree_lib.get(adapter, s)[leaf]) == 3}
        for site in sites:
            value = np.asarray(jax.device_get(tree_lib.get(adapter, site)[leaf]), np.float32)
            if value.ndim == 3:  # LoRA on experts' stacked kernels (target_parameters)
                key = PREFIX + _wrapper_prefix(parameter(site), targeted, model_type) + suffix
                out[key] = lora.to_peft_experts(leaf, value)
                continue
            key = f"{PREFIX}{names.module_name(site, model_type)}.{suffix}"
            out[key] = value.T if value.ndim == 2 else value
    return out


def _saved_tensors(trained: dict, saved: tuple[str, ...], model_type: str) -> dict:
    """{PEFT key: PyTorch-layout array} of the modules_to_save leaves in `trained`."""
    out = {}
    base = [(p, v) for p, v in tree_lib.leaves(trained) if not registry.is_adapter_path(p)]
    for path, value in base:
        if names.selects(saved, path, model_type):
            value = np.asarray(jax.device_get(value), np.float32)
            name = names.path_to_hf_name(path, model_type)
            transpose = names.hf_name_to_path(name, model_type)[1]
            out[PREFIX + name] = np.swapaxes(value, -1, -2) if transpose else value
    for n in saved:
        if not any(names.selects((n,), p, model_type) for p, _ in base):
            raise ValueError(f"modules_to_save {n!r}: the tree holds no trained weights of such "
                             "a module; pass the adapted tree (or its trainable part)")
    return out


def save_adapter(tree: dict, cfg: Any, out_dir: str | os.PathLike, model_type: str, *,
                 base_model_name_or_path: str | None = None, hf_config: dict | None = None,
                 tokenizer: Any = None) -> pathlib.Path:
    """Writes the adapter of `tree` (an adapted tree or its trainable part)
    in its method's format (module docstring); returns the directory.
    Full fine-tuning writes a model directory and needs the base's
    `hf_config` (its config.json) and, to be complete, its `tokenizer`."""
    _check_model_type(model_type)
    method = registry.method_of(cfg)
    if method.trains_base:
        if hf_config is None:
            raise ValueError("full fine-tuning saves a Hugging Face model directory: pass "
                             "hf_config (the base's config.json, Pretrained.hf_config)")
        return save_hf_dir(tree, hf_config, out_dir, tokenizer)
    schema = method.schema
    trained = api.split(tree, cfg, model_type).trainable
    adapter = tree_lib.split(trained, registry.is_adapter_path).trainable
    if not adapter:
        raise ValueError(f"the tree has no {type(cfg).__name__} adapter leaves to save")
    config = schema.to_json(cfg, adapter, peft_targets(model_type))
    tensors = (schema.to_tensors(adapter, cfg) if schema.to_tensors is not None
               else _site_tensors(adapter, schema, model_type))
    if not tensors:
        raise ValueError(f"the tree has no {type(cfg).__name__} adapter leaves to save")
    saved = tuple(getattr(cfg, "modules_to_save", ()) or ())
    tensors.update(_saved_tensors(trained, saved, model_type))
    config = {"peft_type": schema.peft_type, **config, "task_type": "CAUSAL_LM",
              "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
              "modules_to_save": list(saved) or None,
              **({"revision": None} if schema.loader == "PEFT" else {})}
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    return write_dir_atomically(out_dir, {
        CONFIG_NAME: lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
        WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
    })


# ----------------------------------------------------------------------------- load

def _weights(directory: pathlib.Path) -> pathlib.Path:
    weights = directory / WEIGHTS_NAME
    if weights.exists():
        return weights
    pickled = [n for n in PICKLED_NAMES if (directory / n).exists()]
    if pickled:
        raise ValueError(
            f"{directory} holds only a pickled adapter ({pickled[0]}); loading it could run "
            "arbitrary code, so it is refused. Re-save it as safetensors (PEFT: "
            "model.save_pretrained(out_dir, safe_serialization=True); LLM-Adapters: "
            f"safetensors.torch.save_file(torch.load(p), '{WEIGHTS_NAME}'))")
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")


def _split_key(key: str, suffixes: dict[str, str], model_type: str) -> tuple[str, str] | None:
    """'base_model.model.<module>.<suffix>' -> (site, our leaf), or None."""
    if not key.startswith(PREFIX):
        return None
    for suffix in sorted(suffixes, key=len, reverse=True):
        if key.endswith("." + suffix):
            site = names.site_name(key[len(PREFIX):-len(suffix) - 1], model_type)
            return (site, suffixes[suffix]) if site is not None else None
    return None


def _grouped_site(key: str, suffix: str, target_parameters, base: dict,
                  model_type: str) -> str | None:
    """The grouped site of a PEFT ParamWrapper's tensor
    'base_model.model.<module>.(base_layer.)*<suffix>' (module docstring),
    or None if the key is not one."""
    if not target_parameters or not key.startswith(PREFIX) or not key.endswith("." + suffix):
        return None
    module, depth = key[len(PREFIX):-len(suffix) - 1], 0
    while module.endswith(".base_layer"):
        module, depth = module.removesuffix(".base_layer"), depth + 1
    # the parameters of the module that PEFT's target_parameters (suffixes) select
    targeted = [p for p in names.module_parameters(module, model_type)
                if any(p == t or p.endswith("." + t) for t in target_parameters)]
    if depth >= len(targeted):
        return None
    site = "/".join(names.hf_name_to_path(targeted[len(targeted) - 1 - depth], model_type)[0][:-1])
    return site if site in grouped_sites(base) else None


def _read_site_tensors(weights: pathlib.Path, schema: registry.Schema, base: dict,
                       model_type: str, saved: tuple[str, ...],
                       target_parameters: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """({site: {our leaf: array in our layout}}, {base leaf path: a trained
    modules_to_save array, our layout}) of an adapter file; LoRA tensors of
    the `target_parameters` experts in PEFT's ParamWrapper keys."""
    suffixes = {**{v: k for k, v in schema.site_tensors.items()}, **schema.aliases}
    sites = set(linear_sites(base))
    base_shapes = {p: tuple(np.shape(v)) for p, v in tree_lib.leaves(base)}
    found: dict[str, dict[str, np.ndarray]] = {}
    kept: dict[tuple[str, ...], np.ndarray] = {}
    for key, arr in iter_tensors(weights):
        value = np.asarray(arr, np.float32)
        grouped = [(site, leaf) for suffix, leaf in suffixes.items() if (site := _grouped_site(
            key, suffix, target_parameters, base, model_type)) is not None]
        if grouped:
            site, leaf = grouped[0]
            experts = tree_lib.get(base, site)["kernels"].shape[0]
            found.setdefault(site, {})[leaf] = lora.from_peft_experts(leaf, value, experts)
            continue
        parsed = _split_key(key, suffixes, model_type)
        if parsed is not None and parsed[0] in sites:
            site, leaf = parsed
            found.setdefault(site, {})[leaf] = value.T if value.ndim == 2 else value
            continue
        mapped = names.hf_name_to_path(key.removeprefix(PREFIX), model_type)
        if parsed is None and mapped is not None and mapped[0] in base_shapes:
            path, transpose = mapped
            if not names.selects(saved, path, model_type):
                raise ValueError(f"{weights}: tensor {key!r} is a base weight, but "
                                 f"modules_to_save {list(saved)} does not select its module")
            value = np.swapaxes(value, -1, -2) if transpose else value
            if value.shape != base_shapes[path]:
                raise ValueError(f"{weights}: tensor {key!r} has shape {tuple(arr.shape)}, "
                                 "which does not fit the base model")
            kept[path] = value
            continue
        raise ValueError(f"{weights}: tensor {key!r} has no place in this base model "
                         "(unknown module or adapter kind)")
    if not found:
        raise ValueError(f"{weights}: no adapter tensors")
    return found, kept


def _per_site(tree: dict) -> dict[str, dict[str, tuple]]:
    out: dict[str, dict[str, tuple]] = {}
    for path, value in tree_lib.leaves(tree):
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = tuple(np.shape(value))
    return out


def _check_fits(found: dict, base: dict, cfg: Any, model_type: str, weights: pathlib.Path):
    """Every tensor must be one the loaded config initialises on `base`, in
    its shape: the same sites, leaves and shapes as a fresh adapter."""
    fresh = jax.eval_shape(lambda b: api.inject(b, cfg, jax.random.key(0), model_type), base)
    want = _per_site(tree_lib.split(fresh, registry.is_adapter_path).trainable)
    for site, leaves in found.items():
        if site not in want:
            raise ValueError(f"{weights}: tensors for {site} ({sorted(leaves)}), which the "
                             "adapter's config does not adapt")
        module = tree_lib.get(base, site)
        d_in, d_out = np.shape(module["kernel" if "kernel" in module else "kernels"])[-2:]
        for leaf, value in leaves.items():
            if leaf not in want[site]:
                raise ValueError(f"{weights}: {site}/{leaf} is not a leaf this config adds "
                                 f"(expected {sorted(want[site])})")
            if tuple(value.shape) != want[site][leaf]:
                raise ValueError(f"{site}/{leaf}: shape {value.shape} does not fit the base "
                                 f"kernel (in={d_in}, out={d_out}) under this config (expected "
                                 f"{want[site][leaf]}); was the adapter trained on another "
                                 "model?")
    for site, leaves in want.items():
        missing = sorted(set(leaves) - set(found.get(site, {})))
        if missing:
            raise ValueError(f"{weights}: no tensors for {site}/{missing}, which the config "
                             "adapts")


def load_adapter(directory: str | os.PathLike, base: dict, model_type: str) -> tuple[dict, Any]:
    """(base + the adapter's leaves (float32, our layouts), its config) from a
    directory `save_adapter` (or PEFT, or LLM-Adapters) wrote. A Hugging Face
    model directory (full fine-tuning's export) gives (its weights,
    FullConfig()). The base must be the model the adapter was trained on."""
    _check_model_type(model_type)
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    if not (directory / CONFIG_NAME).exists():
        if (directory / "config.json").exists():
            return _load_model_dir(directory, base, model_type)
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; expected an adapter directory "
                                "(adapter_config.json + adapter_model.safetensors) or a model "
                                "directory (config.json + safetensors)")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory / CONFIG_NAME}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{directory / CONFIG_NAME}: expected a JSON object")
    try:
        method = registry.by_peft_type(config.get("peft_type"))
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None
    if config.get("bias", "none") != "none":
        raise ValueError(f"{directory}: bias={config['bias']!r} adapters train base biases; "
                         "only bias='none' is supported")
    schema = method.schema
    saved = tuple(config.get("modules_to_save") or ())
    weights = _weights(directory)
    try:
        if schema.from_tensors is not None:
            if saved:
                raise ValueError(f"modules_to_save is supported with LoRA, DoRA and IA3 "
                                 f"adapters, not {schema.peft_type}")
            tensors = {k: np.asarray(v, np.float32) for k, v in iter_tensors(weights)}
            if set(tensors) != {"prompt_embeddings"}:
                raise ValueError(f"{weights}: expected one tensor 'prompt_embeddings', found "
                                 f"{sorted(tensors)}")
            cfg = schema.from_json(config, tensors, base)
            return schema.from_tensors(config, tensors, base), cfg
        found, kept = _read_site_tensors(weights, schema, base, model_type, saved,
                                         tuple(config.get("target_parameters") or ()))
        cfg = schema.from_json(config, found, base)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{directory / CONFIG_NAME}: a field is missing or has the wrong type "
                         f"({type(e).__name__}: {e})") from None
    if saved:
        cfg = dataclasses.replace(cfg, modules_to_save=saved)
    _check_fits(found, base, dataclasses.replace(cfg, modules_to_save=()) if saved else cfg,
                model_type, weights)
    out = base
    for site, leaves in found.items():
        out = tree_lib.with_site(out, site, lambda m, x=leaves: {
            **m, **{k: jnp.asarray(v) for k, v in x.items()}})
    if saved:
        absent = [names.module_of(p, model_type)
                  for p in api.check_modules_to_save(out, saved, model_type) if p not in kept]
        if absent:
            raise ValueError(f"{directory}: modules_to_save selects {absent[:3]}, but "
                             f"{WEIGHTS_NAME} holds no trained weights for them")
        for path, value in kept.items():
            out = tree_lib.with_leaf(out, path, jnp.asarray(value))
    return out, cfg


def _load_model_dir(directory: pathlib.Path, base: dict, model_type: str) -> tuple[dict, Any]:
    """A fully fine-tuned model saved as a model directory: its weights, which
    must have the base's structure and shapes."""
    cfg, params, _ = load_hf_dir(directory)
    if cfg.model_type != model_type:
        raise ValueError(f"{directory} holds a {cfg.model_type} model, not {model_type}")
    shapes = lambda t: jax.tree_util.tree_map(np.shape, t)  # noqa: E731
    if shapes(params) != shapes(base):
        raise ValueError(f"{directory}: the model's weights do not have the base model's "
                         "shapes; was it fine-tuned from another base?")
    return params, FullConfig()


def _check_model_type(model_type: str) -> None:
    # Our trees mirror each family's Hugging Face module names (models/names.py).
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} has no Hugging Face name mapping; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
