"""PEFT interchange on BLOOM, OPT, GPT-J and GPT-NeoX (peft 0.21, PyTorch CPU),
both directions through the PEFT file format, with PEFT's default targets
(LoRA on BLOOM's and NeoX's fused query_key_value); and prefix / prompt
tuning against PEFT, which shows our prefix and prompt sites sit where
PEFT's past_key_values and inputs_embeds land in each family.

Tolerance 1e-4 in float32, as the LLaMA PEFT tests: the same float32
operations in another summation order (observed ~1e-6); a wrong scale, a
transposed matrix or a misplaced site shows at 1e-2 or more.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from families import FAMILIES, VOCAB, tiny_models  # noqa: E402
from tiny import padded_batch, perturb  # noqa: E402

import flax_adapters as fa  # noqa: E402
from flax_adapters import combine, split  # noqa: E402
from flax_adapters.adapters import ia3, lora, prefix, prompt, targeting  # noqa: E402
from flax_adapters.checkpoints.adapter import CONFIG_NAME  # noqa: E402
from flax_adapters.models import model_class  # noqa: E402
from flax_adapters.models.registry import family  # noqa: E402

TOL = 1e-4
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
    logits, _ = jax.jit(model.apply)({"params": fa.materialize(tree)}, jnp.asarray(tokens),
                                     jnp.asarray(mask, bool), **kwargs)
    return np.asarray(logits)


def theirs(model, position_ids=None):
    tokens, mask = padded_batch(VOCAB)
    kwargs = {} if position_ids is None else {"position_ids": torch.tensor(position_ids)}
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     **kwargs).logits.numpy()


VALID = padded_batch(VOCAB)[1].astype(bool)
METHODS = {"lora": (lora.LoraConfig(r=4, alpha=8), lambda: peft.LoraConfig(
               r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM")),
           "ia3": (ia3.IA3Config(), lambda: peft.IA3Config(init_ia3_weights=False,
                                                           task_type="CAUSAL_LM"))}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_in_peft_with_same_logits(tiny, tmp_path, name, method):
    _, model, pre = tiny(name)
    model_type = pre.config.model_type
    cfg = METHODS[method][0]
    tree = perturb(fa.inject(pre.params, cfg, jax.random.key(0), model_type))
    out = fa.save_adapter(split(tree).trainable, cfg, tmp_path / "adapter", model_type)
    config = json.loads((out / CONFIG_NAME).read_text())
    # Our preset is PEFT's default for the family.
    assert config["target_modules"] == sorted(family(model_type).presets.target(method))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    mine, reference = ours(pre, tree, cfg)[VALID], theirs(loaded)[VALID]
    moved = np.abs(mine - ours(pre, pre.params, None)[VALID]).max()
    diff = np.abs(mine - reference).max()
    print(f"{name} {method}: max |ours - peft| = {diff:.1e} (the adapter moves logits {moved:.2f})")
    # IA3's perturbed scales move these tiny models' logits least (~1e-2).
    assert moved > 10 * TOL, "the adapter should change the outputs, or the test proves nothing"
    assert diff <= TOL


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_peft_saved_adapter_imports_with_same_logits(tiny, tmp_path, name, method):
    _, model, pre = tiny(name)
    model_type = pre.config.model_type
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), METHODS[method][1]()).eval()  # default targets
    pm.save_pretrained(tmp_path / "adapter")
    tree, cfg = fa.load_adapter(tmp_path / "adapter", pre.params, model_type)
    # PEFT's default targets (BLOOM's IA3 says 'mlp.dense_4h_to_h') select our preset's sites.
    assert targeting.resolve(pre.params, cfg.target_modules) == targeting.resolve(
        pre.params, family(model_type).presets.target(method))
    diff = np.abs(ours(pre, tree, cfg)[VALID] - theirs(pm)[VALID]).max()
    print(f"{name} {method}: max |ours - peft| = {diff:.1e}")
    assert diff <= TOL


PROMPT_METHODS = {
    "prefix": (prefix.PrefixConfig(num_virtual_tokens=P),
               lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
    "prompt": (prompt.PromptTuningConfig(num_virtual_tokens=P),
               lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
}


@pytest.mark.parametrize("method", list(PROMPT_METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_and_prompt_tuning_match_peft(tiny, tmp_path, name, method):
    """PEFT-initialised prompt / prefix, saved by PEFT, imported by us; and our
    export loaded by PEFT. Positions on padded rows (see prompt.py): PEFT's
    prompt rows number [virtual, padding, real] where the family counts
    positions by index (GPT-J, NeoX: arange), so we pass it that numbering;
    BLOOM (ALiBi) and OPT count valid tokens, as our default does. For prefix
    tuning PEFT shifts explicit ids by P, so it gets our valid-token count."""
    path, _, pre = tiny(name)
    model_type = pre.config.model_type
    torch.manual_seed(1)
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path),
                             PROMPT_METHODS[method][1]()).eval()
    tokens, mask = padded_batch(VOCAB)
    by_index = method == "prompt" and model_type in ("gptj", "gpt_neox")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if by_index else None
    position_ids = np.maximum(np.cumsum(mask, 1) - 1, 0) if method == "prefix" else None

    def peft_logits(m):
        out = theirs(m, position_ids)
        return (out if method == "prefix" else out[:, P:])[VALID]

    ref = peft_logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    tree, cfg = fa.load_adapter(tmp_path / "peft", pre.params, model_type)
    diffs = {"import": np.abs(ours(pre, tree, cfg, positions)[VALID] - ref).max()}
    fa.save_adapter(tree, cfg, tmp_path / "ours", model_type)
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path),
                                            tmp_path / "ours").eval()
    diffs["export"] = np.abs(peft_logits(loaded) - ref).max()
    moved = np.abs(ours(pre, tree, cfg, positions)[VALID] - ours(pre, pre.params, None)[VALID])
    print(f"{name} {method}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert moved.max() > 1e-2
    assert max(diffs.values()) <= TOL, diffs


# PEFT names modules_to_save by the family's Hugging Face module names; OPT's
# "final_layer_norm" also selects every layer's FFN norm, in PEFT and here.
SAVED = {"bloom": ("ln_f",), "opt": ("final_layer_norm",), "gptj": ("ln_f", "lm_head"),
         "gpt_neox": ("final_layer_norm",)}


@pytest.mark.parametrize("name", FAMILIES)
def test_modules_to_save_both_ways_with_peft(tiny, tmp_path, name):
    _, model, pre = tiny(name)
    model_type = pre.config.model_type
    cfg = lora.LoraConfig(r=4, alpha=8, modules_to_save=SAVED[name])
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
    assert np.abs(mine - theirs(loaded)[VALID]).max() <= TOL
    lora_only = combine(pre.params, split(tree, lora.LoraConfig()).trainable)
    assert np.abs(mine - ours(pre, lora_only, cfg)[VALID]).max() > 10 * TOL  # saved ones matter
    # PEFT -> ours: PEFT's own file, saved modules trained (perturbed) in PyTorch.
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
        modules_to_save=list(SAVED[name]))).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    back, back_cfg = fa.load_adapter(tmp_path / "peft", pre.params, model_type)
    assert back_cfg.modules_to_save == SAVED[name]
    assert np.abs(ours(pre, back, back_cfg)[VALID] - theirs(pm)[VALID]).max() <= TOL
