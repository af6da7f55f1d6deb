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
               "trainable_token_indices", "use_bdlora", "target_parameters")
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

    def __post_init__(self):
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        if isinstance(self.target_modules, list):  # keep the config hashable
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
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
    spec = cfg.target_modules or ctx.presets.target("lora")
    for i, site in enumerate(targeting.resolve(base, spec)):
        d_in, d_out = get(base, site)["kernel"].shape
        k = jax.random.fold_in(key, i)
        if cfg.init == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (d_in, cfg.r), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, (d_in, cfg.r), jnp.float32) / cfg.r
        b = jnp.zeros((cfg.r, d_out), jnp.float32)
        tree = with_site(tree, site, lambda m, a=a, b=b: {**m, "lora_a": a, "lora_b": b})
    return dora.add_magnitudes(tree, cfg.scale) if cfg.use_dora else tree


def merge(tree: dict, cfg: LoraConfig) -> dict:
    """Folds every LoRA into its kernel: W + scale * A @ B (DoRA: dora.merge)."""
    if cfg.use_dora:
        return dora.merge(tree, cfg.scale)

    def fold(m):
        rest = {k: v for k, v in m.items() if k not in ("lora_a", "lora_b")}
        delta = cfg.scale * (m["lora_a"] @ m["lora_b"])
        return {**rest, "kernel": (m["kernel"] + delta).astype(m["kernel"].dtype)}
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
        w = m["kernel"]
        return {**m, "kernel": (w - cfg.scale * (x["lora_a"] @ x["lora_b"])).astype(w.dtype)}
    for site in sites_with(adapter, "lora_a"):
        merged = with_site(merged, site, lambda m, x=get(adapter, site): unfold(m, x))
    return combine(merged, adapter)


# ----------------------------------------------------------------------------- PEFT schema

def to_json(cfg: LoraConfig, adapter: dict, peft_targets) -> dict:
    chosen = sites_with(adapter, "lora_a")
    if cfg.use_dora:
        bare = [s for s in chosen if "lora_magnitude" not in get(adapter, s)]
        if bare:
            raise ValueError(f"{bare[0]}: the config says DoRA but the tree has no "
                             "lora_magnitude; inject with LoraConfig(use_dora=True)")
    return {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
            "target_modules": peft_targets(cfg.target_modules, chosen),
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True}


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
    return LoraConfig(
        r=r, alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=targeting.spec_for(config.get("target_modules"), sorted(found),
                                          targeting.linear_sites(base), all_linear=True),
        use_rslora=bool(config.get("use_rslora", False)), use_dora=use_dora)


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
