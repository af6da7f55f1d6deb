"""What is particular to Phi-3 (flax_adapters/models/phi3.py) beyond the
parametrized family tests of its tests/families.py variant: LongRoPE -- its
inverse frequencies and attention factor against transformers' own
`_compute_longrope_parameters` for each config spelling, and the logits of a
tiny longrope model (tied embeddings and partial rotary, as Phi-4-mini)
below and past original_max_position_embeddings, with mutation controls --;
the refusal of a KV cache that could cross that length; the config errors;
and Phi-4-mini's shapes against transformers' meta model.

The tiny model is `families.sensitize`d and compared at families.REL_TOL of
the logit scale, as every family test. Measured on 2026-12-05 (AMD EPYC):
8 tokens (short factors) 2.0e-6, 12 tokens (long) 1.2e-6; the mutations
move the logits by 0.43..0.80 of their scale (asserted at 10x REL_TOL).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from families import REL_TOL, VOCAB, rel_err, save_tiny  # noqa: E402
from tiny import padded_batch  # noqa: E402

from flax_adapters import num_params  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.models import (abstract_params, config_from_hf, init_cache,  # noqa: E402
                                   model_class)
from flax_adapters.models.phi3 import rope_frequencies  # noqa: E402

ORIGINAL = 8  # original_max_position_embeddings of the tiny longrope model
SHORT, LONG = [1.0, 1.5, 2.0, 3.0], [1.0, 2.5, 6.0, 16.0]  # rotary dims 8: 4 factors each
TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-3)
# config.json spellings of longrope: transformers >= 5's rope_parameters, the
# older rope_scaling with top-level rope_theta / partial_rotary_factor, "su" (the
# first Phi-3 128k configs), given attention / scaling factors, no extension.
SPELLINGS = {
    "rope_parameters": dict(rope_parameters={
        "rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
        "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "legacy rope_scaling": dict(rope_theta=500.0, partial_rotary_factor=0.5, rope_scaling={
        "type": "longrope", "short_factor": SHORT, "long_factor": LONG}),
    "su": dict(partial_rotary_factor=0.5, rope_scaling={
        "type": "su", "short_factor": SHORT, "long_factor": LONG}),
    "attention_factor given": dict(partial_rotary_factor=0.5, rope_scaling={
        "type": "longrope", "short_factor": SHORT, "long_factor": LONG,
        "attention_factor": 1.7}),
    "factor given": dict(partial_rotary_factor=0.5, rope_scaling={
        "type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 2.0}),
    "max = original": dict(partial_rotary_factor=0.5, max_position_embeddings=ORIGINAL,
                           rope_scaling={"type": "longrope", "short_factor": SHORT,
                                         "long_factor": LONG}),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_longrope_frequencies_match_transformers(spelling):
    """Ours from the config.json dict and from transformers' re-saved config
    (to_dict) against transformers' rope init on the config it reads: the
    short set up to the original length, the long one past it, one factor."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {"model_type": "phi3", **TINY, "max_position_embeddings": 32,
           "original_max_position_embeddings": ORIGINAL, **SPELLINGS[spelling]}
    # transformers 5.23 renames "su" only after checking the longrope keys, which
    # fails (KeyError): the reference reads it renamed, as Phi3Config means it.
    renamed = {**raw, "rope_scaling": {**raw["rope_scaling"], "type": "longrope"}} if (
        spelling == "su") else raw
    theirs = transformers.AutoConfig.for_model(**renamed)
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](theirs, None)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](theirs, None, seq_len=ORIGINAL + 1)
    for cfg in (config_from_hf(raw), config_from_hf(theirs.to_dict())):
        at = lambda last: rope_frequencies(cfg, jnp.arange(last + 1)[None])  # noqa: E731
        (ours_short, ours_factor), (ours_long, _) = at(ORIGINAL - 1), at(ORIGINAL)
        np.testing.assert_allclose(ours_short, short.numpy(), rtol=1e-6)
        np.testing.assert_allclose(ours_long, long.numpy(), rtol=1e-6)
        assert ours_factor == pytest.approx(factor, rel=1e-12)
    assert not np.allclose(short.numpy(), long.numpy())


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    """(torch model, our Pretrained) of a tiny longrope phi3 with tied embeddings."""
    path = tmp_path_factory.mktemp("phi3_longrope")
    torch_model = save_tiny(path, "phi3", tie_word_embeddings=True, max_position_embeddings=32,
                            original_max_position_embeddings=ORIGINAL,
                            **SPELLINGS["rope_parameters"])
    return torch_model, load_pretrained(path)


def errors(torch_model, pre, t, config=None):
    """rel_err of our logits (under `config`, a mutation) over the first t tokens
    of the padded batch: positions past ORIGINAL - 1 only when t > ORIGINAL."""
    tokens, mask = (x[:, :t] for x in padded_batch(VOCAB))
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(tokens),
                          attention_mask=torch.tensor(mask)).logits.numpy()
    config = config or pre.config
    ours, _ = model_class(config)(config).apply({"params": pre.params}, jnp.asarray(tokens),
                                                jnp.asarray(mask, bool))
    valid = mask.astype(bool)
    return rel_err(np.asarray(ours)[valid], ref[valid])


def _longrope(cfg, **changes):
    return dataclasses.replace(cfg, longrope=dataclasses.replace(cfg.longrope, **changes))


@pytest.mark.parametrize("t", [ORIGINAL, 12])
def test_longrope_logits_match_transformers(longrope, t):
    torch_model, pre = longrope
    assert pre.config.tie_word_embeddings and "lm_head" not in pre.params
    err = errors(torch_model, pre, t)
    print(f"phi3 longrope, {t} tokens: max |ours - transformers| / max |logit| = {err:.1e}")
    assert err <= REL_TOL
    # Mutations: the other factor set at this length, and no attention factor.
    other = {"short_factor": pre.config.longrope.long_factor} if t <= ORIGINAL else {
        "long_factor": pre.config.longrope.short_factor}
    for name, cfg in {"the other factor set": _longrope(pre.config, **other),
                      "attention factor 1": _longrope(pre.config, attention_factor=1.0)}.items():
        moved = errors(torch_model, pre, t, cfg)
        print(f"  mutation {name}: {moved:.1e}")
        assert moved > 10 * REL_TOL, name


def test_longrope_cache_within_the_original_length_and_refused_past_it(longrope):
    _, pre = longrope
    tokens, mask = (jnp.asarray(x[:, :ORIGINAL]) for x in padded_batch(VOCAB))
    mask = mask.astype(bool)
    apply = jax.jit(model_class(pre.config)(pre.config).apply)
    full, _ = apply({"params": pre.params}, tokens, mask)
    out, cache = apply({"params": pre.params}, tokens[:, :5], mask[:, :5],
                       cache=init_cache(pre.config, 3, ORIGINAL))
    pieces = [out]
    for i in range(5, ORIGINAL):
        out, cache = apply({"params": pre.params}, tokens[:, i:i + 1], mask[:, i:i + 1],
                           cache=cache)
        pieces.append(out)
    valid = np.asarray(mask)
    assert rel_err(np.concatenate(pieces, 1)[valid], np.asarray(full)[valid]) <= REL_TOL
    with pytest.raises(ValueError, match="original_max_position_embeddings=8"):
        apply({"params": pre.params}, tokens[:, :5], mask[:, :5],
              cache=init_cache(pre.config, 3, ORIGINAL + 1))


BASE = {"model_type": "phi3", **TINY}


@pytest.mark.parametrize("changes, match", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}},
     "short_factor must be a list of 8"),
    ({"partial_rotary_factor": 0.3125}, "partial_rotary_factor=0.3125 gives 5 rotary dims"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"hidden_act": "swiglu"}, "unsupported hidden_act 'swiglu'"),
    ({"sliding_window": 0}, "sliding_window=0"),
])
def test_bad_configs_are_clear_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf({**BASE, **changes})


def test_lora_and_ia3_need_targets_as_in_peft():
    """PEFT has no phi3 default targets; our error says what to give."""
    import flax_adapters as fa

    base = abstract_params(config_from_hf(BASE))
    for cfg in (fa.LoraConfig(r=2), fa.IA3Config()):
        with pytest.raises(ValueError, match="PEFT has none for phi3 either; e.g. target_"):
            jax.eval_shape(lambda b, c=cfg: fa.inject(b, c, jax.random.key(0), "phi3"), base)


def test_phi4_mini_shapes_match_transformers():
    """Phi-4-mini-instruct's config.json shape fields (its 48-long factor lists
    replaced by ones): GQA 24 / 8 in one qkv_proj, rope on 96 of 128 dims, tied
    embeddings; 3,836,021,760 parameters, as transformers' meta model."""
    hf = {"architectures": ["Phi3ForCausalLM"], "bos_token_id": 199999,
          "eos_token_id": 199999, "hidden_act": "silu", "hidden_size": 3072,
          "intermediate_size": 8192, "max_position_embeddings": 131072, "model_type": "phi3",
          "num_attention_heads": 24, "num_hidden_layers": 32, "num_key_value_heads": 8,
          "original_max_position_embeddings": 4096, "pad_token_id": 199999,
          "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05,
          "rope_scaling": {"long_factor": [1.0] * 48, "short_factor": [1.0] * 48,
                           "type": "longrope"},
          "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True,
          "vocab_size": 200064}
    cfg = config_from_hf(hf)
    assert (cfg.head_dim, cfg.rotary_ndims, cfg.num_groups) == (128, 96, 3)
    assert cfg.longrope.attention_factor == math.sqrt(1 + math.log(32) / math.log(4096))
    base = abstract_params(cfg)
    assert base["layers_0"]["self_attn"]["qkv_proj"]["kernel"].shape == (3072, 5120)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**hf))
    assert num_params(base) == 3_836_021_760 == sum(
        p.numel() for p in reference.parameters())
