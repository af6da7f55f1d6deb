"""LoRA (Hu et al. 2021, arXiv:2106.09685) and rsLoRA (Kalajdzievski 2023,
arXiv:2312.03732) as pure tree transforms, following PEFT's `LoraLayer`.

At each targeted linear site (kernel W of shape (in, out)):

    before: {'kernel': W}
    after:  {'kernel': W, 'lora_a': A (in, r), 'lora_b': B (r, out)}
    y = x @ W + scale * (dropout(x) @ A) @ B,  scale = alpha / r  (rsLoRA: alpha / sqrt(r))

A and B are PEFT's `lora_A.weight.T` and `lora_B.weight.T`. Init as PEFT:
A kaiming-uniform (a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and B = 0, so
a fresh adapter leaves outputs unchanged; "gaussian" draws A ~ N(0, 1/r).
The (in, out) delta A @ B is only formed by `merge`. `use_dora=True` makes
the same leaves a DoRA adapter (PEFT's flag; see dora.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from flax_adapters.adapters import targeting
from flax_adapters.adapters.tree import combine, get, split, with_site


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: targeting.TargetSpec | None = None  # None: the family's preset
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    use_dora: bool = False  # DoRA (dora.py): adds a magnitude vector per site
    modules_to_save: tuple[str, ...] = ()  # base modules trained too (saved.py), as PEFT

    def __post_init__(self):
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoRA init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def targets(base: dict, cfg: LoraConfig, model_type: str = "llama") -> list[str]:
    return targeting.resolve(base, cfg.target_modules or targeting.preset(model_type, "lora"))


def init(base: dict, cfg: LoraConfig, key: jax.Array, model_type: str = "llama") -> dict:
    """A new tree with float32 `lora_a`, `lora_b` beside every targeted kernel."""
    tree = base
    for i, site in enumerate(targets(base, cfg, model_type)):
        d_in, d_out = get(base, site)["kernel"].shape
        k = jax.random.fold_in(key, i)
        if cfg.init == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (d_in, cfg.r), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, (d_in, cfg.r), jnp.float32) / cfg.r
        b = jnp.zeros((cfg.r, d_out), jnp.float32)
        tree = with_site(tree, site, lambda m, a=a, b=b: {**m, "lora_a": a, "lora_b": b})
    return tree


def _sites(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            if "lora_a" in v:
                yield prefix + k
            else:
                yield from _sites(v, prefix + k + "/")


def merge(tree: dict, cfg: LoraConfig) -> dict:
    """Folds every LoRA into its kernel: W + scale * A @ B; returns a base tree."""
    def fold(m):
        rest = {k: v for k, v in m.items() if k not in ("lora_a", "lora_b")}
        delta = cfg.scale * (m["lora_a"] @ m["lora_b"])
        return {**rest, "kernel": (m["kernel"] + delta).astype(m["kernel"].dtype)}
    for site in list(_sites(tree)):
        tree = with_site(tree, site, fold)
    return tree


def unmerge(merged: dict, adapter: dict, cfg: LoraConfig) -> dict:
    """Inverse of `merge`: W' - scale * A @ B at every LoRA site of `adapter`
    (the adapted tree or just its trainable part), whose leaves are put back:

        unmerge(merge(tree, cfg), split(tree).trainable, cfg) == tree  (to rounding)
    """
    adapter = split(adapter).trainable
    def unfold(m, a, b):
        w = m["kernel"]
        return {**m, "kernel": (w - cfg.scale * (a @ b)).astype(w.dtype)}
    for site in list(_sites(adapter)):
        leaves = get(adapter, site)
        merged = with_site(merged, site, lambda m, x=leaves: unfold(m, x["lora_a"], x["lora_b"]))
    return combine(merged, adapter)
