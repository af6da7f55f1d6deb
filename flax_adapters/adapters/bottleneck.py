"""Bottleneck adapters exactly as LLM-Adapters defines them (Hu et al. 2023,
"LLM-Adapters", arXiv:2304.01933; reference implementation
AGI-Edgerunners/LLM-Adapters, `peft/src/peft/tuners/bottleneck.py`).

    adapter(x) = up(act(down(dropout(x)))) * scaling        (no biases)

placed at a targeted linear site y = x @ W (+ b) in one of three ways:

    input   ("mh_adapter", LLaMA gate_proj, up_proj):  y = (x + adapter(x)) @ W (+ b)
    output  ("output_adapter", LLaMA down_proj):       y = y + adapter(y)
    parallel ("parallel_adapter", any site):           y = y + adapter(x)

AdapterH (Houlsby, the "series" adapter) = input/output placement on gate,
up and down; AdapterP (Pfeiffer) = output placement after down_proj only;
the parallel adapter sits beside q, k and v (LLM-Adapters' target presets,
stated per family in models/). Series placement follows the module's name,
as LLM-Adapters' TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING does
(`Presets.series_placement`).

At each targeted site (kernel W of shape (in, out)):

    before: {'kernel': W}
    after:  {'kernel': W, 'adapter_down': (a, bn), 'adapter_up': (bn, a2)
             [, 'adapter_scaling': (1,) when scaling == "learned"]}

with (a, a2) = (in, in) for input, (out, out) for output and (in, out) for
parallel. The leaves are the transposes of LLM-Adapters' `adapter_down.weight`
and `adapter_up.weight`, and its `adapter_scaling` parameter (ones(1)).

Init, as LLM-Adapters: "bert" (its default) draws both projections from
N(0, 0.02), so a fresh adapter is NOT an identity; "mam_adapter" draws
`adapter_down` kaiming-uniform (a=sqrt(5)) and zeroes `adapter_up`, so a
fresh adapter leaves the model unchanged.

On disk: LLM-Adapters' BOTTLENECK schema (its `adapter_config.json` fields
and state-dict key names, `base_model.model.model.layers.N.mlp.down_proj.
adapter_down.weight`), written as safetensors, never a pickle.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from flax_adapters.activations import ACTIVATIONS
from flax_adapters.adapters import targeting
from flax_adapters.adapters.registry import Method, Schema, register
from flax_adapters.tree import get, sites_with, with_site

LEAVES = ("adapter_down", "adapter_up", "adapter_scaling")


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """LLM-Adapters' BottleneckConfig (its `init_weights` is our `init`)."""

    bottleneck_size: int = 256
    non_linearity: str = "tanh"
    adapter_dropout: float = 0.0
    scaling: float | Literal["learned"] = 1.0
    use_parallel_adapter: bool = False
    use_adapterp: bool = False
    target_modules: targeting.TargetSpec | None = None  # None: the method's preset
    init: Literal["bert", "mam_adapter"] = "bert"

    def __post_init__(self):
        if self.bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be positive, got {self.bottleneck_size}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity {self.non_linearity!r} is not supported; "
                             f"choose one of {sorted(ACTIVATIONS)}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if isinstance(self.scaling, str) and self.scaling != "learned":
            raise ValueError(f"scaling must be a number or 'learned', got {self.scaling!r}")
        if self.use_parallel_adapter and self.use_adapterp:
            raise ValueError("use_parallel_adapter and use_adapterp are exclusive: AdapterP is a "
                             "series adapter after the MLP; pick one")
        if self.init not in ("bert", "mam_adapter"):
            raise ValueError(f"init must be 'bert' (N(0, 0.02), LLM-Adapters' default) or "
                             f"'mam_adapter' (zero up-projection: identity), got {self.init!r}")
        if isinstance(self.target_modules, list):  # keep the config hashable
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def preset(self) -> str:
        """The name of this variant's target preset (`Presets.targets`)."""
        if self.use_parallel_adapter:
            return "parallel"
        return "adapterp" if self.use_adapterp else "bottleneck"


def placement(site: str, cfg: BottleneckConfig, presets: targeting.Presets) -> str:
    """'input', 'output' or 'parallel' for the site `a/b/module`."""
    if cfg.use_parallel_adapter:
        return "parallel"
    name = site.rsplit("/", 1)[-1]
    if name not in presets.series_placement:
        raise ValueError(f"a series bottleneck adapter cannot go on {site!r}: on this model "
                         f"family LLM-Adapters places series adapters only on "
                         f"{sorted(presets.series_placement)}; use use_parallel_adapter=True "
                         "to put adapters beside other modules")
    return presets.series_placement[name]


def settings(cfg: BottleneckConfig, presets: targeting.Presets) -> dict:
    """The `sites.Settings` fields for `cfg`."""
    return dict(
        bottleneck_series=tuple(sorted(presets.series_placement.items())),
        bottleneck_parallel=cfg.use_parallel_adapter,
        bottleneck_act=cfg.non_linearity,
        bottleneck_dropout=cfg.adapter_dropout,
        bottleneck_scaling=1.0 if cfg.scaling == "learned" else float(cfg.scaling),
    )


def apply(x: jax.Array, down: jax.Array, up: jax.Array, scaling, act: str) -> jax.Array:
    """adapter(x) = up(act(down(x))) * scaling, in x's dtype (dropout is the caller's)."""
    h = ACTIVATIONS[act](x @ down.astype(x.dtype))
    return (h @ up.astype(x.dtype)) * jnp.asarray(scaling, x.dtype)


def init(base: dict, cfg: BottleneckConfig, key: jax.Array, ctx: targeting.Context) -> dict:
    """A new tree with float32 adapter leaves at every targeted site."""
    tree = base
    bn = cfg.bottleneck_size
    spec = cfg.target_modules or ctx.presets.target(cfg.preset)
    for i, site in enumerate(targeting.resolve(base, spec)):
        d_in, d_out = get(base, site)["kernel"].shape
        a, a2 = {"input": (d_in, d_in), "output": (d_out, d_out),
                 "parallel": (d_in, d_out)}[placement(site, cfg, ctx.presets)]
        k_down, k_up = jax.random.split(jax.random.fold_in(key, i))
        if cfg.init == "bert":
            down = 0.02 * jax.random.normal(k_down, (a, bn), jnp.float32)
            up = 0.02 * jax.random.normal(k_up, (bn, a2), jnp.float32)
        else:  # torch's kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(a)
            down = jax.random.uniform(k_down, (a, bn), jnp.float32, -bound, bound)
            up = jnp.zeros((bn, a2), jnp.float32)
        leaves = {"adapter_down": down, "adapter_up": up}
        if cfg.scaling == "learned":
            leaves["adapter_scaling"] = jnp.ones((1,), jnp.float32)
        tree = with_site(tree, site, lambda m, leaves=leaves: {**m, **leaves})
    return tree


# ----------------------------------------------------------------------------- LLM-Adapters schema

def to_json(cfg: BottleneckConfig, adapter: dict, peft_targets) -> dict:
    """LLM-Adapters' BottleneckConfig fields as its save_pretrained writes
    them; the targets are the adapted modules' names (its suffix rule)."""
    del peft_targets
    names = sorted({s.rsplit("/", 1)[-1] for s in sites_with(adapter, "adapter_down")})
    return {
        "adapter_dropout": cfg.adapter_dropout,
        "bias": "none",
        "bottleneck_size": cfg.bottleneck_size,
        "init_weights": cfg.init,
        "non_linearity": cfg.non_linearity,
        # LLM-Adapters tests `isinstance(scaling, float)`: always write a float.
        "scaling": cfg.scaling if cfg.scaling == "learned" else float(cfg.scaling),
        "target_modules": names,
        "use_adapterp": cfg.use_adapterp,
        "use_parallel_adapter": cfg.use_parallel_adapter,
    }


def from_json(config: dict, found: dict, base: dict) -> BottleneckConfig:
    del found, base
    target = config.get("target_modules")
    return BottleneckConfig(
        bottleneck_size=int(config["bottleneck_size"]),
        non_linearity=config.get("non_linearity", "tanh"),
        adapter_dropout=float(config.get("adapter_dropout", 0.0)),
        scaling=config.get("scaling", 1.0),
        use_parallel_adapter=bool(config.get("use_parallel_adapter", False)),
        use_adapterp=bool(config.get("use_adapterp", False)),
        target_modules=tuple(target) if isinstance(target, list) else target,
        init=config.get("init_weights", "bert"),
    )


register(Method(
    name="bottleneck", config=BottleneckConfig, leaves=frozenset(LEAVES), init=init,
    settings=settings,
    schema=Schema(peft_type="BOTTLENECK", loader="LLM-Adapters", to_json=to_json,
                  from_json=from_json,
                  site_tensors={"adapter_down": "adapter_down.weight",
                                "adapter_up": "adapter_up.weight",
                                "adapter_scaling": "adapter_scaling"}),
))
