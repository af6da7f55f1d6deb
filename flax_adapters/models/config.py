"""Model configuration: one frozen dataclass for the LLaMA family.

`LlamaConfig.from_hf(dict)` reads a Hugging Face `config.json` of model_type
llama, mistral, qwen2 or qwen3, in both the transformers<5 spelling (`rope_theta`,
`rope_scaling`) and the transformers>=5 spelling (`rope_parameters`).
Mistral, Qwen2 and Qwen3 are LLaMA with one or two fields changed (sliding
window, qkv bias, per-head q/k RMSNorm), so they share the model code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def kv_heads(hf: Mapping[str, Any], default: int | None = None) -> int:
    """`num_key_value_heads` of a config.json (`default`, else one per query
    head, where it is left out), checked to group the query heads evenly."""
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or default or heads
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv}")
    return kv


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_type` 'linear' or 'llama3')."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (Qwen2) -- and o if `o_bias`
    o_bias: bool = False  # LLaMA's `attention_bias` also puts a bias on o_proj
    mlp_bias: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False  # RMSNorm of each q and k head over head_dim, before rope (Qwen3)
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for {model_type}; only 'silu'")
        heads, kv = hf["num_attention_heads"], kv_heads(hf)
        # Qwen3Config's head_dim defaults to 128, not hidden_size // heads.
        head_dim = hf.get("head_dim") or (128 if model_type == "qwen3"
                                          else hf["hidden_size"] // heads)

        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type in ("linear", "llama3"):
            scaling = RopeScaling(
                rope_type=rope_type,
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings",
                             hf.get("max_position_embeddings", 8192))),
            )
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: "
                             "default, linear, llama3")

        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
            window = _qwen_sliding_window(hf)
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            window = {"mistral": hf.get("sliding_window"),
                      "qwen3": _qwen_sliding_window(hf)}.get(model_type)
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )


def _qwen_sliding_window(hf: Mapping[str, Any]) -> int | None:
    """Qwen2's and Qwen3's window as transformers 5.23 applies it:
    `sliding_window` only if `use_sliding_window`, and only on the layers
    that `layer_types` marks "sliding_attention" (by default those from
    `max_window_layers` on). The model has one window for all layers, so a
    mix of windowed and full layers is refused."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if window is None:
        return None
    n, first = hf["num_hidden_layers"], hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n)]
    types = ["full_attention" if t == "attention" else t for t in types]  # the legacy spelling
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"unsupported layer_types {sorted(unknown)} for {hf['model_type']}; "
                         "supported: full_attention, sliding_attention")
    sliding = types.count("sliding_attention")
    if 0 < sliding < len(types):
        raise ValueError(
            f"{hf['model_type']}: {sliding} of {len(types)} layers use sliding-window attention "
            f"(use_sliding_window with max_window_layers={first} or layer_types) and the rest "
            "full attention; a per-layer mix is not supported. Use one kind for every layer: "
            "use_sliding_window false, or max_window_layers 0 (all layers windowed)")
    return window if sliding else None


# Published shapes, used by the full-size eval_shape tests and the planner.
LLAMA_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-6)
LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                        rope_theta=500000.0, max_position_embeddings=8192)
