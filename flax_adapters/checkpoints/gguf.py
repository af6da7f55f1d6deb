"""GGUF files (llama.cpp) -> a Hugging Face config dict, state dict and tokenizer.

`read_gguf(path)` returns what a Hugging Face model directory would hold:
config.json as a dict, {hf_name: float32 array in PyTorch layout}, and a
transformers tokenizer, so `hf.hf_state_to_params` is the one converter to
our tree for safetensors and GGUF alike.

Architectures (`general.architecture`): llama, qwen3, gemma2, gemma3 and
phi3, each as llama.cpp's `convert_hf_to_gguf.py` writes it; we invert that
writer. Per architecture (the `_ARCHS` table):
- llama: `LlamaModel.permute` interleaves each q/k head's rows (llama.cpp
  rotates adjacent pairs, Hugging Face the halves); `rope_freqs` carries
  llama3 RoPE scaling. The other four are written unpermuted (llama.cpp
  runs them with the half-split "NeoX" rotation, Hugging Face's).
- qwen3: LLaMA's tensors plus `attn_q_norm` / `attn_k_norm`; head_dim
  from `attention.key_length`.
- gemma2, gemma3: every RMSNorm weight stored as 1 + w (Gemma's norm scales
  by 1 + w; llama.cpp's by w), so 1 is subtracted; four norms per layer
  (Gemma 3: and q/k norms); no `output` (tied). Neither writes
  `query_pre_attn_scalar`: llama.cpp derives the attention scale from the
  layer count (hidden / heads for the 27B models: 46 layers on Gemma 2, 62
  on Gemma 3; head_dim otherwise), and so do we. Gemma 3's windowed / global
  pattern (5 of 6 layers windowed) and its local RoPE base 10000 are fixed
  in llama.cpp, not in the file; its linear RoPE scaling applies to the
  global layers.
- phi3: fused `attn_qkv` (Hugging Face `qkv_proj`) and `ffn_up` holding
  gate and up (`gate_up_proj`); `rope_factors_long` / `_short` are
  LongRoPE's factors; `attention.sliding_window` 0 means none.
transformers' GGUF loader (`modeling_gguf_pytorch_utils.py`,
`integrations/ggml.py`) is the reader the tests compare against; where it
drops what the file states (qwen3's head_dim, Gemma 2's soft caps, Gemma
3's RoPE scaling, Phi-3's window, LongRoPE, original context and rotary
dims), we keep it.

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
- The config is built whether or not one of our model families runs it:
  `config_from_hf` is the one place that accepts or refuses a model type.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from typing import Any, Callable, Mapping

import gguf
import numpy as np

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
# GGUF block tensor -> Hugging Face module inside `model.layers.N`, per architecture.
_LLAMA_BLOCK = {
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
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA2_BLOCK = {
    **{k: v for k, v in _LLAMA_BLOCK.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], Any]:
    """(HF config.json dict, {hf_name: float32 (out, in) array}, tokenizer or None)."""
    path = pathlib.Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    arch = _architecture(meta, path.name)
    spec = _ARCHS[arch]
    tensors = {t.name: t for t in reader.tensors}
    names = {t.name: _hf_name(t.name, spec.blocks) for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"{path.name}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which is "
                f"not supported; supported: {', '.join(q.name for q in SUPPORTED_TYPES)}. "
                "Re-quantize the model with llama.cpp's llama-quantize to one of those")
        if names[t.name] is None and not (spec.not_weights and
                                          re.fullmatch(spec.not_weights, t.name)):
            raise ValueError(f"{path.name}: tensor {t.name!r} has no counterpart in a Hugging "
                             f"Face {arch} model (mixture-of-experts and other variants of the "
                             f"{arch} architecture are not supported)")

    _check_layout(reader, path.name)
    config = _hf_config(meta, tensors, path.name)
    _check_block_count(config["num_hidden_layers"], tensors, f"{path.name}: GGUF metadata "
                       f"{arch}.block_count")
    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config["num_key_value_heads"]}
    state: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        hf_name = names[t.name]
        if hf_name is None:
            continue
        w = _dequantize(t)
        module = hf_name.split(".", 3)[-1].rsplit(".", 1)[0]  # e.g. 'self_attn.q_proj'
        if spec.permute_qk and module in heads:
            w = _unpermute_rotary(w, heads[module], config["head_dim"])
        if spec.norm_offset and t.name.endswith("norm.weight"):
            w = w - np.float32(spec.norm_offset)
        state[hf_name] = w
    return config, state, _tokenizer(meta)


def read_gguf_config(path: str | os.PathLike) -> dict:
    """The HF config.json dict of a GGUF file, from its header alone (the
    tensors are memory-mapped, never read or dequantized; only the small
    rope_freqs / rope_factors tensors, read into the config)."""
    path = pathlib.Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    _architecture(meta, path.name)
    return _hf_config(meta, {t.name: t for t in reader.tensors}, path.name)


def _architecture(meta: dict, file: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"{file}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(_ARCHS)}. Load the model's Hugging Face directory "
                         "(config.json + safetensors) instead, if one of our model families "
                         "runs it")
    return arch


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


def _hf_name(gguf_name: str, blocks: Mapping[str, str]) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or m.group(2) not in blocks:
        return None
    layer, module, kind = m.groups()
    return f"model.layers.{layer}.{blocks[module]}.{kind}"


def _check_block_count(n: int, tensors: Mapping[str, Any], where: str) -> None:
    """The layer count must be the one the tensors hold: the model's shapes
    are planned per layer, so an absurd count would cost time and memory
    before any tensor is compared."""
    found = {m.group(1) for name in tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    if n != len(found):
        raise ValueError(f"{where}={n}, but the file holds {len(found)} blocks of tensors; "
                         "the metadata does not belong to these weights -- re-convert the file")


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


class _Meta:
    """The metadata of one architecture: `m.need("block_count")` reads
    'llama.block_count' on a llama file."""

    def __init__(self, meta: dict, tensors: Mapping[str, Any], file: str):
        self.meta, self.tensors, self.file = meta, tensors, file
        self.arch = meta["general.architecture"]

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def get(self, name: str, default: Any = None) -> Any:
        return self.meta.get(self.key(name), default)

    def need(self, name: str) -> int:
        key = self.key(name)
        if key not in self.meta:
            raise ValueError(f"{self.file}: GGUF metadata lacks {key!r}; the file is incomplete")
        value = self.meta[key]
        # Sizes come from here (and hidden // heads below): check them first.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{self.file}: GGUF metadata {key!r} must be a positive integer, "
                             f"got {value!r}; the file is corrupt")
        return value

    def f32(self, name: str, default: float | None) -> float | None:
        # Metadata floats are float32: 1e-5 is stored as 9.99999974e-06; give
        # back the short decimal config.json had.
        value = self.get(name, default)
        return None if value is None else _short(value)

    def tensor(self, name: str) -> np.ndarray | None:
        return _dequantize(self.tensors[name]).ravel() if name in self.tensors else None


def _short(x: float) -> float:
    return float(str(np.float32(x)))


def _hf_config(meta: dict, tensors: Mapping[str, Any], file: str) -> dict:
    """The config.json of the model the GGUF metadata describes: the fields
    every architecture writes, then its own (`_ARCHS[arch].config`)."""
    m = _Meta(meta, tensors, file)
    hidden = m.need("embedding_length")
    heads = m.need("attention.head_count")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{file}: the token_embd.weight tensor is missing; the file is incomplete")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eos is not None and eot != eos:
        # llama.cpp stops generation at either (e.g. Llama 3's <|eot_id|>), as
        # the generation_config.json of such models lists both.
        eos = [eos, eot]
    common = {
        "hidden_size": hidden,
        "intermediate_size": m.need("feed_forward_length"),
        "num_hidden_layers": m.need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": m.get("attention.head_count_kv", heads),
        # GGUF dims run fastest first: token_embd is (hidden, vocab).
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "max_position_embeddings": m.get("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    return {**common, **_ARCHS[m.arch].config(m, common)}


def _head_dim(m: _Meta, c: dict) -> int:
    head_dim = m.get("attention.key_length", c["hidden_size"] // c["num_attention_heads"])
    value = m.get("attention.value_length", head_dim)
    if value != head_dim:
        raise ValueError(f"{m.file}: attention.value_length {value} differs from key_length "
                         f"{head_dim}; different key and value head sizes are not supported")
    return head_dim


def _full_rotary(m: _Meta, head_dim: int) -> None:
    rotary = m.get("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ValueError(f"{m.file}: rotary dimension {rotary} differs from head_dim {head_dim}; "
                         f"partial rotary embeddings are not supported for {m.arch}")


def _rope_scaling(m: _Meta) -> dict | None:
    """`rope.scaling.*` as Hugging Face's `rope_scaling`, passed on as read:
    the family's `from_hf` names the types it supports."""
    scaling = m.get("rope.scaling.type", "none")
    if scaling == "none":
        return None
    out = {"rope_type": scaling, "factor": m.f32("rope.scaling.factor", 1.0)}
    if m.get("rope.scaling.original_context_length") is not None:
        out["original_max_position_embeddings"] = m.get("rope.scaling.original_context_length")
    return out


def _llama_config(m: _Meta, c: dict) -> dict:
    head_dim = _head_dim(m, c)
    _full_rotary(m, head_dim)
    theta = m.f32("rope.freq_base", 10000.0)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "head_dim": head_dim, "rms_norm_eps": m.f32("attention.layer_norm_rms_epsilon", 1e-6),
              "rope_theta": theta, "attention_bias": "blk.0.attn_q.bias" in m.tensors,
              "mlp_bias": "blk.0.ffn_up.bias" in m.tensors}
    if "rope_freqs.weight" in m.tensors:
        config["rope_scaling"] = _llama3_rope_scaling(m.tensor("rope_freqs.weight"), theta,
                                                      head_dim, m.file)
    elif (scaling := _rope_scaling(m)) is not None:
        config["rope_scaling"] = scaling
    return config


def _qwen3_config(m: _Meta, c: dict) -> dict:
    head_dim = _head_dim(m, c)
    _full_rotary(m, head_dim)
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
              "head_dim": head_dim, "rms_norm_eps": m.f32("attention.layer_norm_rms_epsilon", 1e-6),
              "rope_theta": m.f32("rope.freq_base", 10000.0),
              "attention_bias": "blk.0.attn_q.bias" in m.tensors}
    if (scaling := _rope_scaling(m)) is not None:
        config["rope_scaling"] = scaling
    return config


def _gemma_config(m: _Meta, c: dict, *, big_layers: int) -> dict:
    """Gemma 2 and 3. `big_layers`: the 27B model's layer count, where
    llama.cpp scales attention by hidden / heads in place of head_dim."""
    head_dim = _head_dim(m, c)
    _full_rotary(m, head_dim)
    n = c["num_hidden_layers"]
    config = {"hidden_activation": "gelu_pytorch_tanh", "head_dim": head_dim,
              "rms_norm_eps": m.f32("attention.layer_norm_rms_epsilon", 1e-6),
              "query_pre_attn_scalar": (c["hidden_size"] // c["num_attention_heads"]
                                        if n == big_layers else head_dim)}
    if m.arch == "gemma2":
        every = 2  # llama.cpp's swa pattern: each `every`-th layer global, the rest windowed
        window = m.need("attention.sliding_window")
        config.update(
            architectures=["Gemma2ForCausalLM"], model_type="gemma2",
            rope_theta=m.f32("rope.freq_base", 10000.0),
            # llama.cpp's defaults when the keys are absent (its converter writes both).
            attn_logit_softcapping=m.f32("attn_logit_softcapping", 50.0),
            final_logit_softcapping=m.f32("final_logit_softcapping", 30.0))
    else:
        every, window = 6, m.get("attention.sliding_window") or None
        config.update(
            architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
            rope_theta=m.f32("rope.freq_base", 1_000_000.0), rope_local_base_freq=10000.0,
            sliding_window_pattern=every, attn_logit_softcapping=None,
            final_logit_softcapping=m.f32("final_logit_softcapping", None))
        if (scaling := _rope_scaling(m)) is not None:
            config["rope_scaling"] = scaling  # on the global layers, as Gemma3TextConfig
    config["sliding_window"] = window
    config["layer_types"] = ["sliding_attention" if window and (i + 1) % every else
                             "full_attention" for i in range(n)]
    return config


def _phi3_config(m: _Meta, c: dict) -> dict:
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    rotary = m.get("rope.dimension_count", head_dim)
    original = m.get("rope.scaling.original_context_length", c["max_position_embeddings"])
    config = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
              "rms_norm_eps": m.f32("attention.layer_norm_rms_epsilon", 1e-5),
              "rope_theta": m.f32("rope.freq_base", 10000.0),
              "original_max_position_embeddings": original,
              # llama.cpp writes 0 for "no window" (Phi-4-mini)
              "sliding_window": m.get("attention.sliding_window") or None}
    if rotary != head_dim:
        config["partial_rotary_factor"] = rotary / head_dim
    long, short = m.tensor("rope_factors_long.weight"), m.tensor("rope_factors_short.weight")
    if (long is None) != (short is None):
        raise ValueError(f"{m.file}: only one of rope_factors_long / rope_factors_short is "
                         "present; LongRoPE needs both -- re-convert the file")
    if long is not None:
        # Phi3MiniModel.generate_extra_tensors: the factors, and attn_factor =
        # sqrt(1 + ln(s) / ln(original)) with s = context / original, which is
        # also what transformers computes when the config gives none.
        config["rope_scaling"] = {"rope_type": "longrope",
                                  "long_factor": [_short(x) for x in long],
                                  "short_factor": [_short(x) for x in short]}
        scale = c["max_position_embeddings"] / original
        default = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        attn = m.get("rope.scaling.attn_factor")
        if attn is not None and not math.isclose(attn, default, rel_tol=1e-6):
            config["rope_scaling"]["attention_factor"] = _short(attn)
    return config


@dataclasses.dataclass(frozen=True)
class _Arch:
    """How llama.cpp's converter writes one architecture, for us to invert."""

    blocks: Mapping[str, str]  # GGUF block tensor -> Hugging Face module in the layer
    config: Callable[[_Meta, dict], dict]  # the config.json fields particular to it
    not_weights: str = ""  # tensors read into the config (or stale), not weights
    permute_qk: bool = False  # q/k rows interleaved per head (LlamaModel.permute)
    norm_offset: float = 0.0  # stored norm weights are w + offset (Gemma's 1 + w)


_ARCHS = {
    # Old converters stored the rotary inverse frequencies (attn_rot_embd),
    # which the model recomputes.
    "llama": _Arch(_LLAMA_BLOCK, _llama_config, permute_qk=True,
                   not_weights=r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?"),
    "qwen3": _Arch({**_LLAMA_BLOCK, **_QK_NORM}, _qwen3_config),
    "gemma2": _Arch(_GEMMA2_BLOCK, lambda m, c: _gemma_config(m, c, big_layers=46),
                    norm_offset=1.0),
    "gemma3": _Arch({**_GEMMA2_BLOCK, **_QK_NORM}, lambda m, c: _gemma_config(m, c, big_layers=62),
                    norm_offset=1.0),
    "phi3": _Arch(_PHI3_BLOCK, _phi3_config, not_weights=r"rope_factors_(long|short)\.weight"),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHS)


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
