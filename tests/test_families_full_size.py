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
}
# The paper's LoRA recipe (r=32, alpha=64) puts LoRA on attention's q, k, v
# and the MLP's up and down projections (LLaMA: q,k,v,up,down); the same
# modules under each family's names (a fused query_key_value holds q, k, v).
PAPER_LORA = {
    "bloom": ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
    "gptj": ("q_proj", "k_proj", "v_proj", "fc_in", "fc_out"),
    "opt": ("q_proj", "k_proj", "v_proj", "fc1", "fc2"),
    "gpt_neox": ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
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

    counts = {
        "LoRA r=8 (PEFT default targets)": trainable(base, lora.LoraConfig(r=8), model_type),
        "LoRA r=32 a=64 paper targets": trainable(
            base, lora.LoraConfig(r=32, alpha=64, target_modules=PAPER_LORA[model_type]),
            model_type),
        "IA3 (PEFT default targets)": trainable(base, ia3.IA3Config(), model_type),
        "AdapterH 256": trainable(base, bottleneck.BottleneckConfig(), model_type),
        "AdapterP 256": trainable(base, bottleneck.BottleneckConfig(use_adapterp=True),
                                  model_type),
        "Parallel 256": trainable(base, bottleneck.BottleneckConfig(use_parallel_adapter=True),
                                  model_type),
    }
    print(f"\n{name}: {total:,} parameters")
    for recipe, n in counts.items():
        print(f"  {recipe}: {n:,} trainable ({100 * n / total:.3f}%)")

    # PEFT on the meta model: its default LoRA / IA3 targets, and the paper's LoRA.
    peft_configs = {
        "LoRA r=8 (PEFT default targets)": peft.LoraConfig(r=8, lora_alpha=16),
        "LoRA r=32 a=64 paper targets": peft.LoraConfig(
            r=32, lora_alpha=64, target_modules=list(PAPER_LORA[model_type])),
        "IA3 (PEFT default targets)": peft.IA3Config(),
    }
    for recipe, peft_cfg in peft_configs.items():
        pm = peft.get_peft_model(meta_model(hf), peft_cfg)
        assert pm.get_nb_trainable_parameters()[0] == counts[recipe], recipe

    # LLM-Adapters' bottleneck adapters, in closed form: bn * (a + a2) per site.
    layers, d, bn = cfg.num_hidden_layers, cfg.hidden_size, 256
    fused = model_type in ("bloom", "gpt_neox")  # parallel: one (d -> 3d) site, or three (d -> d)
    assert counts["AdapterH 256"] == layers * 2 * bn * (d + d)  # before the up, after the down
    assert counts["AdapterP 256"] == layers * bn * (d + d)
    assert counts["Parallel 256"] == layers * (bn * (d + 3 * d) if fused else 3 * bn * (d + d))
    for recipe, published in LLM_ADAPTERS_README.get(name, {}).items():
        n = counts["LoRA r=8 (PEFT default targets)" if recipe == "LoRA" else f"{recipe} 256"]
        if recipe == "LoRA":  # rounded (4M, 3.7M)
            assert round(n / 1e6, 1 if isinstance(published, float) else 0) == published
        else:  # truncated (125M for 125.8M)
            assert n // 10 ** 6 == published, (recipe, n)
