"""(IA)^3, infused adapter by inhibiting and amplifying inner activations
(Liu et al. 2022, arXiv:2205.05638), as PEFT 0.21's `IA3Config` / `ia3.Linear`.

One learned vector per targeted linear site, initialised to ones. On
ordinary modules (LLaMA: k_proj, v_proj) it scales the output, bias
included; on "feedforward" modules (LLaMA: down_proj) it scales the input:

    before: {'kernel': W (in, out)}
    after (output):      {'kernel': W, 'ia3': l (1, out)}    y = (x W + b) * l
    after (feedforward): {'kernel': W, 'ia3': l (in, 1)}     y = (x * l) W + b

The vector is stored as the 2-D shape that broadcasts against the (in, out)
kernel -- PEFT's own `ia3_l` shapes, (out, 1) and (1, in), transposed like
every kernel. So the tree alone says which side is scaled (no static flag the
model must carry, unambiguous even for square kernels), merging is W * l,
and the PEFT export is a transpose. Merge also scales the bias of an output
site, as PEFT; unmerge divides (PEFT adds 1e-8 to l first; we divide
exactly, which is the same in float32 for l near 1).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from flax_adapters.adapters import targeting
from flax_adapters.adapters.registry import Method, Schema, register
from flax_adapters.tree import combine, get, sites_with, with_site


@dataclasses.dataclass(frozen=True)
class IA3Config:
    target_modules: targeting.TargetSpec | None = None  # None: the family's preset
    feedforward_modules: targeting.TargetSpec | None = None  # None: the family's preset
    modules_to_save: tuple[str, ...] = ()  # base modules trained too (api.py), as PEFT

    def __post_init__(self):
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        # Lists become tuples: the config must be hashable (it keys jit caches).
        for name in ("target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        t, f = self.target_modules, self.feedforward_modules
        if isinstance(t, tuple) and isinstance(f, tuple) and not set(f) <= set(t):
            raise ValueError(f"IA3 feedforward_modules {f} must be a subset of target_modules "
                             f"{t} (as in PEFT)")


def is_feedforward(site: str, spec: targeting.TargetSpec) -> bool:
    """Whether `site` (e.g. 'layers_0/mlp/down_proj') is selected by a
    feedforward spec: a regex (full match) or a list of name suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, site) is not None
    return targeting.matches(site, spec)


def init(base: dict, cfg: IA3Config, key: jax.Array, ctx: targeting.Context) -> dict:
    """A new tree with a float32 `ia3` of ones at every targeted site
    ((in, 1) at feedforward sites, (1, out) elsewhere). `key` is unused."""
    del key
    ff = cfg.feedforward_modules
    if ff is None:
        ff = ctx.presets.target("ia3_feedforward")
    tree = base
    for site in targeting.resolve(base, cfg.target_modules or ctx.presets.target("ia3")):
        d_in, d_out = get(base, site)["kernel"].shape
        shape = (d_in, 1) if is_feedforward(site, ff) else (1, d_out)
        tree = with_site(tree, site, lambda m, s=shape: {**m, "ia3": jnp.ones(s, jnp.float32)})
    return tree


def _scale(mod: dict, l: jax.Array, inverse: bool) -> dict:
    op = jnp.divide if inverse else jnp.multiply
    w = mod["kernel"]
    out = {**mod, "kernel": op(w.astype(jnp.float32), l).astype(w.dtype)}
    if "bias" in mod and l.shape[0] == 1:  # output scaling covers the bias too
        out["bias"] = op(mod["bias"].astype(jnp.float32), l[0]).astype(mod["bias"].dtype)
    return out


def merge(tree: dict, cfg: IA3Config) -> dict:
    """W * l (and b * l at output sites); a plain base tree."""
    def fold(mod):
        rest = {k: v for k, v in mod.items() if k != "ia3"}
        return _scale(rest, mod["ia3"], inverse=False)
    for site in sites_with(tree, "ia3"):
        tree = with_site(tree, site, fold)
    return tree


def unmerge(merged: dict, adapter: dict, cfg: IA3Config) -> dict:
    """Inverse of `merge` (W' / l), the adapter leaves put back."""
    for site in sites_with(adapter, "ia3"):
        merged = with_site(merged, site, lambda mod, l=get(adapter, site)["ia3"]:
                           _scale(mod, l, inverse=True))
    return combine(merged, adapter)


# ----------------------------------------------------------------------------- PEFT schema

def to_json(cfg: IA3Config, adapter: dict, peft_targets) -> dict:
    chosen = sites_with(adapter, "ia3")
    feedforward = [s for s in chosen if get(adapter, s)["ia3"].shape[1] == 1]
    return {"target_modules": peft_targets(cfg.target_modules, chosen),
            "feedforward_modules": (peft_targets(cfg.feedforward_modules, feedforward)
                                    if feedforward else []),
            "fan_in_fan_out": False, "init_ia3_weights": True}


def from_json(config: dict, found: dict, base: dict) -> IA3Config:
    if config.get("fan_in_fan_out"):
        raise ValueError("PEFT IA3 option fan_in_fan_out=true is not supported")
    for site, leaves in found.items():
        if set(leaves) != {"ia3"}:
            raise ValueError(f"{site}: adapter tensors {sorted(leaves)}, expected ['ia3']")
    chosen = sorted(found)
    ff = [s for s in chosen if found[s]["ia3"].shape[1] == 1]
    return IA3Config(
        target_modules=targeting.spec_for(config.get("target_modules"), chosen,
                                          targeting.linear_sites(base), all_linear=True),
        feedforward_modules=targeting.spec_for(config.get("feedforward_modules"), ff, chosen)
        if ff else ())


register(Method(
    name="ia3", config=IA3Config, leaves=frozenset({"ia3"}), init=init,
    merge=merge, unmerge=unmerge,
    schema=Schema(peft_type="IA3", loader="PEFT", to_json=to_json, from_json=from_json,
                  site_tensors={"ia3": "ia3_l"}),
))
