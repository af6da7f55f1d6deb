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
the parallel adapter sits beside q, k and v (LLM-Adapters' target presets).
Series placement follows the module's name, as LLM-Adapters'
TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING does.

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

Export/import use LLM-Adapters' BOTTLENECK schema: its `adapter_config.json`
fields, and its state-dict key names
(`base_model.model.model.layers.N.mlp.down_proj.adapter_down.weight`), but
in `adapter_model.safetensors`, never a pickle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.adapters import targeting
from flax_adapters.adapters.tree import get, with_site

# transformers' ACT2FN names, as LLM-Adapters looks them up ("gelu" is the exact erf form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),  # GPT-NeoX-20B's; same formula
}

# LLM-Adapters' TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING for the families we model:
# where a series adapter sits, by the targeted module's name.
# GPT-NeoX (not in LLM-Adapters) follows BLOOM: the same MLP names.
SERIES_PLACEMENT: dict[str, dict[str, str]] = {
    "llama": {"gate_proj": "input", "up_proj": "input", "down_proj": "output"},
    "bloom": {"dense_h_to_4h": "input", "dense_4h_to_h": "output"},
    "gptj": {"fc_in": "input", "fc_out": "output"},
    "opt": {"fc1": "input", "fc2": "output"},
    "gpt_neox": {"dense_h_to_4h": "input", "dense_4h_to_h": "output"},
}
SERIES_PLACEMENT["mistral"] = SERIES_PLACEMENT["qwen2"] = SERIES_PLACEMENT["llama"]

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
    def method(self) -> str:
        """The preset name in `targeting.PRESETS`."""
        if self.use_parallel_adapter:
            return "parallel"
        return "adapterp" if self.use_adapterp else "bottleneck"


def targets(base: dict, cfg: BottleneckConfig, model_type: str = "llama") -> list[str]:
    return targeting.resolve(base, cfg.target_modules or targeting.preset(model_type, cfg.method))


def placement(site: str, cfg: BottleneckConfig, model_type: str = "llama") -> str:
    """'input', 'output' or 'parallel' for the site `a/b/module`."""
    if cfg.use_parallel_adapter:
        return "parallel"
    name = site.rsplit("/", 1)[-1]
    table = SERIES_PLACEMENT.get(model_type, {})
    if name not in table:
        raise ValueError(f"a series bottleneck adapter cannot go on {site!r}: on {model_type} "
                         f"LLM-Adapters places series adapters only on {sorted(table)}; use "
                         "use_parallel_adapter=True to put adapters beside other modules")
    return table[name]


def settings_kwargs(cfg: BottleneckConfig, model_type: str = "llama") -> dict:
    """The `sites.Settings` fields for `cfg` (see `api.settings_for`)."""
    return dict(
        bottleneck_series=tuple(sorted(SERIES_PLACEMENT.get(model_type, {}).items())),
        bottleneck_parallel=cfg.use_parallel_adapter,
        bottleneck_act=cfg.non_linearity,
        bottleneck_dropout=cfg.adapter_dropout,
        bottleneck_scaling=1.0 if cfg.scaling == "learned" else float(cfg.scaling),
    )


def apply(x: jax.Array, down: jax.Array, up: jax.Array, scaling, act: str) -> jax.Array:
    """adapter(x) = up(act(down(x))) * scaling, in x's dtype (dropout is the caller's)."""
    h = ACTIVATIONS[act](x @ down.astype(x.dtype))
    return (h @ up.astype(x.dtype)) * jnp.asarray(scaling, x.dtype)


def init(base: dict, cfg: BottleneckConfig, key: jax.Array, model_type: str = "llama") -> dict:
    """A new tree with float32 adapter leaves at every targeted site."""
    tree = base
    bn = cfg.bottleneck_size
    for i, site in enumerate(targets(base, cfg, model_type)):
        d_in, d_out = get(base, site)["kernel"].shape
        a, a2 = {"input": (d_in, d_in), "output": (d_out, d_out),
                 "parallel": (d_in, d_out)}[placement(site, cfg, model_type)]
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


def adapter_sites(tree: dict, prefix: str = ""):
    """The paths of the modules that hold bottleneck leaves, in tree order."""
    for k, v in tree.items():
        if isinstance(v, dict):
            if "adapter_down" in v:
                yield prefix + k
            else:
                yield from adapter_sites(v, prefix + k + "/")


# ----------------------------------------------------------------------------- LLM-Adapters I/O

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(.+)\.(adapter_down\.weight|adapter_up\.weight|"
                  r"adapter_scaling)")


def _torch_key(site: str, leaf: str, model_type: str) -> str:
    """'layers_3/mlp/down_proj', 'adapter_down' -> LLM-Adapters' state-dict key
    'base_model.model.model.layers.3.mlp.down_proj.adapter_down.weight' (the
    family's Hugging Face module name)."""
    from flax_adapters.adapters.peft_io import module_name  # imports the checkpoints

    name = leaf if leaf == "adapter_scaling" else f"{leaf}.weight"
    return f"base_model.model.{module_name(site, model_type)}.{name}"


def _config_json(cfg: BottleneckConfig, targets_: list[str], base_model: str | None) -> dict:
    """LLM-Adapters' BottleneckConfig as its save_pretrained writes it."""
    return {
        "adapter_dropout": cfg.adapter_dropout,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "bottleneck_size": cfg.bottleneck_size,
        "inference_mode": True,
        "init_weights": cfg.init,
        "modules_to_save": None,
        "non_linearity": cfg.non_linearity,
        "peft_type": "BOTTLENECK",
        # LLM-Adapters tests `isinstance(scaling, float)`: always write a float.
        "scaling": cfg.scaling if cfg.scaling == "learned" else float(cfg.scaling),
        "target_modules": targets_,
        "task_type": "CAUSAL_LM",
        "use_adapterp": cfg.use_adapterp,
        "use_parallel_adapter": cfg.use_parallel_adapter,
    }


def export_bottleneck(tree: dict, cfg: BottleneckConfig, out_dir: str | os.PathLike,
                      base_model: str | None = None, model_type: str = "llama") -> pathlib.Path:
    """Writes `out_dir/{adapter_config.json, adapter_model.safetensors}` in
    LLM-Adapters' BOTTLENECK schema (PyTorch layouts, float32); returns its path."""
    # Imported here: the checkpoints package imports the models, which import the sites,
    # which import this module.
    from flax_adapters.checkpoints.atomic import write_dir_atomically
    from flax_adapters.checkpoints.safetensors_io import save_file

    sites_ = list(adapter_sites(tree))
    if not sites_:
        raise ValueError("the tree holds no bottleneck adapter (no 'adapter_down' leaf); "
                         "inject one with bottleneck.init first")
    tensors = {}
    for site in sites_:
        module = get(tree, site)
        for leaf in LEAVES:
            if leaf in module:
                value = np.asarray(jax.device_get(module[leaf]), np.float32)
                tensors[_torch_key(site, leaf, model_type)] = (
                    value if leaf == "adapter_scaling" else value.T)
    names = sorted({s.rsplit("/", 1)[-1] for s in sites_})
    config = _config_json(cfg, names, base_model)
    return write_dir_atomically(out_dir, {
        CONFIG_NAME: lambda p: pathlib.Path(p).write_text(json.dumps(config, indent=2,
                                                                     sort_keys=True)),
        WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
    })


def config_from_json(config: dict) -> BottleneckConfig:
    if config.get("peft_type") != "BOTTLENECK":
        raise ValueError(f"adapter_config.json has peft_type {config.get('peft_type')!r}, "
                         "expected 'BOTTLENECK' (LLM-Adapters' bottleneck adapters)")
    if config.get("bias", "none") != "none":
        raise ValueError(f"bias={config['bias']!r} adapters train base biases; only "
                         "bias='none' is supported")
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


def import_bottleneck(directory: str | os.PathLike, base: dict,
                      model_type: str = "llama") -> tuple[dict, BottleneckConfig]:
    """(tree, cfg): `base` with the adapter of an LLM-Adapters BOTTLENECK
    directory. Every tensor must fit a site of `base` with the shape the
    config implies; pickled `adapter_model.bin` files are refused."""
    from flax_adapters.adapters.peft_io import site_name
    from flax_adapters.checkpoints.safetensors_io import iter_tensors

    directory = pathlib.Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        if (directory / "adapter_model.bin").exists():
            raise ValueError(f"{directory} holds only a pickled adapter_model.bin; loading it "
                             "could run arbitrary code, so it is refused. Convert it once in "
                             "PyTorch: safetensors.torch.save_file(torch.load(p), "
                             f"'{WEIGHTS_NAME}')")
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")
    cfg = config_from_json(json.loads((directory / CONFIG_NAME).read_text()))
    tree = base
    for name, arr in iter_tensors(weights):
        m = _KEY.fullmatch(name)
        if m is None:
            raise ValueError(f"{weights}: unexpected tensor {name!r}; bottleneck keys look like "
                             "'base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight'")
        module, kind = m.groups()
        site = site_name(module, model_type) or module  # an unknown module: not in `base`
        try:
            d_in, d_out = get(base, site)["kernel"].shape
        except KeyError:
            raise ValueError(f"{weights}: tensor {name!r} names {site!r}, which is not a linear "
                             "site of this base model") from None
        a, a2 = {"input": (d_in, d_in), "output": (d_out, d_out),
                 "parallel": (d_in, d_out)}[placement(site, cfg, model_type)]
        leaf = kind.split(".")[0]
        expect = {"adapter_down": (cfg.bottleneck_size, a), "adapter_up": (a2, cfg.bottleneck_size),
                  "adapter_scaling": (1,)}[leaf]
        if tuple(arr.shape) != expect:
            raise ValueError(f"{weights}: tensor {name!r} has shape {tuple(arr.shape)}, expected "
                             f"{expect} for this base model and bottleneck_size")
        value = np.asarray(arr, np.float32)
        value = jnp.asarray(value if leaf == "adapter_scaling" else value.T)
        tree = with_site(tree, site, lambda mod, leaf=leaf, value=value: {**mod, leaf: value})
    missing = [s for s in adapter_sites(tree)
               if not {"adapter_down", "adapter_up"} <= set(get(tree, s))]
    if missing:
        raise ValueError(f"{weights}: sites {missing[:3]} have only one of adapter_down/up")
    if cfg.scaling == "learned" and any("adapter_scaling" not in get(tree, s)
                                        for s in adapter_sites(tree)):
        raise ValueError(f"{weights}: scaling='learned' but some sites lack adapter_scaling")
    return tree, cfg
