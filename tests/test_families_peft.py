"""PEFT interchange on BLOOM, OPT, GPT-J and GPT-NeoX (peft 0.21, PyTorch CPU),
both directions through the PEFT file format: LoRA, rsLoRA and IA3 with
PEFT's default targets (LoRA on BLOOM's and NeoX's fused query_key_value),
DoRA on every linear layer ("all-linear": the fused query_key_value, the
attention output and both MLP layers; every family's layers are nn.Linear,
so PEFT's DoRA applies to all of them); and prefix tuning, prompt tuning and
P-tuning against PEFT, which shows our prefix and prompt sites sit where
PEFT's past_key_values and inputs_embeds land in each family. Mutation
controls: deliberate errors in an exported file (test_adapters_lora's
PEFT_MUTATIONS) must fail the comparison on BLOOM.

The models are `families.sensitize`d (logits up to ~35) and every
comparison is relative: max |ours - peft| / max |peft logit| over the valid
positions of the padded batch, with the model parity tests' REL_TOL = 1e-5
(float32 on both sides, another summation order; on the mixtures of experts
PEFT runs in float64, see `theirs`: ours is then 7.5e-7..4.1e-6 off). Measured on 2026-12-04
(AMD EPYC, our forward eager): LoRA, rsLoRA, DoRA and IA3, both directions,
5e-7..2.1e-6; prefix, prompt and P-tuning 4e-7..1.1e-6 (PEFT's logits with
our export are bit-identical to its own); modules_to_save 8e-7..1.9e-6: a
margin of ~5x. The adapters (tiny.perturb's leaves, or PEFT's non-zero
init) move the logits by 0.39..1.44 of their scale, asserted at 100x
REL_TOL; each mutation moves them by 0.86..1.1, asserted at 10x.
"""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from families import FAMILIES, REL_TOL, VOCAB, rel_err, tiny_models  # noqa: E402
from families import NO_PEFT_DEFAULTS  # noqa: E402
from test_adapters_lora import PEFT_MUTATIONS  # noqa: E402
from tiny import padded_batch, perturb  # noqa: E402

import flax_adapters as fa  # noqa: E402
from flax_adapters import combine, split  # noqa: E402
from flax_adapters.adapters import ia3, lora, prefix, prompt, targeting  # noqa: E402
from flax_adapters.checkpoints.adapter import CONFIG_NAME  # noqa: E402
from flax_adapters.models import model_class  # noqa: E402
from flax_adapters.models.registry import family  # noqa: E402

P = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (directory, torch model, our Pretrained)."""
    return tiny_models(tmp_path_factory)


def ours(pre, tree, cfg, positions=None):
    tokens, mask = padded_batch(VOCAB)
    model = model_class(pre.config)(pre.config, settings=fa.settings_for(
        cfg, pre.config.model_type))
    kwargs = {} if positions is None else {"positions_bt": positions}
    # Eager, not jitted: each config would compile anew (~1.5 s); op by op, once
    # the ops' shapes are compiled, a forward takes ~0.1 s.
    logits, _ = model.apply({"params": fa.materialize(tree)}, jnp.asarray(tokens),
                            jnp.asarray(mask, bool), **kwargs)
    return np.asarray(logits)


def theirs(model, position_ids=None):
    """PEFT's logits. On a mixture of experts in float64, on a copy of `model`
    (experts by transformers' eager loop: its grouped_mm has no float64):
    PEFT's own float32 logits on the sensitized Mixtral are 6.6e-6 of the
    logit scale off its float64 ones (ours: 1.6e-6), too close to REL_TOL
    for a stable test; the float64 reference measures our float32 error
    alone. (BLOOM's and Gemma 2's float64 paths give NaN at left padding, so
    the dense families keep float32, where their references are ~1e-6.)"""
    tokens, mask = padded_batch(VOCAB)
    kwargs = {} if position_ids is None else {"position_ids": torch.tensor(position_ids)}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(hasattr(base.config, n) for n in ("num_local_experts", "num_experts")):
        model = copy.deepcopy(model).double()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_experts_implementation("eager")
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     **kwargs).logits.numpy()


VALID = padded_batch(VOCAB)[1].astype(bool)
# method -> (our config, PEFT's config (non-zero B), our targets' spec); PEFT's
# default targets are our preset's, except DoRA's "all-linear" on both sides.
METHODS = {
    "lora": (lora.LoraConfig(r=4, alpha=8), lambda: peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM"), "lora"),
    "rslora": (lora.LoraConfig(r=4, alpha=8, use_rslora=True), lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False, task_type="CAUSAL_LM"),
        "lora"),
    "dora": (lora.LoraConfig(r=4, alpha=8, use_dora=True, target_modules="all-linear"),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear",
                                     init_lora_weights=False, task_type="CAUSAL_LM"), None),
    "ia3": (ia3.IA3Config(), lambda: peft.IA3Config(init_ia3_weights=False,
                                                    task_type="CAUSAL_LM"), "ia3"),
}


def targets(model_type, method):
    """The target spec of METHODS[method] on a family: its preset, or "all-linear"."""
    preset = METHODS[method][2]
    if preset is None:
        return NO_PEFT_DEFAULTS.get(model_type, {}).get(method, "all-linear")
    return NO_PEFT_DEFAULTS.get(model_type, {}).get(preset) or family(
        model_type).presets.target(preset)


def configs(model_type, method):
    """METHODS[method]'s (our config, PEFT's), the targets named on both sides
    where PEFT has no default for the family (families.NO_PEFT_DEFAULTS)."""
    mine, peft_cfg = METHODS[method][0], METHODS[method][1]()
    named = NO_PEFT_DEFAULTS.get(model_type, {})
    key = METHODS[method][2] or method  # a preset's name, or DoRA's
    if key in named:
        extra = {"target_modules": named[key]}
        if method == "ia3":
            extra["feedforward_modules"] = named["ia3_feedforward"]
        mine = dataclasses.replace(mine, **extra)
        peft_cfg = dataclasses.replace(peft_cfg, **{k: list(v) for k, v in extra.items()})
    return mine, peft_cfg


def base_logits(pre, _cache={}):
    """The base model's logits over the valid positions, once per model."""
    if id(pre) not in _cache:
        _cache[id(pre)] = (pre, ours(pre, pre.params, None)[VALID])
    return _cache[id(pre)][1]


def export_to_peft(model, pre, tree, cfg, out_dir, mutate=None):
    """(our logits, PEFT's with our export loaded) over the valid positions;
    `mutate(directory, cfg)` edits the exported files first (a mutation)."""
    out = fa.save_adapter(split(tree).trainable, cfg, out_dir, pre.config.model_type)
    if mutate is not None:
        mutate(out, cfg)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    return ours(pre, tree, cfg)[VALID], theirs(loaded)[VALID]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_in_peft_with_same_logits(tiny, tmp_path, name, method):
    _, model, pre = tiny(name)
    model_type = pre.config.model_type
    cfg = configs(model_type, method)[0]
    tree = perturb(fa.inject(pre.params, cfg, jax.random.key(0), model_type))
    mine, reference = export_to_peft(model, pre, tree, cfg, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    # Our preset is PEFT's default for the family.
    spec = targets(model_type, method)
    assert config["target_modules"] == (spec if spec == "all-linear" else sorted(spec))
    if method != "ia3":
        assert (config["use_rslora"], config["use_dora"]) == (method == "rslora",
                                                              method == "dora")
    moved, err = rel_err(mine, base_logits(pre)), rel_err(mine, reference)
    print(f"{name} {method}: max |ours - peft| / max |logit| = {err:.1e} "
          f"(the adapter moves the logits by {moved:.2f} of their scale)")
    assert moved > 100 * REL_TOL, "the adapter must change the outputs, or the test proves nothing"
    assert err <= REL_TOL


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_peft_saved_adapter_imports_with_same_logits(tiny, tmp_path, name, method):
    _, model, pre = tiny(name)
    model_type = pre.config.model_type
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), configs(model_type, method)[1]).eval()
    with torch.no_grad():  # DoRA's magnitude starts at the norms (m / n = 1): move it
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    tree, cfg = fa.load_adapter(tmp_path / "adapter", pre.params, model_type)
    # PEFT's default targets (BLOOM's IA3 says 'mlp.dense_4h_to_h') select our preset's sites.
    assert targeting.resolve(pre.params, cfg.target_modules) == targeting.resolve(
        pre.params, targets(model_type, method))
    if method != "ia3":
        assert (cfg.use_rslora, cfg.use_dora) == (method == "rslora", method == "dora")
    mine, reference = ours(pre, tree, cfg)[VALID], theirs(pm)[VALID]
    moved, err = rel_err(reference, base_logits(pre)), rel_err(mine, reference)
    print(f"{name} {method}: max |ours - peft| / max |logit| = {err:.1e} (moved {moved:.2f})")
    assert moved > 100 * REL_TOL
    assert err <= REL_TOL


@pytest.mark.parametrize("mutation", list(PEFT_MUTATIONS))
def test_a_deliberate_error_in_the_export_fails_the_comparison(tiny, tmp_path, mutation):
    """The mutation controls of test_adapters_lora on BLOOM (a fused
    query_key_value, ALiBi): each error, written into our export, must move
    PEFT's logits away from ours by more than 10x REL_TOL."""
    _, model, pre = tiny("bloom")
    method, mutate = PEFT_MUTATIONS[mutation]
    cfg = METHODS[method][0]
    tree = perturb(fa.inject(pre.params, cfg, jax.random.key(0), "bloom"))
    err = rel_err(*export_to_peft(model, pre, tree, cfg, tmp_path / "adapter", mutate))
    print(f"bloom, {mutation}: max |ours - peft| / max |logit| = {err:.1e}")
    assert err > 10 * REL_TOL


PROMPT_METHODS = {
    "prefix": (prefix.PrefixConfig(num_virtual_tokens=P),
               lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
    "prompt": (prompt.PromptTuningConfig(num_virtual_tokens=P),
               lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
    "p_tuning": (prompt.PTuningConfig(num_virtual_tokens=P, encoder_hidden_size=24),
                 lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                  encoder_hidden_size=24)),
}


@pytest.mark.parametrize("method", list(PROMPT_METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_and_prompt_tuning_match_peft(tiny, tmp_path, name, method):
    """PEFT-initialised prompt / prefix / P-tuning encoder, saved by PEFT (a
    P-tuning prompt folded through its encoder), imported by us; for
    P-tuning also our encoder computing from PEFT's trainable weights; and
    our export loaded by PEFT. Positions on padded rows (see prompt.py):
    PEFT's prompt rows number [virtual, padding, real] where the family
    counts positions by index (GPT-J, NeoX: arange), so we pass it that
    numbering; BLOOM (ALiBi) and OPT count valid tokens, as our default does.
    For prefix tuning PEFT shifts explicit ids by P, so it gets our
    valid-token count."""
    from test_adapters_prompt import peft_encoder_to_ours

    path, _, pre = tiny(name)
    model_type = pre.config.model_type
    torch.manual_seed(1)
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path),
                             PROMPT_METHODS[method][1]()).eval()
    tokens, mask = padded_batch(VOCAB)
    by_index = method != "prefix" and model_type in ("gptj", "gpt_neox", "phi3", "gemma2",
                                                     "gemma3_text", "mixtral", "qwen3_moe")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if by_index else None
    position_ids = np.maximum(np.cumsum(mask, 1) - 1, 0) if method == "prefix" else None

    def peft_logits(m):
        out = theirs(m, position_ids)
        return (out if method == "prefix" else out[:, P:])[VALID]

    ref = peft_logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    tree, cfg = fa.load_adapter(tmp_path / "peft", pre.params, model_type)
    assert type(cfg) is type(PROMPT_METHODS[method][0])
    errs = {"import": rel_err(ours(pre, tree, cfg, positions)[VALID], ref)}
    if method == "p_tuning":
        encoder = {**pre.params, **peft_encoder_to_ours(pm, method)}
        errs["encoder"] = rel_err(ours(pre, encoder, PROMPT_METHODS[method][0], positions)[VALID],
                                  ref)
    fa.save_adapter(tree, cfg, tmp_path / "ours", model_type)
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path),
                                            tmp_path / "ours").eval()
    errs["export"] = rel_err(peft_logits(loaded), ref)
    moved = rel_err(ref, base_logits(pre))
    print(f"{name} {method}: max |ours - peft| / max |logit|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" (moved {moved:.2f})")
    assert moved > 100 * REL_TOL
    assert max(errs.values()) <= REL_TOL, errs


# PEFT names modules_to_save by the family's Hugging Face module names; OPT's
# "final_layer_norm" also selects every layer's FFN norm, in PEFT and here.
SAVED = {"bloom": ("ln_f",), "opt": ("final_layer_norm",), "gptj": ("ln_f", "lm_head"),
         "gpt_neox": ("final_layer_norm",),
         "phi3": ("norm",),  # as on LLaMA: the final norm and every layer's norms
         "gemma2": ("pre_feedforward_layernorm",), "gemma3": ("pre_feedforward_layernorm",),
         # mixtures of experts: the router (a parameter of transformers' TopKRouter module)
         "mixtral": ("gate",), "qwen3_moe": ("gate",)}


@pytest.mark.parametrize("name", FAMILIES)
def test_modules_to_save_both_ways_with_peft(tiny, tmp_path, name):
    _, model, pre = tiny(name)
    model_type = pre.config.model_type
    named = NO_PEFT_DEFAULTS.get(model_type, {})
    targets_ = {"target_modules": named["lora"]} if "lora" in named else {}
    cfg = lora.LoraConfig(r=4, alpha=8, modules_to_save=SAVED[name], **targets_)
    # Ours -> PEFT: LoRA and the saved modules perturbed, exported, loaded by PEFT.
    tree = fa.inject(pre.params, cfg, jax.random.key(0), model_type)
    frozen, trained = split(tree, cfg, model_type)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    trained = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), trained)
    tree = combine(frozen, trained)
    out = fa.save_adapter(trained, cfg, tmp_path / "ours", model_type)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    saved_in_peft = {n for n, _ in loaded.named_parameters() if "modules_to_save" in n}
    assert saved_in_peft, "PEFT wrapped no module: the exported names select nothing there"
    mine = ours(pre, tree, cfg)[VALID]
    errs = {"export": rel_err(mine, theirs(loaded)[VALID])}
    lora_only = combine(pre.params, split(tree, lora.LoraConfig()).trainable)
    saved_moved = rel_err(mine, ours(pre, lora_only, cfg)[VALID])
    # PEFT -> ours: PEFT's own file, saved modules trained (perturbed) in PyTorch.
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
        modules_to_save=list(SAVED[name]), **{k: list(v) for k, v in targets_.items()})).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    back, back_cfg = fa.load_adapter(tmp_path / "peft", pre.params, model_type)
    assert back_cfg.modules_to_save == SAVED[name]
    errs["import"] = rel_err(ours(pre, back, back_cfg)[VALID], theirs(pm)[VALID])
    print(f"{name} modules_to_save: max |ours - peft| / max |logit|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
          + f" (the saved modules move the logits by {saved_moved:.2f})")
    assert saved_moved > 100 * REL_TOL  # the saved modules matter
    assert max(errs.values()) <= REL_TOL, errs
