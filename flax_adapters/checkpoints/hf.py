"""Hugging Face model directories <-> our parameter trees (no PyTorch).

A directory holds `config.json`, weights as `model.safetensors` or shards
listed in `model.safetensors.index.json`, and tokenizer files. Tensor names
map one to one onto tree paths (`model.layers.3.mlp.up_proj.weight` <->
`layers_3/mlp/up_proj/kernel`, transposed to (in, out)). Every expected
tensor must be present with its shape; anything missing, unexpected or
mis-shaped is an error naming it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import jax
import ml_dtypes
import numpy as np

from flax_adapters.checkpoints.safetensors_io import iter_tensors
from flax_adapters.adapters.tree import BASE_LEAVES
from flax_adapters.models.config import LlamaConfig
from flax_adapters.quant.array import is_quantized
from flax_adapters.quant.params import QuantConfig, quantize_leaf

# Tensors some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def hf_name_to_path(name: str) -> tuple[tuple[str, ...], bool] | None:
    """'model.layers.0.self_attn.q_proj.weight' -> (('layers_0', 'self_attn',
    'q_proj', 'kernel'), transpose=True); None for names we do not know."""
    if name == "model.embed_tokens.weight":
        return ("embed_tokens",), False
    if name == "lm_head.weight":
        return ("lm_head",), True
    if name == "model.norm.weight":
        return ("norm", "scale"), False
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None:
        return None
    layer, module, kind = m.groups()
    parts = (f"layers_{layer}", *module.split("."))
    if module.endswith("layernorm"):
        return (*parts, "scale"), False
    return (*parts, "kernel" if kind == "weight" else "bias"), kind == "weight"


def path_to_hf_name(path: tuple[str, ...]) -> str:
    """Inverse of `hf_name_to_path` for base parameters."""
    if path == ("embed_tokens",):
        return "model.embed_tokens.weight"
    if path == ("lm_head",):
        return "lm_head.weight"
    head, *rest = path
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[rest[-1]]
    if head == "norm":
        return f"model.norm.{leaf}"
    return ".".join(["model", "layers", head.removeprefix("layers_"), *rest[:-1], leaf])


def abstract_params(cfg: LlamaConfig) -> dict:
    """The base tree's shapes, without allocating (jax.eval_shape of init)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from flax_adapters.models.llama import LlamaForCausalLM

    shapes = jax.eval_shape(lambda: LlamaForCausalLM(cfg).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.unbox(shapes)["params"]


def hf_state_to_params(cfg: LlamaConfig, state: Any, dtype: Any = np.float32,
                       quantize: QuantConfig | None = None) -> dict:
    """Converts {hf_name: array (PyTorch layout)} (a dict or an iterable of
    pairs) into our nested dict of jax arrays of `dtype`. With `quantize`,
    the leaves it selects are quantized one tensor at a time, from the
    checkpoint's precision, so the float model is never held whole."""
    expected = {tuple(k.key for k in path): leaf.shape for path, leaf in
                jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
    dtype = np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else dtype)
    params: dict = {}
    seen: set[tuple[str, ...]] = set()
    for name, arr in (state.items() if isinstance(state, dict) else state):
        if _IGNORED.search(name):
            continue
        mapped = hf_name_to_path(name)
        if mapped is not None and mapped[0] == ("lm_head",) and cfg.tie_word_embeddings:
            continue  # tied: the head is the embedding matrix
        if mapped is None or mapped[0] not in expected:
            raise ValueError(f"unexpected tensor {name!r} in the checkpoint: it has no place "
                             f"in a {cfg.model_type} model with this config.json")
        path, transpose = mapped
        shape = tuple(arr.shape[::-1] if transpose else arr.shape)
        if shape != expected[path]:
            raise ValueError(f"tensor {name!r} has shape {tuple(arr.shape)} but config.json "
                             f"implies {expected[path][::-1] if transpose else expected[path]}")
        value = np.asarray(arr)
        value = value.T if transpose else value
        leaf = quantize_leaf(path, value, quantize, cfg.model_type, dtype)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.numpy.asarray(value.astype(dtype)) if leaf is value else leaf
        seen.add(path)
    missing = sorted("/".join(p) for p in set(expected) - seen)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. "
                         f"{[path_to_hf_name(tuple(m.split('/'))) for m in missing[:3]]}")
    return params


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a model directory (single or sharded)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / s for s in shards]
        absent = [str(f.name) for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{directory}: shards listed in {index.name} are missing: "
                                    f"{absent}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLED)
    if pickled:
        raise ValueError(
            f"{directory} has only pickled weights ({', '.join(pickled)}); loading them could "
            "run arbitrary code, so they are refused. Convert them once to safetensors, e.g. "
            "in PyTorch: AutoModelForCausalLM.from_pretrained(d).save_pretrained(out, "
            "safe_serialization=True)")
    raise FileNotFoundError(f"{directory}: no model.safetensors or *.safetensors files found")


def save_hf_dir(params: dict, hf_config: dict, out_dir: str | os.PathLike,
                tokenizer: Any = None) -> pathlib.Path:
    """Writes a base tree (e.g. a fully fine-tuned model) as a Hugging Face
    model directory: `hf_config` as config.json, the weights as float32
    model.safetensors in PyTorch names and layouts (the inverse of
    `hf_state_to_params`), and the tokenizer's files; atomically, so an
    existing directory is replaced whole or not at all."""
    from flax_adapters.checkpoints.atomic import write_dir_atomically
    from flax_adapters.checkpoints.safetensors_io import save_file

    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        path = tuple(k.key for k in path)
        if is_quantized(leaf):
            raise ValueError(f"{'/'.join(path)} is quantized; a model directory holds float "
                             "weights: quant.params.dequantize_params(tree) first")
        if path[-1] not in BASE_LEAVES:
            raise ValueError(f"{'/'.join(path)} is not a base weight; merge the adapter "
                             "(api.merge) before saving a model directory")
        name = path_to_hf_name(path)
        value = np.asarray(jax.device_get(leaf), np.float32)
        tensors[name] = np.ascontiguousarray(value.T if hf_name_to_path(name)[1] else value)
    files = {
        "config.json": lambda p: p.write_text(json.dumps(hf_config, indent=2) + "\n"),
        "model.safetensors": lambda p: save_file(tensors, p, metadata={"format": "pt"}),
    }
    if tokenizer is not None:
        # save_pretrained writes several files into the directory it is given.
        files["tokenizer_config.json"] = lambda p: tokenizer.save_pretrained(str(p.parent))
    return write_dir_atomically(out_dir, files)


def load_hf_dir(directory: str | os.PathLike, dtype: Any = np.float32,
                quantize: QuantConfig | None = None):
    """(LlamaConfig, params, hf_config_dict) of a Hugging Face model directory."""
    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face model "
                                "directory (config.json + *.safetensors)")
    hf = json.loads(config_file.read_text())
    cfg = LlamaConfig.from_hf(hf)

    def tensors():
        for f in weight_files(directory):
            yield from iter_tensors(f)

    return cfg, hf_state_to_params(cfg, tensors(), dtype, quantize), hf
