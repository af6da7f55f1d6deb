"""Every adapter method on every family, through the shared sites: a fresh
adapter leaves the outputs unchanged where its method says so (LoRA: B = 0;
DoRA: m = ||W||; IA3: l = 1; bottleneck with LLM-Adapters' mam_adapter init:
zero up-projection), one training step changes only adapter leaves, and a
prompt / prefix decodes through the KV cache as it computes in full; and
AdapterH, AdapterP and the parallel adapter against LLM-Adapters' layer
(test_adapters_bottleneck's RefAdapterLinear) on each family. (Parity of
LoRA, rsLoRA, DoRA, IA3, prefix tuning, prompt tuning and P-tuning with
PEFT on each family is in test_families_peft.py.)

The one-layer models are `families.sensitize`d (logits up to ~35) and the
comparisons relative to the logit scale (max |a - b| / max |b|), with the
model parity tests' REL_TOL = 1e-5. Measured on 2026-12-04 (AMD EPYC): a
fresh identity adapter is 3e-7..7.4e-7 from the base (the jitted training
step fuses the forward differently); cached decoding 2.7e-7..4.8e-7 from
the full computation; our bottleneck adapters 3.8e-7..8.8e-7 from
LLM-Adapters' (margin > 10x), which move the logits by 0.30..0.65 of their
scale, and a fresh prompt / prefix by 0.50..1.0: both asserted at 100x
REL_TOL.
"""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("torch")

from families import FAMILIES, REL_TOL, VOCAB, rel_err, save_tiny  # noqa: E402
from families import NO_PEFT_DEFAULTS  # noqa: E402
from tiny import padded_batch  # noqa: E402

import flax_adapters as fa  # noqa: E402
from flax_adapters import combine, split  # noqa: E402
from flax_adapters.adapters import bottleneck, ia3, lora, prefix, prompt  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.checkpoints.adapter import WEIGHTS_NAME  # noqa: E402
from flax_adapters.models import init_cache, model_class  # noqa: E402
from flax_adapters.models.registry import family  # noqa: E402
from flax_adapters.step import token_loss  # noqa: E402

# method -> (config, whether a fresh adapter is the identity)
METHODS = {
    "lora": (lora.LoraConfig(r=4, alpha=8, dropout=0.1), True),
    "dora": (lora.LoraConfig(r=4, alpha=8, use_dora=True, target_modules="all-linear"), True),
    "ia3": (ia3.IA3Config(), True),
    "adapterh": (bottleneck.BottleneckConfig(bottleneck_size=8, init="mam_adapter"), True),
    "adapterp": (bottleneck.BottleneckConfig(bottleneck_size=8, use_adapterp=True,
                                             init="mam_adapter"), True),
    "parallel": (bottleneck.BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True,
                                             scaling="learned", init="mam_adapter"), True),
    "prefix": (prefix.PrefixConfig(num_virtual_tokens=3), False),
    "prefix_projection": (prefix.PrefixConfig(num_virtual_tokens=3, prefix_projection=True,
                                              encoder_hidden_size=16), False),
    "prompt": (prompt.PromptTuningConfig(num_virtual_tokens=3), False),
}
# P-tuning feeds the prompt site like prompt tuning (its encoder is family-independent;
# test_families_peft.py checks it against PEFT on each family).
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (Pretrained, base logits) of a one-layer model: the sites are
    per layer, so one layer shows them all and compiles in half the time."""
    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            save_tiny(path, name, layers=1)
            pre = load_pretrained(path)
            built[name] = (pre, forward(pre, None)(pre.params))
        return built[name]
    return get


def config_for(method, model_type):
    """METHODS[method]'s config, with the targets named where the family has no
    LoRA / IA3 default (families.NO_PEFT_DEFAULTS)."""
    cfg = METHODS[method][0]
    named = NO_PEFT_DEFAULTS.get(model_type, {})
    if method == "lora" and "lora" in named:
        return dataclasses.replace(cfg, target_modules=named["lora"])
    if method == "ia3" and "ia3" in named:
        return dataclasses.replace(cfg, target_modules=named["ia3"],
                                   feedforward_modules=named["ia3_feedforward"])
    return cfg


def refused(cfg, model_type) -> bool:
    """Whether the family refuses `cfg`'s method, saying why (Presets.notes: the
    series bottleneck adapters on a mixture of experts); asserts it does."""
    notes = family(model_type).presets.notes
    if getattr(cfg, "preset", None) not in notes:
        return False
    with pytest.raises(ValueError, match=re.escape(notes[cfg.preset])):
        fa.inject({}, cfg, jax.random.key(0), model_type)
    return True


def model_for(pre, cfg):
    return model_class(pre.config)(pre.config, settings=fa.settings_for(
        cfg, pre.config.model_type))


def forward(pre, cfg):
    """params -> logits at the valid positions of the padded batch."""
    tokens, mask = padded_batch(VOCAB)
    model = model_for(pre, cfg)
    return lambda params: model.apply({"params": fa.materialize(params)}, jnp.asarray(tokens),
                                      jnp.asarray(mask, bool))[0][mask.astype(bool)]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_every_method_runs_and_trains_only_adapter_leaves(tiny, name, method):
    pre, base_logits = tiny(name)
    cfg, identity = config_for(method, pre.config.model_type), METHODS[method][1]
    if refused(cfg, pre.config.model_type):
        return
    tree = fa.inject(pre.params, cfg, jax.random.key(0), pre.config.model_type)
    frozen, trainable = split(tree)
    assert trainable, "the method added no adapter leaves"
    model, fresh_logits = model_for(pre, cfg), forward(pre, cfg)
    tokens, mask = padded_batch(VOCAB)
    opt = optax.adam(1e-2)

    @jax.jit  # one compilation per case: the fresh outputs and one training step
    def run(trainable, frozen, opt_state):
        def loss_fn(tr):
            s, n = token_loss(model, combine(frozen, tr), jnp.asarray(tokens),
                              jnp.asarray(mask, bool), jnp.asarray(mask, bool),
                              jax.random.key(1), deterministic=False)
            return s / n
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, _ = opt.update(grads, opt_state)
        return (fresh_logits(combine(frozen, trainable)), optax.apply_updates(trainable, updates),
                loss)

    frozen_copy = jax.tree.map(np.array, frozen)
    fresh, new_trainable, loss = run(trainable, frozen, opt.init(trainable))
    moved = rel_err(np.asarray(fresh), base_logits)
    print(f"{name} {method}: max |fresh - base| / max |logit| = {moved:.1e}")
    if identity:  # exact up to additions of zeros / multiplications by one, and XLA's fusion
        assert moved <= REL_TOL
    else:  # virtual tokens / prefix slots: a change by design
        assert np.isfinite(fresh).all() and moved > 100 * REL_TOL
    assert np.isfinite(float(loss))
    chex.assert_trees_all_equal(frozen, frozen_copy)  # the base is untouched, bit for bit
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trainable,
                                           new_trainable))
    # A zero-initialised factor (LoRA's B, mam_adapter's up) gives its partner no gradient
    # on the first step, so not every leaf moves yet; some must.
    assert any(changed)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_and_prefix_decode_through_the_cache(tiny, name, method):
    """Prefill, then token by token: equal to the full computation (the prompt
    takes cache slots on the first call; the prefix is prepended each call)."""
    pre, _ = tiny(name)
    cfg = METHODS[method][0]
    tree = fa.inject(pre.params, cfg, jax.random.key(0), pre.config.model_type)
    model = model_for(pre, cfg)
    apply = jax.jit(model.apply)
    tokens, mask = padded_batch(VOCAB)
    full, _ = apply({"params": tree}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    out, cache = apply({"params": tree}, jnp.asarray(tokens[:, :8]), jnp.asarray(mask[:, :8], bool),
                       cache=init_cache(pre.config, 3, 16))
    pieces = [out]
    for t in range(8, 12):
        out, cache = apply({"params": tree}, jnp.asarray(tokens[:, t:t + 1]),
                           jnp.asarray(mask[:, t:t + 1], bool), cache=cache)
        pieces.append(out)
    stepped = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    valid = mask.astype(bool)
    err = rel_err(stepped[valid], np.asarray(full)[valid])
    print(f"{name} {method}: max |cached - full| / max |logit| = {err:.1e}")
    assert err <= REL_TOL


# LLM-Adapters' TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING (its peft/tuners/bottleneck.py);
# gpt_neox is ours (LLM-Adapters has none): BLOOM's, the same module names.
ADAPTER_TYPES = {
    "bloom": {"dense_h_to_4h": "mh_adapter", "dense_4h_to_h": "output_adapter"},
    "gptj": {"fc_in": "mh_adapter", "fc_out": "output_adapter"},
    "opt": {"fc1": "mh_adapter", "fc2": "output_adapter"},
    "gpt_neox": {"dense_h_to_4h": "mh_adapter", "dense_4h_to_h": "output_adapter"},
    # phi3 is ours too: LLaMA's placement (gate_proj, up_proj: mh; down_proj: output).
    "phi3": {"gate_up_proj": "mh_adapter", "down_proj": "output_adapter"},
    # gemma2 / gemma3_text too: LLaMA's mapping (the same module names).
    **{t: {"gate_proj": "mh_adapter", "up_proj": "mh_adapter", "down_proj": "output_adapter"}
       for t in ("gemma2", "gemma3_text")},
}


@pytest.mark.parametrize("kind", ["adapterh", "adapterp", "parallel"])
@pytest.mark.parametrize("name", FAMILIES)
def test_bottleneck_matches_llm_adapters_and_round_trips(tmp_path, name, kind):
    """Our export, in LLM-Adapters' key names, loaded into transformers' model
    wrapped with LLM-Adapters' bottleneck.Linear (test_adapters_bottleneck's
    RefAdapterLinear; AdapterP is LLM-Adapters' `bottleneck` adapter_type
    with use_adapterp: one output_adapter on the MLP's output layer): the
    same logits (REL_TOL); and importing the export gives back the tree."""
    import torch
    import transformers
    from safetensors.numpy import load_file
    from test_adapters_bottleneck import RefAdapterLinear

    torch_model = save_tiny(tmp_path / "model", name, layers=1)
    pre = load_pretrained(tmp_path / "model")
    model_type = pre.config.model_type
    cfg = bottleneck.BottleneckConfig(bottleneck_size=8, use_parallel_adapter=kind == "parallel",
                                      use_adapterp=kind == "adapterp",
                                      non_linearity="gelu")  # "bert" init: not an identity
    if refused(cfg, model_type):
        return
    tree = fa.inject(pre.params, cfg, jax.random.key(1), model_type)
    # x10: N(0, 0.2) projections, so the GELU sees pre-activations past its linear range.
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: 10 * x if p[-1].key.startswith("adapter_") else x, tree)
    out = fa.save_adapter(tree, cfg, tmp_path / "export", model_type)
    tensors = load_file(out / WEIGHTS_NAME)
    modules = {k.rsplit(".adapter_", 1)[0].rsplit(".", 1)[1] for k in tensors}
    if kind == "adapterp":  # LLM-Adapters' ADAPTERP target: the MLP's output layer only
        assert {ADAPTER_TYPES[model_type][m] for m in modules} == {"output_adapter"}
    for key in {k.rsplit(".adapter_", 1)[0].removeprefix("base_model.model.") for k in tensors}:
        parent_name, module = key.rsplit(".", 1)
        parent = torch_model.get_submodule(parent_name)
        kind_ = ("parallel_adapter" if cfg.use_parallel_adapter
                 else ADAPTER_TYPES[model_type][module])
        setattr(parent, module, RefAdapterLinear(
            getattr(parent, module), kind_, tensors[f"base_model.model.{key}.adapter_down.weight"],
            tensors[f"base_model.model.{key}.adapter_up.weight"], 1.0, "gelu"))
    tokens, mask = padded_batch(VOCAB)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(tokens),
                          attention_mask=torch.tensor(mask)).logits.numpy()[mask.astype(bool)]
    mine = forward(pre, cfg)(tree)
    moved, err = rel_err(mine, forward(pre, None)(pre.params)), rel_err(mine, ref)
    print(f"{name} {kind}: max |ours - LLM-Adapters reference| / max |logit| = {err:.1e} "
          f"(the adapter moves the logits by {moved:.2f} of their scale)")
    assert moved > 100 * REL_TOL, "the adapter must change the outputs, or the test proves nothing"
    assert err <= REL_TOL
    back, cfg_back = fa.load_adapter(out, pre.params, model_type)
    chex.assert_trees_all_close(back, tree)
    assert cfg_back == dataclasses.replace(cfg, target_modules=cfg_back.target_modules)


def test_a_misplaced_prefix_is_an_error_not_ignored(tiny):
    """A bare prefix encoder materialized without its family's attention name
    lands under LLaMA's `self_attn`, which BLOOM does not read: the model's
    prefix site refuses to run without its prefix rather than shift the
    positions for nothing. Named, it works."""
    pre, _ = tiny("bloom")
    cfg = METHODS["prefix_projection"][0]
    frozen, encoder = split(fa.inject(pre.params, cfg, jax.random.key(0), "bloom"))
    tokens = jnp.zeros((1, 3), jnp.int32)
    model = model_for(pre, cfg)
    with pytest.raises(ValueError, match="holds no prefix_k"):
        model.apply({"params": combine(frozen, prefix.materialize(encoder))}, tokens)
    placed = combine(frozen, prefix.materialize(encoder, attention="self_attention"))
    np.testing.assert_array_equal(
        model.apply({"params": placed}, tokens)[0],
        model.apply({"params": fa.materialize(combine(frozen, encoder))}, tokens)[0])
