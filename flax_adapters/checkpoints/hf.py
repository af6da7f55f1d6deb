"""Hugging Face model directories <-> our parameter trees (no PyTorch).

A directory holds `config.json`, weights as `model.safetensors` or shards
listed in `model.safetensors.index.json`, and tokenizer files. Tensor names
map one to one onto tree paths (`model.layers.3.mlp.up_proj.weight` <->
`layers_3/mlp/up_proj/kernel`, transposed to (in, out)), through each model
family's table of names (models/names.py); a mixture's experts are stacked,
one leaf from E published tensors (names.Piece: `block_sparse_moe.experts.3.w1`
is `mlp/experts/gate_up_proj/kernels[3, :, :f]`), each device's slice read from
the tensors it covers, and written back the same way. Every expected
tensor must be present with its shape; anything missing, unexpected or
mis-shaped is an error naming it, and so is a weight that is not a float or
holds NaN/Inf (a corrupted file). config.json is checked before anything is
sized from it: its dimensions must be positive integers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np

from flax_adapters import sharding as sharding_lib
from flax_adapters.checkpoints.atomic import write_dir_atomically
from flax_adapters.checkpoints.safetensors_io import iter_tensors, read_header, save_file
from flax_adapters.models import names, registry
from flax_adapters.models.registry import abstract_params, logical_axes
from flax_adapters.quant import array as qarray
from flax_adapters.quant.array import is_quantized
from flax_adapters.quant.params import QuantConfig, quant_axis, quantize_leaf
from flax_adapters.quant.sharded import quantize_sharded

# (leaf path, its abstract value: a ShapeDtypeStruct or a QuantizedArray of
# them) -> its Sharding (a QuantizedArray of Shardings for a quantized leaf).
Placement = Callable[[tuple[str, ...], Any], Any]

# Tensors some checkpoints carry that the model recomputes: rotary tables and
# GPT-J's / GPT-NeoX's causal-mask buffers (`attn.bias`, `attention.masked_bias`).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|\.(attn|attention)\.(masked_)?bias$")
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DIMS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# Family-specific sizes, checked when the family's config has them (all required).
_OPTIONAL_DIMS = ("intermediate_size", "ffn_dim", "word_embed_proj_dim", "num_key_value_heads",
                  "head_dim", "max_position_embeddings", "rotary_dim")
_POSITIVE = ("rms_norm_eps", "rope_theta", "layer_norm_epsilon", "layer_norm_eps")
_MAX_DIM = 2**31 - 1  # XLA sizes dimensions with int32 on some paths


def config_from_hf(hf: Any, where: str) -> Any:
    """The family config (`registry.config_from_hf`) of a config.json (or its
    GGUF equivalent) read from `where`, after checking what it sizes arrays with."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ValueError(f"{where}: {key} must be an object or null, got {hf[key]!r}")
    try:
        cfg = registry.config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{where}: {e.args[0]!r} is missing; the config is incomplete") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise ValueError(f"{where}: {e}") from None
    for key in _DIMS + _OPTIONAL_DIMS:
        if key in _OPTIONAL_DIMS and not hasattr(cfg, key):
            continue  # not a size of this family
        value = getattr(cfg, key, None)
        if value is None:
            raise ValueError(f"{where}: {key} is missing; the config is incomplete")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_DIM:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    for key in _POSITIVE:
        value = getattr(cfg, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < float("inf")):
            raise ValueError(f"{where}: {key} must be a positive number, got {value!r}")
    return cfg

def check_layer_count(num_layers: int, hf_names: list[str], where: str,
                      model_type: str) -> None:
    """The config's layer count must be the one the weights hold: the model's
    shapes are planned per layer, so an absurd count would cost time and
    memory before any tensor is compared."""
    found = {mapped[0][0] for n in hf_names if (mapped := names.checkpoint_entry(n, model_type))
             and mapped[0][0].startswith("layers_")}
    if num_layers != len(found):
        raise ValueError(f"{where}: num_hidden_layers={num_layers}, but the weights hold "
                         f"{len(found)} layers; the config does not belong to these weights")


def mesh_placement(cfg: Any, mesh: jax.sharding.Mesh) -> Placement:
    """Each leaf of `cfg`'s base tree in the sharding its logical axes give on
    `mesh` (models/registry.logical_axes, sharding.RULES): the shardings
    train/loop.py gives the frozen base."""
    flat = jax.tree_util.tree_flatten_with_path(logical_axes(cfg),
                                                is_leaf=lambda x: isinstance(x, tuple))[0]
    names_of = {tuple(k.key for k in path): tuple(axes) for path, axes in flat}

    def placement(path: tuple[str, ...], abstract: Any) -> Any:
        return sharding_lib.tree_shardings(qarray.axes(abstract, names_of[path]), abstract, mesh)
    return placement


def _reader(arr: Any, transpose: bool, name: str) -> Callable[[tuple], np.ndarray]:
    """index (of our layout) -> that slice of `arr` (PyTorch layout, e.g. a
    memory map: only the slice's bytes are read), checked to be finite.
    Transposed: the last two axes swapped (a kernel; each of stacked ones)."""
    def read(index: tuple) -> np.ndarray:
        index = tuple(index)
        value = np.asarray(np.swapaxes(arr[(*index[:-2], index[-1], index[-2])], -1, -2)
                           if transpose else arr[index])
        if not np.isfinite(value).all():
            raise ValueError(f"tensor {name!r} contains NaN or Inf; the file is corrupted -- "
                             "download or convert it again")
        return value
    return read


def _stacked_reader(pieces: dict[tuple[int, int], tuple[Any, str]], shape: tuple[int, ...],
                    parts: int) -> Callable[[tuple], np.ndarray]:
    """index (of a stacked (E, in, out) leaf) -> that slice, read from the
    per-expert tensors {(expert, part): (array, name)} it covers (names.Piece),
    each for its own part of the slice only."""
    n = shape[-1] // parts

    def read(index: tuple) -> np.ndarray:
        e_r, i_r, o_r = (range(*s.indices(dim)) for s, dim in zip(index, shape))
        rows = []
        for e in e_r:
            cols = []
            for part in range(parts):
                lo, hi = max(o_r.start, part * n), min(o_r.stop, (part + 1) * n)
                if lo < hi:
                    arr, name = pieces[(e, part)]
                    cols.append(_reader(arr, True, name)(
                        (slice(i_r.start, i_r.stop), slice(lo - part * n, hi - part * n))))
            rows.append(np.concatenate(cols, axis=-1))
        return np.stack(rows)
    return read


def _placed_leaf(path: tuple[str, ...], read: Callable, shape: tuple[int, ...], src_dtype: Any,
                 dtype: Any, quantize: QuantConfig | None, placement: Placement) -> Any:
    """One leaf built shard by shard in `placement(path, ...)`'s sharding:
    each device's slice is read, converted (or quantized) and put on it, so
    no device holds more of the tensor than its shard (quant/sharded.py)."""
    axis = None if quantize is None else quant_axis(path, quantize)
    if axis is None:
        sh = placement(path, jax.ShapeDtypeStruct(shape, dtype))
        return sharding_lib.assemble(shape, sh, lambda index, device: jax.device_put(
            read(index).astype(dtype), device))
    abstract = jax.eval_shape(lambda w: quantize_leaf(path, w, quantize, dtype),
                              jax.ShapeDtypeStruct(shape, src_dtype))
    return quantize_sharded(read, shape, quantize.kind, axis, quantize.block_size,
                            quantize.double_quant, dtype, placement(path, abstract))


def hf_state_to_params(cfg: Any, state: Any, dtype: Any = np.float32,
                       quantize: QuantConfig | None = None,
                       placement: Placement | None = None) -> dict:
    """Converts {hf_name: array (PyTorch layout)} (a dict or an iterable of
    pairs) into our nested dict of jax arrays of `dtype`. With `quantize`,
    the leaves it selects are quantized one tensor at a time, from the
    checkpoint's precision, so the float model is never held whole.

    Without `placement` each leaf lands on the default device. With it
    (`mesh_placement`), each leaf is built straight into its sharding, each
    device from the slice it holds (read from the memory map on its own);
    values are bit for bit the same."""
    expected = {tuple(k.key for k in path): leaf.shape for path, leaf in
                jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
    dtype = np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else dtype)
    if quantize is not None:
        quantize = dataclasses.replace(quantize, model_type=cfg.model_type)
    params: dict = {}
    seen: set[tuple[str, ...]] = set()

    def store(path: tuple[str, ...], read: Callable, shape: tuple[int, ...], src_dtype: Any):
        if placement is not None:
            leaf = _placed_leaf(path, read, shape, src_dtype, dtype, quantize, placement)
        else:
            value = read((slice(None),) * len(shape))  # the whole tensor, our layout
            leaf = quantize_leaf(path, value, quantize, dtype)
            if leaf is value:
                leaf = jax.numpy.asarray(value.astype(dtype))
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
        seen.add(path)

    # stacked leaf -> {(expert, part): (array, name)}: the experts' tensors (names.Piece)
    stacks: dict[tuple[str, ...], dict[tuple[int, int], tuple[Any, str]]] = {}
    for name, arr in (state.items() if isinstance(state, dict) else state):
        if _IGNORED.search(name):
            continue
        mapped = names.checkpoint_entry(name, cfg.model_type)
        if mapped is not None and mapped[0] == ("lm_head",) and cfg.tie_word_embeddings:
            continue  # tied: the head is the embedding matrix
        if mapped is None or mapped[0] not in expected:
            raise ValueError(f"unexpected tensor {name!r} in the checkpoint: it has no place "
                             f"in a {cfg.model_type} model with this config.json")
        path, transpose, piece = mapped
        want = expected[path]
        if piece is not None:
            if piece.expert >= want[0]:
                raise ValueError(f"tensor {name!r} is expert {piece.expert}'s, but config.json "
                                 f"implies {want[0]} experts")
            want = (want[1], want[2] // piece.parts)
        torch_layout = (*want[:-2], want[-1], want[-2]) if transpose else want
        if tuple(arr.shape) != torch_layout:
            raise ValueError(f"tensor {name!r} has shape {tuple(arr.shape)} but config.json "
                             f"implies {torch_layout}")
        if np.dtype(arr.dtype).kind != "f" and arr.dtype != ml_dtypes.bfloat16:
            raise ValueError(f"tensor {name!r} has dtype {arr.dtype}; weights are floats (F32, "
                             "F16, BF16): the file is corrupted or not a model")
        if piece is not None:
            stacks.setdefault(path, {})[(piece.expert, piece.part)] = (arr, name)
        else:
            store(path, _reader(arr, transpose, name), want, arr.dtype)
    for path, pieces in stacks.items():
        published = names.checkpoint_tensors(path, expected[path], cfg.model_type)
        absent = [n for n, _, p in published if (p.expert, p.part) not in pieces]
        if absent:
            raise ValueError(f"checkpoint is missing {len(absent)} expert tensor(s) of "
                             f"{'/'.join(path)}, e.g. {absent[:3]}")
        parts = published[0][2].parts
        store(path, _stacked_reader(pieces, expected[path], parts), expected[path],
              next(iter(pieces.values()))[0].dtype)
    missing = sorted("/".join(p) for p in set(expected) - seen)
    if missing:
        some = [names.checkpoint_tensors(tuple(m.split("/")), expected[tuple(m.split("/"))],
                                         cfg.model_type)[0][0] for m in missing[:3]]
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {some}")
    return params


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a model directory (single or sharded)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as e:
            raise ValueError(f"{index}: not a JSON object with a weight_map of tensor -> shard "
                             f"file ({type(e).__name__}: {e})") from None
        # Shards are files of this directory: a name with a path in it could
        # make us read anything on the machine.
        bad = [s for s in shards if not isinstance(s, str) or pathlib.Path(s).name != s
               or s in ("", ".", "..")]
        if bad:
            raise ValueError(f"{index}: shard names must be plain file names in {directory}, "
                             f"got {bad[:3]}")
        files = [directory / s for s in shards]
        absent = [str(f.name) for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{directory}: shards listed in {index.name} are missing: "
                                    f"{absent}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED_SUFFIXES)
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
    if "model_type" not in hf_config:
        raise ValueError("hf_config has no model_type; pass the base model's config.json")
    model_type = hf_config["model_type"]
    expected = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(
        abstract_params(config_from_hf(hf_config, "hf_config")))[0]}
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        path = tuple(k.key for k in path)
        if is_quantized(leaf):
            raise ValueError(f"{'/'.join(path)} is quantized; a model directory holds float "
                             "weights: quant.params.dequantize_params(tree) first")
        if path not in expected:
            raise ValueError(f"{'/'.join(path)} is not a weight of this {model_type} model; "
                             "merge an adapter (fa.merge) before saving a model directory")
        value = np.asarray(jax.device_get(leaf), np.float32)
        for name, transpose, piece in names.checkpoint_tensors(path, value.shape, model_type):
            part = value if piece is None else value[piece.index(value.shape)]
            tensors[name] = np.ascontiguousarray(np.swapaxes(part, -1, -2) if transpose
                                                 else part)
    files = {
        "config.json": lambda p: p.write_text(json.dumps(hf_config, indent=2) + "\n"),
        "model.safetensors": lambda p: save_file(tensors, p, metadata={"format": "pt"}),
    }
    if tokenizer is not None:
        # save_pretrained writes several files into the directory it is given.
        files["tokenizer_config.json"] = lambda p: tokenizer.save_pretrained(str(p.parent))
    return write_dir_atomically(out_dir, files)


def load_hf_dir(directory: str | os.PathLike, dtype: Any = np.float32,
                quantize: QuantConfig | None = None, mesh: jax.sharding.Mesh | None = None):
    """(config, params, hf_config_dict) of a Hugging Face model directory;
    with `mesh`, every leaf is read straight into its sharding on it."""
    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face model "
                                "directory (config.json + *.safetensors)")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({type(e).__name__}: {e})") from None
    cfg = config_from_hf(hf, str(config_file))
    files = weight_files(directory)
    check_layer_count(cfg.num_hidden_layers, [n for f in files for n in read_header(f)[0]],
                      str(config_file), cfg.model_type)

    def tensors():
        for f in files:
            yield from iter_tensors(f)

    placement = None if mesh is None else mesh_placement(cfg, mesh)
    return cfg, hf_state_to_params(cfg, tensors(), dtype, quantize, placement), hf
