"""GGUF files (llama.cpp) -> a Hugging Face config dict, state dict and tokenizer.

`read_gguf(path)` returns what a Hugging Face model directory would hold:
config.json as a dict, {hf_name: float32 array in PyTorch layout}, and a
transformers tokenizer, so `hf.hf_state_to_params` is the one converter to
our tree for safetensors and GGUF alike.

References: llama.cpp's `convert_hf_to_gguf.py` is the writer we invert
(tensor names, `LlamaModel.permute` of q/k, `rope_freqs` for llama3 RoPE
scaling); transformers' GGUF loader (`modeling_gguf_pytorch_utils.py`,
`integrations/gguf`) is the reader the tests compare against.

Design choices:
- Reading and dequantization use `gguf` (gguf-py, llama.cpp's own package).
  The file is memory-mapped and each tensor is dequantized once, in file
  order, so the peak is the float32 state dict plus one tensor's
  temporaries (~1.2 GB RSS for SmolLM2-135M, transformers included).
- All names and types are checked before anything is dequantized, so a bad
  file fails fast without allocating the model.
- No PyTorch: transformers' `AutoTokenizer.from_pretrained(..., gguf_file=)`
  imports torch (its 5.x GGUF reader does), so we read the metadata with
  gguf-py and hand it to transformers' torch-free GGUF tokenizer builder,
  with the same arguments that path uses (chat template included).
- Only `general.architecture == "llama"` is read for now; llama.cpp also
  writes Mistral and many LLaMA fine-tunes under it.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from typing import Any

import gguf
import numpy as np

from flax_adapters.checkpoints.hf import check_layer_count

SUPPORTED_ARCHITECTURES = ("llama",)

_T = gguf.GGMLQuantizationType
# The float types and the block quantizations of llama.cpp's usual presets
# (Q4_K_M = Q4_K + Q6_K, ...), each checked in tests/test_gguf.py. gguf-py
# also decodes the IQ*, TQ* and FP4 types; they are refused until tested.
SUPPORTED_TYPES = (_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1,
                   _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Not weights: `rope_freqs` is read into the config; old converters stored the
# rotary inverse frequencies, which the model recomputes.
_NOT_WEIGHTS = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?")


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], Any]:
    """(HF config.json dict, {hf_name: float32 (out, in) array}, tokenizer or None)."""
    path = pathlib.Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path.name}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    names = {t.name: _hf_name(t.name) for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"{path.name}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which is "
                f"not supported; supported: {', '.join(q.name for q in SUPPORTED_TYPES)}. "
                "Re-quantize the model with llama.cpp's llama-quantize to one of those")
        if names[t.name] is None and not _NOT_WEIGHTS.fullmatch(t.name):
            raise ValueError(f"{path.name}: tensor {t.name!r} has no counterpart in a Hugging "
                             "Face LLaMA model (mixture-of-experts and other variants of the "
                             "llama architecture are not supported)")

    _check_layout(reader, path.name)
    config = _hf_config(meta, tensors, path.name)
    check_layer_count(config["num_hidden_layers"], [n for n in names.values() if n],
                      f"{path.name} (GGUF metadata llama.block_count)", config["model_type"])
    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config["num_key_value_heads"]}
    state: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        hf_name = names[t.name]
        if hf_name is None:
            continue
        w = _dequantize(t)
        module = hf_name.split(".", 3)[-1].rsplit(".", 1)[0]  # e.g. 'self_attn.q_proj'
        if module in heads:
            w = _unpermute_rotary(w, heads[module], config["head_dim"])
        state[hf_name] = w
    return config, state, _tokenizer(meta)


def read_gguf_config(path: str | os.PathLike) -> dict:
    """The HF config.json dict of a GGUF file, from its header alone (the
    tensors are memory-mapped, never read or dequantized)."""
    path = pathlib.Path(path)
    reader = _open(path)
    return _hf_config(_metadata(reader, path), {t.name: t for t in reader.tensors}, path.name)


def _metadata(reader: gguf.GGUFReader, path: pathlib.Path) -> dict:
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # noqa: BLE001 -- gguf-py raises assorted types on bad bytes
        raise ValueError(f"{path}: the GGUF metadata is corrupt ({e}); re-download or "
                         "re-convert the file") from e


def _open(path: pathlib.Path) -> gguf.GGUFReader:
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist; pass the path of a "
                                ".gguf file")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it does not start with b'GGUF'); pass a "
                         ".gguf file as written by llama.cpp")
    try:
        # Checks the whole layout, so a file cut anywhere fails here.
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 -- gguf-py raises assorted types on bad bytes
        raise ValueError(f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: {e}); "
                         "re-download or re-convert it") from e


def _check_layout(reader: gguf.GGUFReader, file: str) -> None:
    """Tensor data must start on the file's alignment and not overlap (as
    llama.cpp's gguf_init checks); gguf-py reads any offset it is given."""
    spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in reader.tensors)
    end = reader.data_offset
    for start, stop, name in spans:
        if (start - reader.data_offset) % reader.alignment or start < end:
            raise ValueError(f"{file}: tensor {name!r} starts at byte {start}, which is "
                             f"{'not aligned' if start >= end else 'inside another tensor'}; "
                             "the file is corrupt -- re-download or re-convert it")
        end = stop


def _hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        return None
    layer, module, kind = m.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[module]}.{kind}"


def _dequantize(t) -> np.ndarray:
    """float32 array in numpy (= PyTorch) order: GGUF lists dims fastest first."""
    shape = tuple(int(d) for d in reversed(t.shape))
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    # F32 comes back as a view of the memory map: copy so nothing pins the file.
    return np.array(w, dtype=np.float32, copy=True) if t.tensor_type == _T.F32 else w


def _unpermute_rotary(w: np.ndarray, n_head: int, head_dim: int) -> np.ndarray:
    """Undoes llama.cpp's `permute` of q/k rows (weights (out, in) or biases (out,)).

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ...; Hugging Face
    rotates the halves (x_i, x_{i + n/2}). Its converter reorders each head's
    rows from [first half; second half] to interleaved; this is the inverse.
    """
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_config(meta: dict, tensors: dict, file: str) -> dict:
    """The config.json of the model the GGUF metadata describes (llama keys)."""

    def need(key):
        if key not in meta:
            raise ValueError(f"{file}: GGUF metadata lacks {key!r}; the file is incomplete")
        value = meta[key]
        # Sizes come from here (and hidden // heads below): check them first.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{file}: GGUF metadata {key!r} must be a positive integer, got "
                             f"{value!r}; the file is corrupt")
        return value

    def f32(key, default):
        # Metadata floats are float32: 1e-5 is stored as 9.99999974e-06; give
        # back the short decimal config.json had.
        return float(str(np.float32(meta.get(key, default))))

    hidden = need("llama.embedding_length")
    heads = need("llama.attention.head_count")
    kv_heads = meta.get("llama.attention.head_count_kv", heads)
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    rotary = meta.get("llama.rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ValueError(f"{file}: rotary dimension {rotary} differs from head_dim {head_dim}; "
                         "partial rotary embeddings are not supported for llama")
    theta = f32("llama.rope.freq_base", 10000.0)
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{file}: the token_embd.weight tensor is missing; the file is incomplete")
    # GGUF dims run fastest first: token_embd is (hidden, vocab).
    vocab = int(tensors["token_embd.weight"].shape[-1])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eos is not None and eot != eos:
        # llama.cpp stops generation at either (e.g. Llama 3's <|eot_id|>), as
        # the generation_config.json of such models lists both.
        eos = [eos, eot]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": need("llama.feed_forward_length"),
        "num_hidden_layers": need("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": f32("llama.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": theta,
        "max_position_embeddings": meta.get("llama.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    scaling = meta.get("llama.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        config["rope_scaling"] = _llama3_rope_scaling(
            _dequantize(tensors["rope_freqs.weight"]).ravel(), theta, head_dim, file)
    elif scaling != "none":
        # Passed on as read; `LlamaConfig.from_hf` names the types it supports.
        config["rope_scaling"] = {"rope_type": scaling,
                                  "factor": f32("llama.rope.scaling.factor", 1.0)}
        if "llama.rope.scaling.original_context_length" in meta:
            config["rope_scaling"]["original_max_position_embeddings"] = meta[
                "llama.rope.scaling.original_context_length"]
    return config


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int, file: str) -> dict:
    """Recovers Hugging Face's llama3 `rope_scaling` from llama.cpp's
    `rope_freqs` tensor (one divisor per frequency), written by
    `LlamaModel.generate_extra_tensors` from (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings). Llama 3.1 and 3.2
    use 1, 4 and 8192 for the last three; we check the tensor matches them."""
    params = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    expected = llama3_rope_factors(theta, head_dim, **{k: v for k, v in params.items()
                                                        if k != "rope_type"})
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-5):
        raise ValueError(f"{file}: the rope_freqs tensor is not Llama 3 RoPE scaling with "
                         "low_freq_factor=1, high_freq_factor=4, original context 8192; this "
                         "RoPE scaling is not supported")
    return params


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float,
                        original_max_position_embeddings: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` (divisors of the inverse frequencies) for llama3 scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old = original_max_position_embeddings
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    out = np.where(wavelen < old / high_freq_factor, 1.0,
                   np.where(wavelen > old / low_freq_factor, factor,
                            1 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def _tokenizer(meta: dict):
    """A transformers fast tokenizer from the `tokenizer.*` metadata, or None."""
    if "tokenizer.ggml.tokens" not in meta:
        return None
    from transformers import PreTrainedTokenizerFast
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    except ImportError:  # transformers 4.x keeps the same builder in integrations.ggml
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    # As transformers' `get_gguf_tokenizer`, but reading with gguf-py (no torch).
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, init_kwargs = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says not to.
        init_kwargs.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    try:
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            token_id = meta.get(f"tokenizer.ggml.{key}")
            init_kwargs[name] = tokens[token_id] if token_id is not None else None
        backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **init_kwargs, **extra)
    except Exception as e:  # noqa: BLE001 -- the builders raise assorted types on bad metadata
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"the GGUF tokenizer metadata is corrupt ({type(e).__name__}: "
                         f"{first}); re-download or re-convert the file") from None
