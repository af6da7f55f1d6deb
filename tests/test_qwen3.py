"""Qwen3 beyond the logits parity and mutations of test_llama_parity.py (its
"qwen3" variants): the config's sliding-window rules, Qwen3-8B's published
parameter count against transformers' meta model, PEFT interchange both
ways, cached decoding and greedy generation.

The tiny model is test_llama_parity's "qwen3" (`families.sensitize`d, head_dim
32 != hidden / heads); every comparison is relative to the logit scale with
families.REL_TOL, as in the family tests whose helpers this file reuses.
q_norm and k_norm are RMSNorm weights: no adapter method may target them
(PEFT wraps only nn.Linear), which the DoRA "all-linear" case checks.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from families import REL_TOL, VOCAB, rel_err  # noqa: E402
from test_families_full_size import meta_model, trainable  # noqa: E402
from test_families_parity import PROMPTS  # noqa: E402
from test_families_peft import METHODS, VALID, export_to_peft, ours, targets, theirs  # noqa: E402
from test_llama_parity import save_tiny  # noqa: E402
from tiny import padded_batch, perturb  # noqa: E402

import flax_adapters as fa  # noqa: E402
from flax_adapters import num_params  # noqa: E402
from flax_adapters.adapters import ia3, lora, targeting  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.generate import GenerationConfig, generate  # noqa: E402
from flax_adapters.models import (LlamaConfig, abstract_params, config_from_hf,  # noqa: E402
                                  init_cache, model_class, names)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, our Pretrained) of test_llama_parity's "qwen3"."""
    path = tmp_path_factory.mktemp("qwen3")
    return save_tiny(path, "qwen3"), load_pretrained(path / "qwen3")


# --- config -------------------------------------------------------------------------------

BASE = dict(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("fields, window", [
    ({}, None),  # no head_dim: Qwen3Config's 128, checked below
    (dict(use_sliding_window=False, sliding_window=5, max_window_layers=0), None),
    (dict(use_sliding_window=True, sliding_window=5, max_window_layers=4), None),
    (dict(use_sliding_window=True, sliding_window=5, max_window_layers=0), 5),
    (dict(use_sliding_window=True, sliding_window=5, layer_types=["sliding_attention"] * 4), 5),
    (dict(use_sliding_window=True, sliding_window=5, layer_types=["attention"] * 4), None),
])
def test_config_reads_what_transformers_applies(fields, window):
    """Our window, head_dim and qk_norm against what transformers' Qwen3Config
    makes of the same fields (its per-layer `layer_types` and window)."""
    ref = transformers.Qwen3Config(**{k: v for k, v in {**BASE, **fields}.items()
                                      if k != "model_type"})
    kinds = set(ref.layer_types)
    assert kinds == ({"sliding_attention"} if window else {"full_attention"})
    assert (ref.sliding_window if window else None) == window
    cfg = LlamaConfig.from_hf({**BASE, **fields})
    assert (cfg.sliding_window, cfg.head_dim, cfg.qk_norm) == (window, ref.head_dim, True)
    assert not LlamaConfig.from_hf({**BASE, "model_type": "qwen2"}).qk_norm


@pytest.mark.parametrize("fields, match", [
    (dict(use_sliding_window=True, sliding_window=5, max_window_layers=2),
     "qwen3: 2 of 4 layers use sliding-window attention .* a per-layer mix is not supported"),
    (dict(use_sliding_window=True, sliding_window=5,
          layer_types=["full_attention", "sliding_attention"] * 2), "2 of 4 layers"),
    (dict(use_sliding_window=True, sliding_window=5, layer_types=["linear_attention"] * 4),
     r"unsupported layer_types \['linear_attention'\] for qwen3"),
])
def test_a_per_layer_mix_of_windows_is_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**BASE, **fields})


# --- full size ----------------------------------------------------------------------------

# Qwen/Qwen3-8B's config.json as published on the hub.
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}


def test_qwen3_8b_parameter_count_and_default_targets_equal_transformers_and_peft():
    cfg = config_from_hf(QWEN3_8B)
    base = abstract_params(cfg)
    assert num_params(base) == 8_190_735_360 == sum(
        p.numel() for p in meta_model(QWEN3_8B).parameters())
    assert base["layers_0"]["self_attn"]["q_norm"]["scale"].shape == (128,)
    # PEFT's default LoRA (q, v) and IA3 (q, v, down) targets for qwen3, on the meta model.
    for ours_cfg, peft_cfg in ((lora.LoraConfig(r=8), peft.LoraConfig(r=8, lora_alpha=16)),
                               (ia3.IA3Config(), peft.IA3Config())):
        pm = peft.get_peft_model(meta_model(QWEN3_8B), peft_cfg)
        assert trainable(base, ours_cfg, "qwen3") == pm.get_nb_trainable_parameters()[0]


# --- PEFT interchange ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_peft_interchange_both_ways(tiny, tmp_path, method):
    """Ours -> PEFT (our export loaded by PeftModel) and PEFT -> ours (PEFT's
    saved adapter, non-zero init), with PEFT's default targets for qwen3, and
    DoRA on "all-linear": the same sites on both sides, q_norm / k_norm in none."""
    model, pre = tiny
    cfg = METHODS[method][0]
    tree = perturb(fa.inject(pre.params, cfg, jax.random.key(0), "qwen3"))
    mine, reference = export_to_peft(model, pre, tree, cfg, tmp_path / "ours")
    errs = {"export": rel_err(mine, reference)}
    base = ours(pre, pre.params, None)[VALID]
    moved = rel_err(mine, base)

    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), METHODS[method][1]()).eval()
    with torch.no_grad():  # DoRA's magnitude starts at the norms: move it
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    back, back_cfg = fa.load_adapter(tmp_path / "peft", pre.params, "qwen3")
    sites = targeting.resolve(pre.params, targets("qwen3", method))
    assert targeting.resolve(pre.params, back_cfg.target_modules) == sites
    wrapped = {names.site_name(n.removeprefix("base_model.model."), "qwen3")
               for n, m in pm.named_modules() if hasattr(m, "base_layer")}
    assert wrapped == set(sites) and not any("norm" in s for s in sites), sites
    peft_logits = theirs(pm)[VALID]
    errs["import"] = rel_err(ours(pre, back, back_cfg)[VALID], peft_logits)
    print(f"qwen3 {method}: max |ours - peft| / max |logit|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" (moved {moved:.2f}, "
          f"{rel_err(peft_logits, base):.2f})")
    assert min(moved, rel_err(peft_logits, base)) > 100 * REL_TOL
    assert max(errs.values()) <= REL_TOL, errs


# --- decoding -----------------------------------------------------------------------------

def test_cache_prefill_then_decode_equals_full(tiny):
    _, pre = tiny
    tokens, mask = padded_batch(VOCAB)
    apply = jax.jit(model_class(pre.config)(pre.config).apply)
    full, _ = apply({"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    cache = init_cache(pre.config, 3, 16)
    pieces = []
    for lo, hi in [(0, 8), *((t, t + 1) for t in range(8, 12))]:
        step, cache = apply({"params": pre.params}, jnp.asarray(tokens[:, lo:hi]),
                            jnp.asarray(mask[:, lo:hi], bool), cache=cache)
        pieces.append(np.asarray(step))
    valid, full = mask.astype(bool), np.asarray(full)
    assert rel_err(np.concatenate(pieces, axis=1)[valid], full[valid]) <= REL_TOL


def test_greedy_equals_transformers_generate(tiny):
    torch_model, pre = tiny
    width, pad, n_new = max(map(len, PROMPTS)), 0, 10
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        seqs = torch_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=n_new, min_new_tokens=n_new,
                                    eos_token_id=None, pad_token_id=pad)
    mine = generate(model_class(pre.config)(pre.config), pre.params, PROMPTS, GenerationConfig(
        max_new_tokens=n_new, eos_token_ids=(), pad_token_id=pad))
    np.testing.assert_array_equal(mine, seqs[:, width:].numpy())
