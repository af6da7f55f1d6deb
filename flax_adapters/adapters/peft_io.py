"""Adapters in the Hugging Face PEFT format: `adapter_config.json` +
`adapter_model.safetensors`, PyTorch layouts and key names, so that
`PeftModel.from_pretrained(model, dir)` loads what we train and we load what
PEFT trains (checked against peft 0.21 in tests/test_adapters_lora.py).

    ours (kernel W (in, out))            PEFT key (base_model.model.<module>.)  layout
    layers_0/self_attn/q_proj/lora_a     ...q_proj.lora_A.weight                (r, in)  = A.T
    layers_0/self_attn/q_proj/lora_b     ...q_proj.lora_B.weight                (out, r) = B.T
    layers_0/self_attn/q_proj/lora_magnitude  ...q_proj.lora_magnitude_vector   (out,)
    layers_0/self_attn/k_proj/ia3 (1, out)    ...k_proj.ia3_l                   (out, 1) = l.T
    layers_0/mlp/down_proj/ia3 (in, 1)        ...down_proj.ia3_l                (1, in)  = l.T

<module> is the Hugging Face module name (`model.layers.0.self_attn.q_proj`).

Each method is one entry in `_EXPORTERS` (by config type) and `_IMPORTERS`
(by PEFT's `peft_type`); prompt and prefix tuning add theirs there.

modules_to_save (LoRA, DoRA, IA3; saved.py): the trained base tensors go
under their module's own name in the PyTorch layout, e.g.
`base_model.model.lm_head.weight` (d, v).T, and `modules_to_save` lists
the names in adapter_config.json -- what peft 0.21 `save_pretrained`
writes (its `ModulesToSaveWrapper.adapter_state_dict` drops the
`modules_to_save.default.` infix) and what its load map expects.

Targets: PEFT selects modules by a list of name suffixes or a regex over its
module names. A config whose targets are plain names (or a preset, or
"all-linear") is written as that list; anything else (our regexes over tree
paths) is written as an exact regex of the chosen PEFT module names, which
PEFT matches the same way. On import the adapter's sites are read off the
tensors present; the config's list is kept when it selects exactly those.

An export goes to a temporary directory beside `out_dir` that is renamed
into place, so an existing export is replaced whole or not at all.
Pickled adapters (`adapter_model.bin`) are refused: unpickling runs code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from flax_adapters.adapters import ia3, lora, prefix, prompt, saved, targeting
from flax_adapters.adapters.tree import get as _get, split, with_site
from flax_adapters.checkpoints.hf import hf_name_to_path, path_to_hf_name
from flax_adapters.checkpoints.atomic import write_dir_atomically
from flax_adapters.checkpoints.safetensors_io import iter_tensors, save_file
from flax_adapters.models.registry import SUPPORTED_MODEL_TYPES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# PEFT options that change what the weights mean and that we do not
# implement: an adapter using any of them (a truthy value) is refused.
_UNSUPPORTED = ("lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                "layer_replication", "use_qalora", "alora_invocation_tokens",
                "trainable_token_indices", "use_bdlora", "target_parameters")


# --- names ---------------------------------------------------------------

def module_name(site: str, model_type: str = "llama") -> str:
    """'layers_0/self_attn/q_proj' -> 'model.layers.0.self_attn.q_proj' (the
    Hugging Face module of a site, through the family's names: on bloom
    'layers_0/self_attention/query_key_value' ->
    'transformer.h.0.self_attention.query_key_value')."""
    return path_to_hf_name((*site.split("/"), "kernel"), model_type).removesuffix(".weight")


def site_name(module: str, model_type: str = "llama") -> str | None:
    """Inverse of `module_name`; None for modules that are not linear sites."""
    mapped = hf_name_to_path(module + ".weight", model_type)
    if mapped is None or mapped[0][-1] != "kernel":
        return None
    return "/".join(mapped[0][:-1])


def _sites_with(tree: dict, leaf: str, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += [prefix + k] if leaf in v else _sites_with(v, leaf, prefix + k + "/")
    return out


def _peft_spec(spec: targeting.TargetSpec | None, chosen: list[str],
               model_type: str) -> str | list[str]:
    """PEFT's target_modules for sites `chosen` through our `spec`."""
    if spec == "all-linear":
        return spec
    if spec is None or (not isinstance(spec, str) and all("/" not in x for x in spec)):
        # Plain names select the same modules under PEFT's suffix rule.
        return sorted({s.rsplit("/", 1)[-1] for s in chosen})
    return "(" + "|".join(re.escape(module_name(s, model_type)) for s in chosen) + ")"


def _our_spec(peft_spec: Any, found: list[str], candidates: list[str],
              all_linear: bool = False) -> targeting.TargetSpec:
    """Our spec selecting exactly the sites `found` (in a PEFT adapter) out
    of `candidates`: PEFT's list of name suffixes when it means that, else
    "all-linear" when that is what was found (PEFT saves it expanded), else
    an exact regex."""
    if isinstance(peft_spec, (list, tuple)):
        # PEFT's suffixes end at a '.', ours at a '/': 'mlp.dense_4h_to_h' -> 'mlp/dense_4h_to_h'.
        names = tuple(sorted(x.replace(".", "/") for x in peft_spec))
        if set(found) == {s for s in candidates
                          if any(s == x or s.endswith("/" + x) for x in names)}:
            return names
    if all_linear and set(found) == {s for s in candidates if s != "lm_head"}:
        return "all-linear"
    return "(" + "|".join(re.escape(s) for s in found) + ")"


# --- export --------------------------------------------------------------

def _export_lora(adapter: dict, cfg: lora.LoraConfig, model_type: str) -> tuple[dict, dict]:
    chosen = _sites_with(adapter, "lora_a")
    config = {
        "peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
        "target_modules": _peft_spec(cfg.target_modules, chosen, model_type),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
    }
    tensors = {}
    for site in chosen:
        leaves, key = _get(adapter, site), PREFIX + module_name(site, model_type)
        tensors[key + ".lora_A.weight"] = np.asarray(leaves["lora_a"]).T
        tensors[key + ".lora_B.weight"] = np.asarray(leaves["lora_b"]).T
        if cfg.use_dora:
            if "lora_magnitude" not in leaves:
                raise ValueError(f"{site}: the config says DoRA but the tree has no "
                                 "lora_magnitude; inject with LoraConfig(use_dora=True)")
            tensors[key + ".lora_magnitude_vector"] = np.asarray(leaves["lora_magnitude"])
    return config, tensors


def _export_ia3(adapter: dict, cfg: ia3.IA3Config, model_type: str) -> tuple[dict, dict]:
    chosen = _sites_with(adapter, "ia3")
    feedforward = [s for s in chosen if _get(adapter, s)["ia3"].shape[1] == 1]
    config = {
        "peft_type": "IA3", "target_modules": _peft_spec(cfg.target_modules, chosen, model_type),
        "feedforward_modules": (_peft_spec(cfg.feedforward_modules, feedforward, model_type)
                                if feedforward else []),
        "fan_in_fan_out": False, "init_ia3_weights": True,
    }
    tensors = {PREFIX + module_name(s, model_type) + ".ia3_l":
               np.asarray(_get(adapter, s)["ia3"]).T
               for s in chosen}
    return config, tensors


# (adapter leaves, config, model_type) -> (adapter_config fields, tensors). Prompt
# learning writes one family-independent `prompt_embeddings` tensor.
_EXPORTERS: list[tuple[type, Callable[[dict, Any, str], tuple[dict, dict]]]] = [
    (lora.LoraConfig, _export_lora),
    (ia3.IA3Config, _export_ia3),
    (prompt.PromptTuningConfig, lambda a, c, _: prompt.to_peft(a, c)),
    (prompt.PTuningConfig, lambda a, c, _: prompt.to_peft(a, c)),
    (prefix.PrefixConfig, lambda a, c, _: prefix.to_peft(a, c)),
]


def export_peft(tree: dict, cfg: Any, out_dir: str | os.PathLike,
                base_model_name_or_path: str | None = None,
                model_type: str = "llama") -> pathlib.Path:
    """Writes the adapter leaves of `tree` (an adapted tree or its trainable
    part) as a PEFT adapter directory; returns its path."""
    _check_model_type(model_type)
    for cls, exporter in _EXPORTERS:
        if isinstance(cfg, cls):
            break
    else:
        raise TypeError(f"no PEFT export for {type(cfg).__name__}")
    names = getattr(cfg, "modules_to_save", ())
    adapter = split(tree, saved.trainable(names, model_type)).trainable
    config, tensors = exporter(adapter, cfg, model_type)
    if not tensors:
        raise ValueError(f"the tree has no {type(cfg).__name__} adapter leaves to export")
    tensors.update(_export_saved(adapter, names, model_type))
    config = {**config, "task_type": "CAUSAL_LM", "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path, "revision": None,
              "modules_to_save": list(names) or None}
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}

    return write_dir_atomically(out_dir, {
        CONFIG_NAME: lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
        WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
    })


def _export_saved(adapter: dict, names: tuple[str, ...], model_type: str) -> dict:
    """{PEFT key: PyTorch-layout array} of the modules_to_save leaves in `adapter`."""
    out = {}
    for path, value in _leaves(adapter):
        if saved.selects(names, path, model_type):
            value = np.asarray(value, np.float32)
            name = path_to_hf_name(path, model_type)
            out[PREFIX + name] = value.T if hf_name_to_path(name, model_type)[1] else value
    for n in names:
        if not any(saved.selects((n,), p, model_type) for p, _ in _leaves(adapter)):
            raise ValueError(f"modules_to_save {n!r}: the tree holds no trained weights of such "
                             "a module; pass the adapted tree (or its trainable part)")
    return out


def _leaves(tree: dict, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


# --- import --------------------------------------------------------------

_KEY = re.compile(re.escape(PREFIX) + r"(.+?)\.(lora_A\.weight|lora_B\.weight|"
                  r"lora_magnitude_vector(?:\.weight)?|ia3_l)")
_LEAF = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b",
         "lora_magnitude_vector": "lora_magnitude", "lora_magnitude_vector.weight":
         "lora_magnitude", "ia3_l": "ia3"}


def _read_tensors(directory: pathlib.Path, base: dict, model_type: str,
                  modules_to_save: tuple[str, ...] = ()
                  ) -> tuple[dict[str, dict[str, np.ndarray]], dict[tuple[str, ...], np.ndarray]]:
    """({site: {our leaf name: array in our layout, float32}}, {base leaf path:
    trained modules_to_save array, our layout}), checked against `base`."""
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        pickled = [n for n in _PICKLED_NAMES if (directory / n).exists()]
        if pickled:
            raise ValueError(
                f"{directory} holds only a pickled adapter ({pickled[0]}); loading it could run "
                "arbitrary code, so it is refused. Re-save it with PEFT as safetensors: "
                "model.save_pretrained(out_dir, safe_serialization=True)")
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")
    sites_ = set(targeting.linear_sites(base))
    found: dict[str, dict[str, np.ndarray]] = {}
    kept: dict[tuple[str, ...], np.ndarray] = {}
    base_shapes = dict(_leaves(base))
    for key, arr in iter_tensors(weights):
        m = _KEY.fullmatch(key)
        mapped = None if m else hf_name_to_path(key.removeprefix(PREFIX), model_type)
        if mapped is not None and mapped[0] in base_shapes:
            path, transpose = mapped
            if not saved.selects(modules_to_save, path, model_type):
                raise ValueError(f"{weights}: tensor {key!r} is a base weight, but "
                                 f"modules_to_save {list(modules_to_save)} does not select its "
                                 "module")
            value = np.asarray(arr, np.float32)
            value = value.T if transpose else value
            if value.shape != tuple(base_shapes[path].shape):
                raise ValueError(f"{weights}: tensor {key!r} has shape {tuple(arr.shape)}, "
                                 "which does not fit the base model")
            kept[path] = value
            continue
        site = site_name(m.group(1), model_type) if m else None
        if site is None or site not in sites_:
            raise ValueError(f"{weights}: tensor {key!r} has no place in this base model "
                             "(unknown module or adapter kind)")
        value = np.asarray(arr, np.float32)
        found.setdefault(site, {})[_LEAF[m.group(2)]] = value.T if value.ndim == 2 else value
    if not found:
        raise ValueError(f"{weights}: no adapter tensors")
    for site, leaves in found.items():
        d_in, d_out = _get(base, site)["kernel"].shape
        want = {"lora_a": (d_in, None), "lora_b": (None, d_out), "lora_magnitude": (d_out,),
                "ia3": [(d_in, 1), (1, d_out)]}
        for name, value in leaves.items():
            shapes = want[name] if isinstance(want[name], list) else [want[name]]
            if not any(len(value.shape) == len(s) and all(
                    w is None or w == d for w, d in zip(s, value.shape)) for s in shapes):
                raise ValueError(f"{site}/{name}: shape {value.shape} does not fit the base "
                                 f"kernel (in={d_in}, out={d_out}); was the adapter trained "
                                 "on another model?")
    return found, kept


# LoRA inits that also rewrite the base weights: such an adapter only works
# on the residual base saved with it (PEFT converts them on request).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def _import_lora(config: dict, found: dict, base: dict) -> lora.LoraConfig:
    r, use_dora = int(config["r"]), bool(config.get("use_dora", False))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(f"init_lora_weights={init!r}: this adapter expects base weights that "
                         "its init rewrote; save it from PEFT converted to plain LoRA "
                         "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    for site, leaves in found.items():
        need = {"lora_a", "lora_b"} | ({"lora_magnitude"} if use_dora else set())
        if set(leaves) != need:
            raise ValueError(f"{site}: adapter tensors {sorted(leaves)}, expected {sorted(need)}")
        if leaves["lora_a"].shape[1] != r or leaves["lora_b"].shape[0] != r:
            raise ValueError(f"{site}: LoRA rank {leaves['lora_a'].shape[1]} but r={r} in "
                             f"{CONFIG_NAME}")
    return lora.LoraConfig(
        r=r, alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=_our_spec(config.get("target_modules"), sorted(found),
                                 targeting.linear_sites(base), all_linear=True),
        use_rslora=bool(config.get("use_rslora", False)), use_dora=use_dora)


def _import_ia3(config: dict, found: dict, base: dict) -> ia3.IA3Config:
    for site, leaves in found.items():
        if set(leaves) != {"ia3"}:
            raise ValueError(f"{site}: adapter tensors {sorted(leaves)}, expected ['ia3']")
    chosen = sorted(found)
    ff = [s for s in chosen if found[s]["ia3"].shape[1] == 1]
    return ia3.IA3Config(
        target_modules=_our_spec(config.get("target_modules"), chosen,
                                 targeting.linear_sites(base), all_linear=True),
        feedforward_modules=_our_spec(config.get("feedforward_modules"), ff, chosen) if ff
        else ())


_IMPORTERS: dict[str, Callable[[dict, dict, dict], Any]] = {
    "LORA": _import_lora,
    "IA3": _import_ia3,
}

# Prompt learning: one `prompt_embeddings` tensor, no per-module keys
# (prompt.py, prefix.py): (config, prompt_embeddings, base) -> (tree, cfg).
_PROMPT_IMPORTERS: dict[str, Callable[[dict, np.ndarray, dict], tuple[dict, Any]]] = {
    "PROMPT_TUNING": prompt.from_peft,
    "P_TUNING": prompt.from_peft,
    "PREFIX_TUNING": prefix.from_peft,
}


def _prompt_embeddings(directory: pathlib.Path) -> np.ndarray:
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        pickled = [n for n in _PICKLED_NAMES if (directory / n).exists()]
        raise (ValueError(f"{directory} holds only a pickled adapter ({pickled[0]}); loading it "
                          "could run arbitrary code, so it is refused. Re-save it with PEFT as "
                          "safetensors") if pickled
               else FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}"))
    tensors = dict(iter_tensors(weights))
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"{weights}: expected one tensor 'prompt_embeddings', found "
                         f"{sorted(tensors)}")
    return np.asarray(tensors["prompt_embeddings"], np.float32)


def import_peft(adapter_dir: str | os.PathLike, base_tree: dict,
                model_type: str = "llama") -> tuple[dict, Any]:
    """Reads a PEFT adapter directory; returns (base_tree + adapter leaves
    (float32, our layouts), our config). The base must be the model the
    adapter was trained on (every tensor is checked against its kernels)."""
    _check_model_type(model_type)
    directory = pathlib.Path(adapter_dir)
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; expected a PEFT adapter "
                                "directory (adapter_config.json + adapter_model.safetensors)")
    config = json.loads((directory / CONFIG_NAME).read_text())
    peft_type = config.get("peft_type")
    if peft_type not in _IMPORTERS and peft_type not in _PROMPT_IMPORTERS:
        raise ValueError(f"{directory}: PEFT adapter type {peft_type!r} is not supported; "
                         f"supported: {', '.join([*_IMPORTERS, *_PROMPT_IMPORTERS])}")
    bad = {k: config[k] for k in _UNSUPPORTED if config.get(k)}
    if config.get("bias", "none") != "none":
        bad["bias"] = config["bias"]
    if bad:
        raise ValueError(f"{directory}: PEFT option(s) {bad} are not supported")
    names = tuple(config.get("modules_to_save") or ())
    if peft_type in _PROMPT_IMPORTERS:
        if names:
            raise ValueError(f"{directory}: modules_to_save is supported with LoRA, DoRA and "
                             f"IA3 adapters, not {peft_type}")
        return _PROMPT_IMPORTERS[peft_type](config, _prompt_embeddings(directory), base_tree)
    found, kept = _read_tensors(directory, base_tree, model_type, names)
    cfg = _IMPORTERS[peft_type](config, found, base_tree)
    tree = base_tree
    for site, leaves in found.items():
        tree = with_site(tree, site, lambda m, x=leaves: {
            **m, **{k: jnp.asarray(v) for k, v in x.items()}})
    if names:
        cfg = dataclasses.replace(cfg, modules_to_save=names)
        absent = [saved.module_name(p, model_type) for p in saved.check(tree, names, model_type)
                  if p not in kept]
        if absent:
            raise ValueError(f"{directory}: modules_to_save selects {absent[:3]}, but "
                             f"{WEIGHTS_NAME} holds no trained weights for them")
        for path, value in kept.items():
            tree = _with_leaf(tree, path, jnp.asarray(value))
    return tree, cfg


def _with_leaf(tree: dict, path: tuple[str, ...], value) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    return with_site(tree, "/".join(path[:-1]), lambda m: {**m, path[-1]: value})


def _check_model_type(model_type: str) -> None:
    # Our trees mirror each family's Hugging Face module names (see hf.py).
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} has no PEFT name mapping; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
