"""Tiny random models of the non-LLaMA families, built by transformers (with
torch) and saved with save_pretrained (safetensors), for the family tests.

Each variant is (transformers config class name, its kwargs); every variant
has 2 layers, width 64 (48 for the 6-head BLOOM), vocab 128 unless a test
gives another, and a layer-norm epsilon that is not the family's default
(so a loader that ignores the field shows).

`sensitize` replaces transformers' N(0, 0.02) init, under which logits stay
below ~1.5, MLP inputs near 0.16 and attention near uniform (a wrong GELU
variant, rope on the wrong half or a shifted ALiBi slope would then move the
logits by less than any tolerance): with it logits span about +-35 (std ~8),
the mean top attention weight is ~0.8 and MLP activation inputs have std ~2,
the non-linear range (measured in tests/test_families_parity.py's docstring).
"""

from __future__ import annotations

import math
import pathlib

VOCAB = 128
# The parity tolerance of every comparison on these sensitive models: max |ours -
# reference| / max |reference logit| (float32 on both sides, another summation
# order; measured 3e-7..2.3e-6, see each test's docstring).
REL_TOL = 1e-5


def rel_err(mine, ref) -> float:
    """max |mine - ref| / max |ref|: the error relative to the logit scale."""
    return float(abs(mine - ref).max() / abs(ref).max())


VARIANTS: dict[str, tuple[str, dict]] = {
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-3)),
    # 6 heads: ALiBi's extra slopes for a head count that is not a power of two;
    # and the residual taken after the LayerNorm.
    "bloom_6heads_postln": ("BloomConfig", dict(
        hidden_size=48, n_layer=2, n_head=6, apply_residual_connection_post_layernorm=True,
        layer_norm_epsilon=1e-3)),
    "opt": ("OPTConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              ffn_dim=96, max_position_embeddings=64)),
    # opt-350m's shape: embeddings of width 32 projected in and out, post-LN layers.
    "opt_350m_style": ("OPTConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
        max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=False)),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64,
                              bos_token_id=1, eos_token_id=2, layer_norm_epsilon=1e-3)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=96,
                                       rotary_pct=0.5, max_position_embeddings=64,
                                       use_parallel_residual=True, layer_norm_eps=1e-3)),
    "gpt_neox_sequential": ("GPTNeoXConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        rotary_pct=0.25, max_position_embeddings=64, use_parallel_residual=False,
        layer_norm_eps=1e-3)),
    # GQA (4 heads, 2 kv), rope on half of each head, a window of 6 that the 12-token
    # test batch crosses; Phi3Config's default pad / eos ids (32000) exceed the vocab.
    "phi3": ("Phi3Config", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=96,
                                partial_rotary_factor=0.5, sliding_window=6,
                                max_position_embeddings=64, rms_norm_eps=1e-3,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Gemma: GQA, head_dim 16 (not hidden / heads), and a norm epsilon of 1e-2 (the
    # embeddings scaled by sqrt(64) make the residual's mean square ~64: 1e-3 would not show).
    "gemma": ("GemmaConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                  max_position_embeddings=64, rms_norm_eps=1e-2)),
    # Gemma 2: a sliding layer then a full one, a window of 4 that the 12-token test batch
    # crosses, soft-caps that the sensitized scores and logits reach, and a query scale
    # 24^-1/2 that is not head_dim's.
    "gemma2": ("Gemma2Config", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, query_pre_attn_scalar=24, sliding_window=4,
        attn_logit_softcapping=20.0, final_logit_softcapping=30.0, max_position_embeddings=64,
        rms_norm_eps=1e-2)),
    # Gemma 3's text model: one kv head, q/k norms, a sliding layer (pattern 2) with its
    # local rope base, a full layer with rope_theta 1e6 and linear scaling (as the 4B+).
    "gemma3": ("Gemma3TextConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=96, query_pre_attn_scalar=24, sliding_window=4,
        sliding_window_pattern=2, max_position_embeddings=64, rms_norm_eps=1e-2,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # Mixtures of experts (4 experts, top 2, experts of width 48 as the dense MLPs' 96 / 2):
    # Mixtral with GQA and a window of 6 that the 12-token test batch crosses; Qwen3-MoE
    # with q/k norms, head_dim 16 and norm_topk_prob false (transformers' default; the
    # published 30B-A3B sets true, Mixtral's path), so its top-k weights are not renormalised.
    "mixtral": ("MixtralConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
        max_position_embeddings=64, rms_norm_eps=1e-3)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, moe_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=64,
        rms_norm_eps=1e-3)),
}
# One variant per family, for the tests that need only one.
FAMILIES = ("bloom", "opt", "gptj", "gpt_neox", "phi3", "gemma2", "gemma3", "mixtral", "qwen3_moe")
# The LoRA / IA3 targets the tests name for families PEFT has no default for
# (peft/utils/constants.py; PEFT and we refuse a config without them).
NO_PEFT_DEFAULTS = {
    # Mixtures of experts: PEFT's "all-linear" there adds the experts as target_parameters,
    # where it refuses DoRA; so DoRA names the attention's projections on both sides. And
    # peft 0.21 converts a Mixtral config for transformers 5 (its v4 expert names) before
    # it fills in the default targets, which it then never does: LoRA names them too.
    "mixtral": {"lora": ("q_proj", "v_proj"), "dora": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "qwen3_moe": {"lora": ("q_proj", "v_proj"), "ia3": ("q_proj", "v_proj"), "ia3_feedforward": (),
                  "dora": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "phi3": {"lora": ("qkv_proj", "gate_up_proj"), "ia3": ("qkv_proj", "down_proj"),
             "ia3_feedforward": ("down_proj",)},
}


def hf_config(name: str, layers: int | None = None, **overrides):
    import transformers

    cls, kwargs = VARIANTS[name]
    if layers is not None:  # BLOOM and GPT-J spell it n_layer
        kwargs = {**kwargs, "n_layer" if "n_layer" in kwargs else "num_hidden_layers": layers}
    return getattr(transformers, cls)(**{"vocab_size": VOCAB, **kwargs, **overrides})


HEADS = ("lm_head", "embed_out")


def sensitize(model, seed: int = 0, gain: float = 2.0, head_gain: float = 8.0):
    """Re-initialises a torch model in place so that its outputs are sensitive
    to every operation: each weight matrix N(0, gain^2 / fan_in) (q.k scores
    of std ~gain^2, MLP inputs of std ~gain), the head N(0, head_gain^2 /
    fan_in) (logits of std ~head_gain), token embeddings N(0, 1), learned
    positions N(0, 0.25), biases N(0, 0.04), norm weights 1 + N(0, 0.04)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 2 and any(h in name for h in HEADS):
                p.copy_(noise * head_gain / math.sqrt(p.shape[1]))
            elif p.ndim == 2 and ("embed" in name or "wte" in name):
                p.copy_(noise * (0.5 if "position" in name else 1.0))
            elif p.ndim == 3:  # experts' stacked (E, out, in) weights (MoE, transformers 5)
                p.copy_(noise * gain / math.sqrt(p.shape[2]))
            elif p.ndim == 2:
                p.copy_(noise * gain / math.sqrt(p.shape[1]))
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:  # norm weights
                p.copy_(1 + 0.2 * noise)
    return model


def save_tiny(path: pathlib.Path, name: str, seed: int = 0, layers: int | None = None,
              sensitive: bool = True, **overrides):
    """Builds and saves a tiny random model (`sensitize`d unless `sensitive`
    is False: then transformers' init with random offsets on biases and
    norms, a model that trains like a real one); returns the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(name, layers, **overrides)).eval()
    if sensitive:
        sensitize(model, seed)
    else:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias") or "norm" in n or ".ln_" in n:
                    p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def tiny_models(tmp_path_factory):
    """name -> (directory, torch model, our Pretrained), each saved and loaded
    once: what the test modules' `tiny` fixtures hand out."""
    from flax_adapters.checkpoints import load_pretrained

    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            built[name] = (path, save_tiny(path, name), load_pretrained(path))
        return built[name]
    return get


def make_model_dir(path: pathlib.Path, name: str, seed: int = 0) -> pathlib.Path:
    """A tiny model of `name` with the word-level tokenizer of tests/tiny.py,
    for end-to-end runs of `python -m train`."""
    from tiny import make_tokenizer

    tok = make_tokenizer()
    kwargs = VARIANTS[name][1]
    # Room for the longest training example (cutoff_len 256) in OPT's learned positions.
    longer = {k: 256 for k in ("n_positions", "max_position_embeddings") if k in kwargs}
    save_tiny(path, name, seed, sensitive=False, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, bos_token_id=None, **longer)
    tok.save_pretrained(path)
    return path
