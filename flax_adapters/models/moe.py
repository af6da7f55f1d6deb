"""Sparse mixtures of experts as a Flax causal LM: Mixtral (Jiang et al. 2024,
arXiv:2401.04088) and Qwen3-MoE (Qwen3 report, arXiv:2505.09388).

Follows transformers 5's `modeling_mixtral.py` and `modeling_qwen3_moe.py`:
LLaMA's pre-norm layer and attention (llama.Attention; Mixtral's is
Mistral's, with its sliding window, Qwen3-MoE's is Qwen3's, with the per-head
q_norm / k_norm), whose MLP is a sparse block:

    probs_ne      = softmax(float32(x @ gate.weight.T))      router, then top-k
    w_nk, e_nk    = top_k(probs_ne, k);  w_nk /= sum_k w_nk  (Mixtral always,
                                                              Qwen3-MoE if norm_topk_prob)
    y_n           = sum_k w_nk * down_e(silu(gate_e(x_n)) * up_e(x_n)),  e = e_nk

Every token goes to its k experts: no capacity, no token dropped, so the
block equals transformers' loop over experts. The (token, expert) pairs are
sorted by expert and each projection is one grouped product,
`jax.lax.ragged_dot` over the sorted rows (`group_sizes[e]` rows for expert
e), then unsorted by a gather: static shapes (n * k rows whatever the
routing), each row multiplied by its own expert only, and ragged_dot's
transpose rules give the grouped products of the backward pass (LoRA on
the experts trains through them). Why ragged_dot: it is JAX's grouped
matmul, which the backends lower as they best can -- on TPU the
`chlo.ragged_dot` instruction (a grouped matmul, n * k * d * f multiply-adds
per projection), on NVIDIA GPUs XLA's ragged-dot (cuDNN's grouped matmul
where XLA supports the shape; else XLA pads it out per expert), on CPU
jax's dense expansion (E times the work: fine for the tiny test models, and
CPU is not where an 8x7B runs). A capacity-based dispatch would drop tokens
(not transformers' maths); a gather of each token's expert weights reads
n * k weight matrices; a dense product with all experts costs E / k times
the work.

Parameters: attention, norms and head as LLaMA's; per MoE layer

    layers_i/mlp/gate/weight                  (E, d)      the router, as transformers holds it
    layers_i/mlp/experts/gate_up_proj/kernels (E, d, 2f)  [gate | up] per expert, (in, out)
    layers_i/mlp/experts/down_proj/kernels    (E, f, d)

i.e. transformers 5's live names (`model.layers.i.mlp.experts.gate_up_proj`,
(E, 2f, d)), transposed per expert to (in, out). Checkpoints hold the
published per-expert tensors, which the loader stacks into these leaves
and save_hf_dir writes back (HF_NAMES["parameters"], models/names.py):
Mixtral's `block_sparse_moe.experts.{e}.w1 / w3 / w2.weight` and
`block_sparse_moe.gate.weight`, Qwen3-MoE's `mlp.experts.{e}.gate_proj /
up_proj / down_proj.weight`. The router is a parameter, not a Linear (as in
transformers 5), and the expert stacks are `kernels`, not `kernel`: neither
is a linear site, so LoRA's target_modules, IA3, DoRA and the bottleneck
adapters reach attention only, as PEFT on transformers 5 does (its
"all-linear" also adapts the router and the experts, converted from their
transformers 4 names with a doubled rank on gate_up: ours does not, and
exports spell the modules out). LoRA reaches the experts as PEFT's
`target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`
(lora.py; applied at sites.grouped_linear, no (E, in, out) delta formed).
Qwen3-MoE's dense layers (`mlp_only_layers`, `decoder_sparse_step`) are
LLaMA's MLP of width intermediate_size.

Not modelled: the load-balancing auxiliary loss (transformers adds it to the
training loss only with output_router_logits, false in the published
configs) and Mixtral's router_jitter_noise (training-time noise on the
block's input, 0 in the published configs). The top-k weights are applied
in float32 and the k outputs summed there (transformers rounds each expert's
weighted output to the compute dtype first: the same in float32).
Quantization (quant/params.py) reaches `kernel`s only: the expert stacks,
nearly all of a mixture's weights, stay in the load dtype (bfloat16 halves
them). PEFT adapters of the transformers 4 layout (LoRA on w1 / w3 / w2,
which peft 0.21 converts with a rank_pattern) are refused by that field.

Axis legend: b batch, t new tokens, d model, n tokens (b * t), k experts per
token, e / E experts, r sorted (token, expert) rows (n * k), f expert width,
v vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.adapters import sites
from flax_adapters.adapters.targeting import Presets
from flax_adapters.models import llama
from flax_adapters.models.config import LlamaConfig
from flax_adapters.models.decoder import (Cache, decoder_stack, embed_inputs, output_logits,
                                          real_outputs, token_embedding)
from flax_adapters.models.layers import RMSNorm

Dtype = Any

MODEL_TYPES = ("mixtral", "qwen3_moe")
# The dense model whose attention each mixture has (transformers' modular files).
_ATTENTION_OF = {"mixtral": "mistral", "qwen3_moe": "qwen3"}

_LLAMA_NAMES = {"layers": "model.layers", "embed_tokens": "model.embed_tokens.weight",
                "norm": "model.norm", "lm_head": "lm_head.weight", "base_prefix": "model."}
# "parameters": within a layer, the parameters that are not a Linear's weight, by
# their transformers 5 names (a module's in the order it registers them, the order
# PEFT nests its ParamWrappers in), each with the published tensors it is saved as
# ({e}: one tensor per expert, several: the parts of its output axis).
HF_NAMES = {
    "mixtral": {**_LLAMA_NAMES, "parameters": {
        "mlp.gate.weight": ("block_sparse_moe.gate.weight",),
        "mlp.experts.gate_up_proj": ("block_sparse_moe.experts.{e}.w1.weight",
                                     "block_sparse_moe.experts.{e}.w3.weight"),
        "mlp.experts.down_proj": ("block_sparse_moe.experts.{e}.w2.weight",)}},
    "qwen3_moe": {**_LLAMA_NAMES, "parameters": {
        "mlp.gate.weight": ("mlp.gate.weight",),
        "mlp.experts.gate_up_proj": ("mlp.experts.{e}.gate_proj.weight",
                                     "mlp.experts.{e}.up_proj.weight"),
        "mlp.experts.down_proj": ("mlp.experts.{e}.down_proj.weight",)}},
}
# Why a method has no default targets here (adapters/targeting.py's Presets.notes).
_NO_SERIES = ("LLM-Adapters' series adapters sit at the MLP's linear layers, which in a "
              "mixture of experts are stacked expert parameters, not linear sites; use the "
              "parallel adapter (use_parallel_adapter=True) or LoRA")
PRESETS = {
    # PEFT's Mixtral mappings: LoRA q, v; IA3 k, v and "w2", a module transformers 5 no
    # longer has (PEFT's IA3 matches it nowhere). LLM-Adapters has no MoE mapping: the
    # parallel adapter takes LLaMA's q, k, v.
    "mixtral": Presets(
        targets={"lora": ("q_proj", "v_proj"), "ia3": ("k_proj", "v_proj"),
                 "ia3_feedforward": (), "parallel": ("q_proj", "k_proj", "v_proj")},
        series_placement={}, notes={"bottleneck": _NO_SERIES, "adapterp": _NO_SERIES},
        peft_all_linear=False),
    # PEFT has no qwen3_moe mapping: its Qwen3 ones (IA3 without the MLP's down_proj).
    "qwen3_moe": Presets(
        targets={"lora": ("q_proj", "v_proj"), "ia3": ("q_proj", "v_proj"),
                 "ia3_feedforward": (), "parallel": ("q_proj", "k_proj", "v_proj")},
        series_placement={}, notes={"bottleneck": _NO_SERIES, "adapterp": _NO_SERIES},
        peft_all_linear=False),
}


@dataclasses.dataclass(frozen=True)
class MoeConfig(LlamaConfig):
    """LlamaConfig (the attention's fields, read as for Mistral / Qwen3) plus
    the sparse block's. `moe_intermediate_size` is the experts' width (Mixtral's
    config calls it intermediate_size); `intermediate_size` that of Qwen3-MoE's
    dense layers."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer` has the sparse block (transformers' Qwen3MoeDecoderLayer rule)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "MoeConfig":
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} for moe.py; supported: "
                             f"{', '.join(MODEL_TYPES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for {model_type}; only 'silu'")
        # Mixtral windows whenever sliding_window is set; Qwen3-MoE on use_sliding_window,
        # every layer alike (no max_window_layers, unlike dense Qwen3); its head_dim
        # defaults to hidden_size // heads (dense Qwen3's to 128).
        use_window = model_type == "mixtral" or hf.get("use_sliding_window")
        dense = LlamaConfig.from_hf({
            **hf, "model_type": _ATTENTION_OF[model_type], "use_sliding_window": False,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]})
        experts = hf.get("num_local_experts", hf.get("num_experts"))
        k = hf.get("num_experts_per_tok", 2)
        width = hf["intermediate_size"] if model_type == "mixtral" else hf["moe_intermediate_size"]
        step = hf.get("decoder_sparse_step", 1) if model_type == "qwen3_moe" else 1
        dense_layers = tuple(hf.get("mlp_only_layers") or ()) if model_type == "qwen3_moe" else ()
        for name, value in (("num_experts", experts), ("num_experts_per_tok", k),
                            ("moe_intermediate_size", width), ("decoder_sparse_step", step)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{model_type}: {name} must be a positive integer, got {value!r}")
        if k > experts:
            raise ValueError(f"{model_type}: num_experts_per_tok={k} exceeds the {experts} "
                             "experts")
        n = hf["num_hidden_layers"]
        if not all(isinstance(i, int) and 0 <= i < n for i in dense_layers):
            raise ValueError(f"{model_type}: mlp_only_layers {list(dense_layers)} must be layer "
                             f"indices in [0, {n})")
        fields = {f.name: getattr(dense, f.name) for f in dataclasses.fields(dense)}
        return cls(**{
            **fields, "model_type": model_type,
            "sliding_window": hf.get("sliding_window") if use_window else None,
            "num_experts": experts, "num_experts_per_tok": k, "moe_intermediate_size": width,
            "norm_topk_prob": model_type == "mixtral" or bool(hf.get("norm_topk_prob", False)),
            "decoder_sparse_step": step, "mlp_only_layers": dense_layers})


def route(logits_ne: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """transformers' TopKRouter after the gate: softmax in float32 over all E
    experts, then the top k, renormalised to sum 1 if `normalize`. Returns
    (float32 weights (n, k), expert ids (n, k)), the largest first."""
    probs_ne = jax.nn.softmax(logits_ne.astype(jnp.float32), axis=-1)
    w_nk, e_nk = jax.lax.top_k(probs_ne, k)
    if normalize:
        w_nk = w_nk / jnp.sum(w_nk, axis=-1, keepdims=True)
    return w_nk, e_nk


def swiglu(h_r2f: jax.Array) -> jax.Array:
    """silu(gate) * up of a fused [gate | up] projection (transformers' chunk(2))."""
    gate_rf, up_rf = jnp.split(h_r2f, 2, axis=-1)
    return nn.silu(gate_rf) * up_rf


class GroupedLinear(nn.Module):
    """E linear maps stacked, `kernels` (E, in, out), each applied to its own
    rows: x_ri sorted by expert, group_sizes_e[e] rows for expert e. A
    grouped adapter site (sites.grouped_linear)."""

    experts: int
    features: int
    axes: tuple[str, str, str]
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_ri: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
        kernels = self.param("kernels", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), self.axes),
            (self.experts, x_ri.shape[-1], self.features), self.param_dtype)
        y_ro = jax.lax.ragged_dot(x_ri, kernels.astype(self.dtype), group_sizes_e)
        return sites.grouped_linear(self, x_ri, group_sizes_e, y_ro, self.settings)


class Router(nn.Module):
    """transformers 5's TopKRouter weight (E, d) and its logits x @ weight.T
    (in the compute dtype; `route` takes them on in float32)."""

    experts: int
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_nd: jax.Array) -> jax.Array:
        weight_ed = self.param("weight", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (self.experts, x_nd.shape[-1]),
            self.param_dtype)
        return x_nd @ weight_ed.T.astype(x_nd.dtype)


class Experts(nn.Module):
    """The E experts' SwiGLU MLPs on rows sorted by expert."""

    cfg: MoeConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_rd: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
        cfg = self.cfg
        grouped = lambda feats, axes, name: GroupedLinear(  # noqa: E731
            cfg.num_experts, feats, axes, self.dtype, self.param_dtype, self.settings,
            name=name)
        h_r2f = grouped(2 * cfg.moe_intermediate_size, ("expert", "embed", "mlp"),
                        "gate_up_proj")(x_rd, group_sizes_e)
        return grouped(cfg.hidden_size, ("expert", "mlp", "embed"), "down_proj")(
            swiglu(h_r2f), group_sizes_e)


class SparseMoeBlock(nn.Module):
    cfg: MoeConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd: jax.Array, deterministic: bool) -> jax.Array:
        del deterministic  # nothing random in the block
        cfg = self.cfg
        b, t, d = x_btd.shape
        e, k = cfg.num_experts, cfg.num_experts_per_tok
        x_nd = x_btd.reshape(b * t, d).astype(self.dtype)
        w_nk, e_nk = route(Router(e, self.param_dtype, name="gate")(x_nd), k,
                           cfg.norm_topk_prob)
        # The n * k (token, expert) rows sorted by expert: sorted row j is flat row
        # order_r[j], group_sizes_e[e] rows go to expert e.
        order_r = jnp.argsort(e_nk.reshape(-1), stable=True)
        group_sizes_e = jnp.bincount(e_nk.reshape(-1), length=e).astype(jnp.int32)
        y_rd = Experts(cfg, self.dtype, self.param_dtype, self.settings, name="experts")(
            x_nd[order_r // k], group_sizes_e)
        unsort_r = jnp.zeros_like(order_r).at[order_r].set(jnp.arange(order_r.shape[0]))
        y_nkd = y_rd[unsort_r].reshape(b * t, k, d)
        y_nd = jnp.einsum("nkd,nk->nd", y_nkd.astype(jnp.float32), w_nk)
        return y_nd.astype(self.dtype).reshape(b, t, d)


class DecoderLayer(nn.Module):
    """LLaMA's layer with the sparse block as its MLP (a dense MLP where
    `sparse` is False: Qwen3-MoE's mlp_only_layers / decoder_sparse_step)."""

    cfg: MoeConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings
    sparse: bool = True

    @nn.compact
    def __call__(self, h_btd, positions_bt, mask_bts, layer_cache, index, deterministic):
        cfg, args = self.cfg, (self.cfg, self.dtype, self.param_dtype, self.settings)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
        attn, layer_cache = llama.Attention(*args, name="self_attn")(
            norm("input_layernorm")(h_btd), positions_bt, mask_bts, layer_cache, index,
            deterministic)
        h_btd = h_btd + attn
        mlp = SparseMoeBlock(*args, name="mlp") if self.sparse else llama.MLP(*args, name="mlp")
        return h_btd + mlp(norm("post_attention_layernorm")(h_btd), deterministic), layer_cache


class MoeForCausalLM(nn.Module):
    """Causal LM with the interface of LlamaForCausalLM:
    `__call__(tokens, valid=None, positions=None, cache=None)` -> (float32
    logits (b, t, v), new cache or None)."""

    cfg: MoeConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    settings: sites.Settings = sites.Settings()
    remat: bool = False

    @nn.compact
    def __call__(self, tokens_bt, valid_bt=None, positions_bt=None, cache: Cache | None = None,
                 deterministic: bool = True, logits_at_ba: jax.Array | None = None):
        cfg = self.cfg
        embedding = token_embedding(self, cfg.vocab_size, cfg.hidden_size)
        x = embed_inputs(self, embedding, tokens_bt, valid_bt, positions_bt, cache,
                         cfg.sliding_window)
        h_btd, new_cache = decoder_stack(
            self, DecoderLayer, (cfg, self.dtype, self.param_dtype, self.settings), x, x.h_btd,
            (x.positions_bt, x.mask_bts), deterministic, self.remat,
            layer_attrs=lambda i: {"sparse": cfg.is_sparse(i)})
        h_btd = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(
            real_outputs(h_btd, x, logits_at_ba))
        return output_logits(self, h_btd, embedding, cfg.tie_word_embeddings), new_cache
