"""Which sites an adapter attaches to: resolved once, from parameter paths.

A linear site is a module of the base tree holding a `kernel`; its name is
its path joined with '/', e.g. `layers_3/self_attn/q_proj`. A target spec is
a list of suffixes of the module name (PEFT's `target_modules`: "q_proj"
matches every layer's q_proj), a regex string (full match against the
path), or "all-linear" (every linear site but the output head, as PEFT).
A spec that matches nothing is an error naming the sites that exist; the
resolved list is logged.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence, Union

import jax

from flax_adapters.quant.array import is_quantized

log = logging.getLogger(__name__)

TargetSpec = Union[str, Sequence[str]]

# Default targets per family: LoRA as PEFT's (and LLM-Adapters')
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING; the bottleneck adapters as
# LLM-Adapters' BOTTLENECK / ADAPTERP / PARALLEL_ADAPTER mappings; IA3 as PEFT's
# IA3 target and feedforward mappings. LLM-Adapters has no bottleneck mapping
# for GPT-NeoX: ours follows BLOOM's (the same MLP and fused attention names).
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {
        "lora": ("q_proj", "v_proj"),
        "bottleneck": ("gate_proj", "up_proj", "down_proj"),  # AdapterH (series)
        "adapterp": ("down_proj",),  # AdapterP (Pfeiffer)
        "parallel": ("q_proj", "k_proj", "v_proj"),
        "ia3": ("k_proj", "v_proj", "down_proj"),  # PEFT's default for llama
        "ia3_feedforward": ("down_proj",),
    },
    "bloom": {
        "lora": ("query_key_value",),
        "bottleneck": ("dense_h_to_4h", "dense_4h_to_h"),
        "adapterp": ("dense_4h_to_h",),
        "parallel": ("query_key_value",),
        "ia3": ("query_key_value", "dense_4h_to_h"),  # PEFT: mlp.dense_4h_to_h, the same
        "ia3_feedforward": ("dense_4h_to_h",),
    },
    "opt": {
        "lora": ("q_proj", "v_proj"),
        "bottleneck": ("fc1", "fc2"),
        "adapterp": ("fc2",),
        "parallel": ("q_proj", "k_proj", "v_proj"),
        "ia3": ("q_proj", "k_proj", "fc2"),
        "ia3_feedforward": ("fc2",),
    },
    "gptj": {
        "lora": ("q_proj", "v_proj"),
        "bottleneck": ("fc_in", "fc_out"),
        "adapterp": ("fc_out",),
        "parallel": ("q_proj", "k_proj", "v_proj"),
        "ia3": ("q_proj", "v_proj", "fc_out"),
        "ia3_feedforward": ("fc_out",),
    },
    "gpt_neox": {
        "lora": ("query_key_value",),
        "bottleneck": ("dense_h_to_4h", "dense_4h_to_h"),
        "adapterp": ("dense_4h_to_h",),
        "parallel": ("query_key_value",),
        "ia3": ("query_key_value", "dense_4h_to_h"),
        "ia3_feedforward": ("dense_4h_to_h",),
    },
}
PRESETS["mistral"] = PRESETS["qwen2"] = PRESETS["llama"]


def path_str(path) -> str:
    """A jax key path as 'a/b/c'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def linear_sites(tree: dict) -> list[str]:
    """Every module of `tree` that holds a `kernel`, in tree order."""
    sites = []
    # A quantized kernel is one leaf here (its packed arrays are not sites).
    for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]:
        name = path_str(path)
        if name.endswith("/kernel"):
            sites.append(name.removesuffix("/kernel"))
    return sites


def resolve(tree: dict, spec: TargetSpec) -> list[str]:
    """The linear sites of `tree` that `spec` selects (see module docstring)."""
    sites = linear_sites(tree)
    if spec == "all-linear":
        chosen = [s for s in sites if s != "lm_head"]
    elif isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"target regex {spec!r} is invalid: {e}") from None
        chosen = [s for s in sites if pattern.fullmatch(s)]
    else:
        suffixes = tuple(spec)
        unmatched = [x for x in suffixes if not any(s == x or s.endswith("/" + x) for s in sites)]
        if unmatched:
            raise ValueError(f"target(s) {unmatched} match no site; the linear sites are "
                             f"named {sorted({s.rsplit('/', 1)[-1] for s in sites})}")
        chosen = [s for s in sites if any(s == x or s.endswith("/" + x) for x in suffixes)]
    if not chosen:
        raise ValueError(f"targets {spec!r} match no site; the linear sites are named "
                         f"{sorted({s.rsplit('/', 1)[-1] for s in sites})} "
                         f"(full paths like {sites[0]!r})")
    log.info("adapter targets: %d sites: %s", len(chosen), summarize(chosen))
    return chosen


def summarize(chosen: list[str]) -> str:
    """'q_proj x30 (layers_0..layers_29), v_proj x30 (...)': the resolved list, short."""
    groups: dict[str, list[str]] = {}
    for site in chosen:
        head, _, name = site.rpartition("/")
        groups.setdefault(name, []).append(head.split("/")[0])
    return ", ".join(f"{name} x{len(heads)} ({heads[0]}..{heads[-1]})" if len(heads) > 1
                     else f"{name} ({heads[0]})" for name, heads in groups.items())


def preset(model_type: str, method: str) -> tuple[str, ...]:
    try:
        return PRESETS[model_type][method]
    except KeyError:
        raise ValueError(f"no target preset for method {method!r} on {model_type!r}; "
                         "give target_modules explicitly") from None
