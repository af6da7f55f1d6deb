"""The published model shapes through `jax.eval_shape` (no memory): BLOOMZ-7B1,
GPT-J-6B, OPT-6.7B and GPT-NeoX-20B give their published parameter counts,
cross-checked against transformers instantiated on the meta device; and the
trainable counts of the paper's adapter recipes on them, printed, equal what
PEFT's get_peft_model creates on the meta model (LoRA, IA3) and what
LLM-Adapters' README reports (its lora_r=8, bottleneck_size=256 table).

The configs are the models' config.json files as published on the hub,
written out here (the tests never reach a hub).
"""

import jax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import flax_adapters as fa  # noqa: E402
from flax_adapters import num_params, split  # noqa: E402
from flax_adapters.adapters import bottleneck, ia3, lora  # noqa: E402
from flax_adapters.models import abstract_params, config_from_hf  # noqa: E402
from flax_adapters.models.registry import family  # noqa: E402

CONFIGS = {
    "bigscience/bloomz-7b1": {
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 4096,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True,
        "model_type": "bloom", "n_head": 32, "n_inner": None, "n_layer": 30,
        "offset_alibi": 100, "pad_token_id": 3, "pretraining_tp": 1, "skip_bias_add": True,
        "skip_bias_add_qkv": False, "slow_but_exact": False, "unk_token_id": 0,
        "use_cache": True, "vocab_size": 250880},
    "EleutherAI/gpt-j-6b": {
        "activation_function": "gelu_new", "architectures": ["GPTJForCausalLM"],
        "attn_pdrop": 0.0, "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256,
        "gradient_checkpointing": False, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
        "model_type": "gptj", "n_embd": 4096, "n_head": 16, "n_inner": None, "n_layer": 28,
        "n_positions": 2048, "resid_pdrop": 0.0, "rotary": True, "rotary_dim": 64,
        "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "tie_word_embeddings": False, "tokenizer_class": "GPT2Tokenizer",
        "torch_dtype": "float32", "use_cache": True, "vocab_size": 50400},
    "facebook/opt-6.7b": {
        "_remove_final_layer_norm": False, "activation_dropout": 0.0,
        "activation_function": "relu", "architectures": ["OPTForCausalLM"],
        "attention_dropout": 0.0, "bos_token_id": 2, "do_layer_norm_before": True,
        "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 16384, "hidden_size": 4096,
        "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048,
        "model_type": "opt", "num_attention_heads": 32, "num_hidden_layers": 32,
        "pad_token_id": 1, "prefix": "</s>", "torch_dtype": "float16", "use_cache": True,
        "vocab_size": 50272, "word_embed_proj_dim": 4096},
    "EleutherAI/gpt-neox-20b": {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "gelu_fast", "hidden_size": 6144, "initializer_range": 0.02,
        "intermediate_size": 24576, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
        "model_type": "gpt_neox", "num_attention_heads": 64, "num_hidden_layers": 44,
        "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
        "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True,
        "vocab_size": 50432},
    "microsoft/Phi-3-mini-4k-instruct": {
        "_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                     "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
        "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu",
        "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "sliding_window": 2047, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2", "use_cache": True, "attention_bias": False,
        "vocab_size": 32064},
    "google/gemma-2-9b": {
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2,
        "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0,
        "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
        "model_type": "gemma2", "num_attention_heads": 16, "num_hidden_layers": 42,
        "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
        "sliding_window_size": 4096, "torch_dtype": "float32",
        "transformers_version": "4.42.0.dev0", "use_cache": True, "vocab_size": 256000},
    "google/gemma-3-1b-pt": {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
        "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": None,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
        "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "float32", "transformers_version": "4.50.0.dev0", "use_cache": True,
        "vocab_size": 262144},
}
# Published counts: the BLOOM and NeoX-20B papers / model cards, OPT's as the
# transformers model reports it (the OPT paper rounds to 6.7B). GPT-J's card
# says 6,053,381,344, the count of its mesh-transformer-jax checkpoint; the
# transformers GPTJForCausalLM it is loaded into has 6,050,882,784 (checked
# against the meta model below, tensor by tensor in closed form here).
PUBLISHED = {
    "bigscience/bloomz-7b1": 7_069_016_064,
    "EleutherAI/gpt-j-6b": 28 * (2 * 4096 + 4 * 4096 ** 2 + 2 * 4096 * 16384 + 16384 + 4096)
    + 2 * 50400 * 4096 + 50400 + 2 * 4096,
    "facebook/opt-6.7b": 6_658_473_984,
    "EleutherAI/gpt-neox-20b": 20_554_567_680,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,  # its model card's 3.8B
    "google/gemma-2-9b": 9_241_705_984,
    "google/gemma-3-1b-pt": 999_885_952,  # its model card's 1B
}
# The paper's LoRA recipe (r=32, alpha=64) puts LoRA on attention's q, k, v
# and the MLP's up and down projections (LLaMA: q,k,v,up,down); the same
# modules under each family's names (a fused query_key_value holds q, k, v).
PAPER_LORA = {
    "bloom": ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
    "gptj": ("q_proj", "k_proj", "v_proj", "fc_in", "fc_out"),
    "opt": ("q_proj", "k_proj", "v_proj", "fc1", "fc2"),
    "gpt_neox": ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
    # gate_up_proj holds the up (and the gate) projection: its LoRA is a LoRA on both.
    "phi3": ("qkv_proj", "gate_up_proj", "down_proj"),
    **{t: ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
       for t in ("gemma2", "gemma3_text")},
}
# LLM-Adapters' README, "Finetune Result" (lora_r=8, bottleneck_size=256),
# in its rounding: millions, truncated for the bottleneck adapters.
LLM_ADAPTERS_README = {
    "bigscience/bloomz-7b1": {"LoRA": 4, "AdapterH": 125, "AdapterP": 62, "Parallel": 125},
    "EleutherAI/gpt-j-6b": {"LoRA": 3.7, "AdapterH": 117, "AdapterP": 58, "Parallel": 176},
}


def meta_model(hf: dict):
    cfg = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def trainable(base: dict, cfg, model_type: str) -> int:
    shapes = jax.eval_shape(lambda b: fa.inject(b, cfg, jax.random.key(0), model_type), base)
    return num_params(split(shapes).trainable)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_size_counts(name):
    hf = CONFIGS[name]
    cfg = config_from_hf(hf)
    base = abstract_params(cfg)
    total = num_params(base)
    reference = meta_model(hf)
    assert total == PUBLISHED[name] == sum(p.numel() for p in reference.parameters())
    model_type = cfg.model_type

    recipes = {
        "LoRA r=8 (PEFT default targets)": lora.LoraConfig(r=8),
        "LoRA r=32 a=64 paper targets": lora.LoraConfig(
            r=32, alpha=64, target_modules=PAPER_LORA[model_type]),
        "IA3 (PEFT default targets)": ia3.IA3Config(),
        "AdapterH 256": bottleneck.BottleneckConfig(),
        "AdapterP 256": bottleneck.BottleneckConfig(use_adapterp=True),
        "Parallel 256": bottleneck.BottleneckConfig(use_parallel_adapter=True),
    }
    # PEFT on the meta model: its default LoRA / IA3 targets, and the paper's LoRA.
    peft_configs = {
        "LoRA r=8 (PEFT default targets)": peft.LoraConfig(r=8, lora_alpha=16),
        "LoRA r=32 a=64 paper targets": peft.LoraConfig(
            r=32, lora_alpha=64, target_modules=list(PAPER_LORA[model_type])),
        "IA3 (PEFT default targets)": peft.IA3Config(),
    }
    if "lora" not in family(model_type).presets.targets:  # phi3: PEFT has no defaults
        for recipe in ("LoRA r=8 (PEFT default targets)", "IA3 (PEFT default targets)"):
            with pytest.raises(ValueError, match="give target_modules"):
                trainable(base, recipes.pop(recipe), model_type)
            with pytest.raises(ValueError, match="Please specify `target_modules`"):
                peft.get_peft_model(meta_model(hf), peft_configs.pop(recipe))
    counts = {recipe: trainable(base, c, model_type) for recipe, c in recipes.items()}
    print(f"\n{name}: {total:,} parameters")
    for recipe, n in counts.items():
        print(f"  {recipe}: {n:,} trainable ({100 * n / total:.3f}%)")
    for recipe, peft_cfg in peft_configs.items():
        pm = peft.get_peft_model(meta_model(hf), peft_cfg)
        assert pm.get_nb_trainable_parameters()[0] == counts[recipe], recipe

    # LLM-Adapters' bottleneck adapters, in closed form: bn * (a + a2) per site.
    layers, d, bn = cfg.num_hidden_layers, cfg.hidden_size, 256
    # parallel: one (d -> 3d) site (Phi-3-mini: kv heads = heads), or three (d -> d)
    fused = model_type in ("bloom", "gpt_neox", "phi3")
    # AdapterH: before the up (LLaMA's names: before gate_proj and up_proj), after the down
    series = len(family(model_type).presets.target("bottleneck"))
    assert counts["AdapterH 256"] == layers * series * bn * (d + d)
    assert counts["AdapterP 256"] == layers * bn * (d + d)
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    assert counts["Parallel 256"] == layers * bn * (  # GQA (Gemma): k and v narrower than d
        d + q + 2 * kv if fused else (d + q) + 2 * (d + kv))
    for recipe, published in LLM_ADAPTERS_README.get(name, {}).items():
        n = counts["LoRA r=8 (PEFT default targets)" if recipe == "LoRA" else f"{recipe} 256"]
        if recipe == "LoRA":  # rounded (4M, 3.7M)
            assert round(n / 1e6, 1 if isinstance(published, float) else 0) == published
        else:  # truncated (125M for 125.8M)
            assert n // 10 ** 6 == published, (recipe, n)


# Mixtures of experts, their config.json as published: the count (with the model
# cards' active parameters, k of E experts per token), LoRA on attention and on the
# experts (PEFT's target_parameters) against PEFT on the meta model, and IA3.
MOE_CONFIGS = {
    "mistralai/Mixtral-8x7B-v0.1": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "output_router_logits": False, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000},
    "Qwen/Qwen3-30B-A3B": {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
        "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936},
}
# (total, the model card's active parameters in billions, which the cards round their
# own ways: Mixtral's 12.9B is 12.88B, Qwen3's 3.3B 3.35B). Mixtral's total is its
# published 46.7B exactly, Qwen3's its card's 30.5B.
MOE_PUBLISHED = {"mistralai/Mixtral-8x7B-v0.1": (46_702_792_704, 12.9),
                 "Qwen/Qwen3-30B-A3B": (30_532_122_624, 3.3)}
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_mixture_of_experts_full_size_counts(name):
    hf = MOE_CONFIGS[name]
    cfg = config_from_hf(hf)
    base = abstract_params(cfg)
    total = num_params(base)
    experts = sum(num_params(base[f"layers_{i}"]["mlp"]["experts"])
                  for i in range(cfg.num_hidden_layers))
    active = total - experts * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
    published, card_active = MOE_PUBLISHED[name]
    assert total == published == sum(p.numel() for p in meta_model(hf).parameters())
    assert abs(active / 1e9 - card_active) < 0.06
    recipes = {  # ours, PEFT's
        "LoRA r=8 on q, v": (lora.LoraConfig(r=8, target_modules=("q_proj", "v_proj")),
                             peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])),
        "LoRA r=8 on q, v and the experts": (
            lora.LoraConfig(r=8, target_modules=("q_proj", "v_proj"), target_parameters=EXPERTS),
            peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                            target_parameters=list(EXPERTS))),
        "IA3 on k, v": (ia3.IA3Config(target_modules=("k_proj", "v_proj"), feedforward_modules=()),
                        peft.IA3Config(target_modules=["k_proj", "v_proj"],
                                       feedforward_modules=[])),
    }
    print(f"\n{name}: {total:,} parameters, {active:,} active per token")
    for recipe, (mine, theirs) in recipes.items():
        n = trainable(base, mine, cfg.model_type)
        print(f"  {recipe}: {n:,} trainable ({100 * n / total:.3f}%)")
        assert peft.get_peft_model(meta_model(hf), theirs).get_nb_trainable_parameters()[0] == n
