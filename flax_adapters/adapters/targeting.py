"""Which sites an adapter attaches to: resolved once, from parameter paths.

A linear site is a module of the base tree holding a `kernel`; its name is
its path joined with '/', e.g. `layers_3/self_attn/q_proj`. A target spec is
a list of suffixes of the module name (PEFT's `target_modules`: "q_proj"
matches every layer's q_proj), a regex string (full match against the
path), or "all-linear" (every linear site but the output head, as PEFT).
A spec that matches nothing is an error naming the sites that exist; the
resolved list is logged.

The default targets of a method depend on the model family; each family
file (models/) states them as a `Presets`, which the methods read here
without knowing any family.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Mapping, Sequence, Union

import jax

from flax_adapters.quant.array import is_quantized
from flax_adapters.tree import path_str

log = logging.getLogger(__name__)

TargetSpec = Union[str, Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Presets:
    """A model family's defaults for the adapter methods.

    targets: method preset name -> module names (PEFT's / LLM-Adapters'
    target mappings: 'lora', 'ia3', 'ia3_feedforward', 'bottleneck'
    (AdapterH), 'adapterp', 'parallel'); series_placement: module name ->
    'input' | 'output', where LLM-Adapters puts a series adapter; notes:
    preset name -> why the family has none (said when one is asked for);
    peft_all_linear: whether PEFT's "all-linear" selects exactly our linear
    sites (False for mixtures of experts: on transformers 5 PEFT also adapts
    their router and experts), else exports name the modules;
    embedding_scale: hidden size -> what the family's embedding module
    multiplies token rows by (Gemma's sqrt(d)), which PEFT's prompt inits
    from vocabulary rows go through."""

    targets: Mapping[str, tuple[str, ...]]
    series_placement: Mapping[str, str]
    notes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    peft_all_linear: bool = True
    embedding_scale: Callable[[int], float] | None = None

    def target(self, method: str) -> tuple[str, ...]:
        if method not in self.targets:
            why = f" ({self.notes[method]})" if method in self.notes else ""
            raise ValueError(f"no target preset for {method!r} on this model family{why}; "
                             "give target_modules explicitly")
        return self.targets[method]


@dataclasses.dataclass(frozen=True)
class Context:
    """What a method's `init` may need beyond the tree: the family's presets
    and, for prompt tuning's text init, a tokenizer function
    (tokenize(tokenizer_name_or_path, text) -> token ids)."""

    presets: Presets
    tokenize: Callable[[str, str], list[int]] | None = None


def linear_sites(tree: dict) -> list[str]:
    """Every module of `tree` that holds a `kernel`, in tree order."""
    sites = []
    # A quantized kernel is one leaf here (its packed arrays are not sites).
    for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]:
        name = path_str(path)
        if name.endswith("/kernel"):
            sites.append(name.removesuffix("/kernel"))
    return sites


def grouped_sites(tree: dict) -> list[str]:
    """Every module of `tree` that holds `kernels`: a mixture's E experts'
    stacked (E, in, out) kernels (models/moe.py), in tree order. They are not
    linear sites: LoRA reaches them through `target_parameters` only, as
    PEFT's ParamWrapper."""
    return [path_str(path).removesuffix("/kernels")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
            if path_str(path).endswith("/kernels")]


def resolve_parameters(tree: dict, names: Sequence[str]) -> list[str]:
    """The grouped sites that parameter names select, by PEFT's rule for its
    `target_parameters`: a suffix of the parameter's name, e.g.
    'mlp.experts.gate_up_proj' (or 'mlp/experts/gate_up_proj') selects every
    layer's `layers_i/mlp/experts/gate_up_proj`."""
    sites = grouped_sites(tree)
    wanted = tuple(n.replace(".", "/") for n in names)
    unmatched = [n for n, w in zip(names, wanted) if not any(matches(s, (w,)) for s in sites)]
    if unmatched:
        have = sorted({".".join(s.split("/")[1:]) for s in sites})
        raise ValueError(f"target_parameters {unmatched} match no stacked expert parameter; "
                         + (f"this model's are {have}" if have else
                            "this model has none (only mixtures of experts do)"))
    chosen = [s for s in sites if matches(s, wanted)]
    log.info("adapter target parameters: %d sites: %s", len(chosen), summarize(chosen))
    return chosen


def matches(site: str, names: Sequence[str]) -> bool:
    """Whether `site` ends with one of `names` (PEFT's suffix rule, at '/')."""
    return any(site == x or site.endswith("/" + x) for x in names)


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
        unmatched = [x for x in suffixes if not any(matches(s, (x,)) for s in sites)]
        if unmatched:
            raise ValueError(f"target(s) {unmatched} match no site; the linear sites are "
                             f"named {sorted({s.rsplit('/', 1)[-1] for s in sites})}")
        chosen = [s for s in sites if matches(s, suffixes)]
    if not chosen:
        raise ValueError(f"targets {spec!r} match no site; the linear sites are named "
                         f"{sorted({s.rsplit('/', 1)[-1] for s in sites})} "
                         f"(full paths like {sites[0]!r})")
    log.info("adapter targets: %d sites: %s", len(chosen), summarize(chosen))
    return chosen


def spec_for(peft_spec, found: list[str], candidates: list[str],
             all_linear: bool = False) -> TargetSpec:
    """Our spec selecting exactly the sites `found` (those an adapter file
    holds tensors for) out of `candidates`: the file's list of name
    suffixes when it means that, else "all-linear" when that is what was
    found (PEFT saves it expanded), else an exact regex."""
    if isinstance(peft_spec, (list, tuple)):
        # PEFT's suffixes end at a '.', ours at a '/': 'mlp.dense_4h_to_h' -> 'mlp/dense_4h_to_h'.
        # PEFT lets a name match nothing if another matches (its Mixtral IA3 default "w2",
        # a module transformers 5 no longer has); our specs refuse them, so they go.
        names = tuple(sorted(x.replace(".", "/") for x in peft_spec
                             if any(matches(s, (x.replace(".", "/"),)) for s in candidates)))
        if names and set(found) == {s for s in candidates if matches(s, names)}:
            return names
    if all_linear and set(found) == {s for s in candidates if s != "lm_head"}:
        return "all-linear"
    return "(" + "|".join(re.escape(s) for s in found) + ")"


def _layer_order(head: str) -> tuple:
    """'layers_10' after 'layers_2': numbers compare as numbers."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", head))


def summarize(chosen: list[str]) -> str:
    """'q_proj x30 (layers_0..layers_29), v_proj x30 (...)': the resolved list, short."""
    groups: dict[str, list[str]] = {}
    for site in chosen:
        head, _, name = site.rpartition("/")
        groups.setdefault(name, []).append(head.split("/")[0])
    out = []
    for name, heads in groups.items():
        heads = sorted(heads, key=_layer_order)
        out.append(f"{name} x{len(heads)} ({heads[0]}..{heads[-1]})" if len(heads) > 1
                   else f"{name} ({heads[0]})")
    return ", ".join(out)
