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
from flax_adapters.adapters.tree import combine, get, split, with_site


@dataclasses.dataclass(frozen=True)
class IA3Config:
    target_modules: targeting.TargetSpec | None = None  # None: the family's preset
    feedforward_modules: targeting.TargetSpec | None = None  # None: the family's preset
    modules_to_save: tuple[str, ...] = ()  # base modules trained too (saved.py), as PEFT

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
    return any(site == x or site.endswith("/" + x) for x in spec)


def targets(base: dict, cfg: IA3Config, model_type: str = "llama") -> list[str]:
    return targeting.resolve(base, cfg.target_modules or targeting.preset(model_type, "ia3"))


def init(base: dict, cfg: IA3Config, key: jax.Array | None = None,
         model_type: str = "llama") -> dict:
    """A new tree with a float32 `ia3` of ones at every targeted site
    ((in, 1) at feedforward sites, (1, out) elsewhere). `key` is unused."""
    ff = cfg.feedforward_modules
    if ff is None:
        ff = targeting.preset(model_type, "ia3_feedforward")
    tree = base
    for site in targets(base, cfg, model_type):
        d_in, d_out = get(base, site)["kernel"].shape
        shape = (d_in, 1) if is_feedforward(site, ff) else (1, d_out)
        tree = with_site(tree, site, lambda m, s=shape: {**m, "ia3": jnp.ones(s, jnp.float32)})
    return tree


def _sites(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            if "ia3" in v:
                yield prefix + k
            else:
                yield from _sites(v, prefix + k + "/")


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
    for site in list(_sites(tree)):
        tree = with_site(tree, site, fold)
    return tree


def unmerge(merged: dict, adapter: dict, cfg: IA3Config) -> dict:
    """Inverse of `merge` (W' / l), the adapter leaves put back."""
    adapter = split(adapter).trainable
    for site in list(_sites(adapter)):
        l = get(adapter, site)["ia3"]
        merged = with_site(merged, site, lambda mod, l=l: _scale(mod, l, inverse=True))
    return combine(merged, adapter)
