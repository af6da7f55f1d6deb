"""LoRA (Hu et al. 2021, arXiv:2106.09685), rsLoRA (Kalajdzievski 2023,
arXiv:2312.03732) and, with `use_dora=True`, DoRA (dora.py) as pure tree
transforms, following PEFT 0.21's `LoraLayer`.

At each targeted linear site (kernel W of shape (in, out)):

    before: {'kernel': W}
    after:  {'kernel': W, 'lora_a': A (in, r), 'lora_b': B (r, out)}
    y = x @ W + scale * (dropout(x) @ A) @ B,  scale = alpha / r  (rsLoRA: alpha / sqrt(r))

A and B are PEFT's `lora_A.weight.T` and `lora_B.weight.T`. Init as PEFT:
A kaiming-uniform (a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and B = 0, so
a fresh adapter leaves outputs unchanged; "gaussian" draws A ~ N(0, 1/r).
The (in, out) delta A @ B is only formed by `merge`. The forward maths is
sites.linear's.

A mixture's experts (stacked kernels (E, in, out), models/moe.py) take LoRA
through `target_parameters`, PEFT's ParamWrapper (PEFT's names, e.g.
"mlp.experts.gate_up_proj"): one A_e, B_e per expert,

    before: {'kernels': W (E, in, out)}
    after:  {'kernels': W, 'lora_a': A (E, in, r), 'lora_b': B (E, r, out)}
    y = x @ W_e + scale * (x @ A_e) @ B_e   for the rows routed to expert e

(sites.grouped_linear), initialised as PEFT's (E * r)-row lora_A. As in
PEFT, no dropout and no DoRA there. On disk, PEFT's layout: lora_A.weight
(E * r, in) with row e * r + j, lora_B.weight (out, r * E) with column
j * E + e (`to_peft_experts`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from flax_adapters.adapters import dora, targeting
from flax_adapters.adapters.registry import Method, Schema, register
from flax_adapters.tree import combine, get, sites_with, with_site

# PEFT options that change what the weights mean and that we do not
# implement: an adapter using any of them (a truthy value) is refused.
UNSUPPORTED = ("lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
               "layer_replication", "use_qalora", "alora_invocation_tokens",
               "trainable_token_indices", "use_bdlora")
# LoRA inits that also rewrite the base weights: such an adapter only works
# on the residual base saved with it (PEFT converts them on request).
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: targeting.TargetSpec | None = None  # None: the family's preset
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    use_dora: bool = False  # DoRA (dora.py): adds a magnitude vector per site
    modules_to_save: tuple[str, ...] = ()  # base modules trained too (api.py), as PEFT
    # Experts' stacked kernels, by PEFT's parameter names (module docstring); with
    # target_modules=() the experts alone (PEFT's target_modules=[]).
    target_parameters: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        object.__setattr__(self, "target_parameters", tuple(self.target_parameters or ()))
        if isinstance(self.target_modules, list):  # keep the config hashable
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.target_parameters and (self.dropout or self.use_dora):
            raise ValueError(
                "LoRA on expert parameters (target_parameters) takes no dropout and no DoRA, "
                "as PEFT's ParamWrapper: the dropped input cannot be factored out of a merged "
                "expert weight; set dropout=0 and use_dora=False")
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoRA init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def init(base: dict, cfg: LoraConfig, key: jax.Array, ctx: targeting.Context) -> dict:
    """A new tree with float32 `lora_a`, `lora_b` (and DoRA's `lora_magnitude`)
    beside every targeted kernel."""
    tree = base
    experts_only = cfg.target_parameters and cfg.target_modules == ()
    sites = [] if experts_only else targeting.resolve(
        base, cfg.target_modules or ctx.presets.target("lora"))
    if cfg.target_parameters:
        sites += targeting.resolve_parameters(base, cfg.target_parameters)
    for i, site in enumerate(sites):
        module = get(base, site)
        # (in, out), or (E, in, out) stacked kernels: one (A, B) per expert
        *lead, d_in, d_out = module["kernel" if "kernel" in module else "kernels"].shape
        k = jax.random.fold_in(key, i)
        if cfg.init == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (*lead, d_in, cfg.r), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, (*lead, d_in, cfg.r), jnp.float32) / cfg.r
        b = jnp.zeros((*lead, cfg.r, d_out), jnp.float32)
        tree = with_site(tree, site, lambda m, a=a, b=b: {**m, "lora_a": a, "lora_b": b})
    return dora.add_magnitudes(tree, cfg.scale) if cfg.use_dora else tree


def merge(tree: dict, cfg: LoraConfig) -> dict:
    """Folds every LoRA into its kernel: W + scale * A @ B (DoRA: dora.merge)."""
    if cfg.use_dora:
        return dora.merge(tree, cfg.scale)

    def fold(m):
        rest = {k: v for k, v in m.items() if k not in ("lora_a", "lora_b")}
        w = "kernel" if "kernel" in m else "kernels"  # kernels: per expert, a batched product
        delta = cfg.scale * (m["lora_a"] @ m["lora_b"])
        return {**rest, w: (m[w] + delta).astype(m[w].dtype)}
    for site in sites_with(tree, "lora_a"):
        tree = with_site(tree, site, fold)
    return tree


def unmerge(merged: dict, adapter: dict, cfg: LoraConfig, dora_norms: dict | None = None) -> dict:
    """Inverse of `merge`: W' - scale * A @ B at every LoRA site of `adapter`
    (the adapter's leaves), which are put back. DoRA needs the column norms
    from before the merge (dora.py)."""
    if cfg.use_dora:
        return dora.unmerge(merged, adapter, cfg.scale, dora_norms)

    def unfold(m, x):
        name = "kernel" if "kernel" in m else "kernels"
        w = m[name]
        return {**m, name: (w - cfg.scale * (x["lora_a"] @ x["lora_b"])).astype(w.dtype)}
    for site in sites_with(adapter, "lora_a"):
        merged = with_site(merged, site, lambda m, x=get(adapter, site): unfold(m, x))
    return combine(merged, adapter)


# ----------------------------------------------------------------------------- PEFT schema

def to_peft_experts(leaf: str, value):
    """A grouped site's leaf in PEFT's ParamWrapper layout (its get_delta_weight
    reshapes): lora_a (E, in, r) -> lora_A.weight (E * r, in), row e * r + j;
    lora_b (E, r, out) -> lora_B.weight (out, r * E), column j * E + e."""
    e, x, y = value.shape
    if leaf == "lora_a":
        return value.transpose(0, 2, 1).reshape(e * y, x)
    return value.transpose(2, 1, 0).reshape(y, x * e)


def from_peft_experts(leaf: str, value, experts: int):
    """Inverse of `to_peft_experts` for a model of `experts` experts."""
    if leaf == "lora_a":
        return value.reshape(experts, -1, value.shape[-1]).transpose(0, 2, 1)
    return value.reshape(value.shape[0], -1, experts).transpose(2, 1, 0)


def to_json(cfg: LoraConfig, adapter: dict, peft_targets) -> dict:
    chosen = sites_with(adapter, "lora_a")
    linear = [s for s in chosen if get(adapter, s)["lora_a"].ndim == 2]
    if cfg.use_dora:
        bare = [s for s in chosen if "lora_magnitude" not in get(adapter, s)]
        if bare:
            raise ValueError(f"{bare[0]}: the config says DoRA but the tree has no "
                             "lora_magnitude; inject with LoraConfig(use_dora=True)")
    experts = ({"target_parameters": sorted({p.replace("/", ".") for p in cfg.target_parameters})}
               if cfg.target_parameters else {})
    return {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
            "target_modules": peft_targets(cfg.target_modules, linear) if linear else [],
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, **experts}


def from_json(config: dict, found: dict, base: dict) -> LoraConfig:
    bad = {k: config[k] for k in UNSUPPORTED if config.get(k)}
    if bad:
        raise ValueError(f"PEFT LoRA option(s) {bad} are not supported")
    r, use_dora = int(config["r"]), bool(config.get("use_dora", False))
    init_ = config.get("init_lora_weights", True)
    if isinstance(init_, str) and init_.lower().startswith(BASE_REWRITING_INITS):
        raise ValueError(f"init_lora_weights={init_!r}: this adapter expects base weights that "
                         "its init rewrote; save it from PEFT converted to plain LoRA "
                         "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    need = {"lora_a", "lora_b"} | ({"lora_magnitude"} if use_dora else set())
    for site, leaves in found.items():
        if set(leaves) != need:
            raise ValueError(f"{site}: adapter tensors {sorted(leaves)}, expected {sorted(need)}")
    candidates = targeting.linear_sites(base)
    linear = sorted(s for s in found if s in set(candidates))
    return LoraConfig(
        r=r, alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=targeting.spec_for(config.get("target_modules"), linear, candidates,
                                          all_linear=True) if linear else (),
        use_rslora=bool(config.get("use_rslora", False)), use_dora=use_dora,
        # sorted: PEFT writes the set it converted them into, in no fixed order
        target_parameters=tuple(sorted(config.get("target_parameters") or ())))


register(Method(
    name="lora", config=LoraConfig,
    leaves=frozenset({"lora_a", "lora_b", "lora_magnitude"}),
    init=init,
    settings=lambda cfg, presets: {"lora_scale": cfg.scale, "lora_dropout": cfg.dropout},
    merge=merge, unmerge=unmerge,
    schema=Schema(peft_type="LORA", loader="PEFT", to_json=to_json, from_json=from_json,
                  site_tensors={"lora_a": "lora_A.weight", "lora_b": "lora_B.weight",
                                "lora_magnitude": "lora_magnitude_vector"},
                  aliases={"lora_magnitude_vector.weight": "lora_magnitude"}),
))
