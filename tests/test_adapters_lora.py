"""LoRA, rsLoRA, DoRA and (IA)^3: parity with peft 0.21 in both directions
(through the PEFT file format) and mutation controls for it, the tree-level
guarantees (fresh adapters are the identity, merge/unmerge, split/combine,
tree layout), that training never forms the (in, out) LoRA delta, full-size
trainable counts, targeting, sharding axes and named adapters.

Tiny random LLaMA models (MHA, and GQA with q/k/v/o and MLP biases so the
bias paths of DoRA and IA3 are exercised) are built with transformers and
re-initialised by `families.sensitize` (logits up to ~35, peaked attention,
MLP inputs in the non-linear range; random biases and norm weights).
Comparisons are relative: max |ours - peft| / max |peft logit| over the
valid positions, with the model parity tests' REL_TOL = 1e-5 (float32 on
both sides, another summation order). Measured on 2026-12-04 (AMD EPYC):
1.0e-6..2.0e-6 both ways (merged against unmerged 6e-7..1.9e-6), a margin
of 5x; the adapters (tiny.perturb's leaves, or PEFT's non-zero init) move
the logits by 0.53..1.57 of their scale, asserted at 100x REL_TOL. Each
deliberate error written into an export (PEFT_MUTATIONS: lora_B
untransposed, the scale alpha for alpha / r, rsLoRA's alpha / sqrt(r) for
alpha / r) moves PEFT's logits from ours by 0.35..1.6 of their scale,
asserted at 10x REL_TOL.

rsLoRA uses alpha = 2 (scale 1): at alpha = 8 (scale 4) on every layer-1
projection with tiny.perturb's noise the adapted MHA model is so
ill-conditioned that PEFT's own float32 logits are 8.5e-6 (ours 1.3e-5) of
the scale from a float64 evaluation, and ours against PEFT's 6.4e-6.
"""

import copy
import json
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from families import REL_TOL, rel_err, sensitize
from tiny import padded_batch as tiny_padded_batch
from tiny import perturb
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file, save_file  # noqa: E402

import flax_adapters as fa  # noqa: E402
from flax_adapters import split  # noqa: E402
from flax_adapters import tree as tree_lib  # noqa: E402
from flax_adapters.adapters import axes, dora, ia3, lora, targeting  # noqa: E402
from flax_adapters.checkpoints.adapter import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from flax_adapters.models import names  # noqa: E402
from flax_adapters.models.registry import family  # noqa: E402
from flax_adapters.tree import combine, num_params  # noqa: E402
from flax_adapters.tree import get as tree_get  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.checkpoints.hf import abstract_params  # noqa: E402
from flax_adapters.models import LlamaForCausalLM  # noqa: E402
from flax_adapters.models.config import LLAMA_7B  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=256)
VARIANTS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                mlp_bias=True),
}
# Our configs; rsLoRA uses a regex over tree paths (exported as a PEFT regex).
CONFIGS = {
    "lora": lora.LoraConfig(r=4, alpha=8, dropout=0.1),
    "rslora": lora.LoraConfig(r=4, alpha=2, use_rslora=True,
                              target_modules=r"layers_1/(self_attn|mlp)/.*_proj"),
    "dora": lora.LoraConfig(r=4, alpha=8, dropout=0.1, use_dora=True,
                            target_modules="all-linear"),
    "ia3": ia3.IA3Config(),
}
MT = "llama"  # every tiny model here is a transformers LlamaConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (torch model, our Pretrained), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            hf = transformers.LlamaConfig(**TINY, **VARIANTS[name])
            model = sensitize(transformers.AutoModelForCausalLM.from_config(hf).eval())
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            built[name] = (model, load_pretrained(path))
        return built[name]
    return get



def batch():
    return tiny_padded_batch(TINY["vocab_size"])


def ours(pre, tree, settings):
    tokens, mask = batch()
    logits, _ = LlamaForCausalLM(pre.config, settings=settings).apply(
        {"params": tree}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    return np.asarray(logits)[mask.astype(bool)]


def theirs(model):
    tokens, mask = batch()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    return logits.numpy()[mask.astype(bool)]


def adapted(pre, method, seed=1):
    cfg = CONFIGS[method]
    return perturb(fa.inject(pre.params, cfg, jax.random.key(0), pre.config.model_type), seed), cfg


# --- parity with PEFT, both directions -----------------------------------

def export_to_peft(model, pre, tree, cfg, out_dir, mutate=None):
    """(our logits, PEFT's with our export loaded); `mutate(directory, cfg)`
    edits the exported files first (a mutation control)."""
    out = fa.save_adapter(split(tree).trainable, cfg, out_dir, MT, base_model_name_or_path="tiny")
    if mutate is not None:
        mutate(out, cfg)
    reference = theirs(peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval())
    return ours(pre, tree, fa.settings_for(cfg, MT)), reference


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_export_loads_in_peft_with_same_logits(tiny, tmp_path, method, variant):
    model, pre = tiny(variant)
    tree, cfg = adapted(pre, method)
    mine, reference = export_to_peft(model, pre, tree, cfg, tmp_path / "adapter")
    err = rel_err(mine, reference)
    moved = rel_err(mine, ours(pre, pre.params, fa.settings_for(None, MT)))
    print(f"{method}/{variant}: max |ours - peft| / max |logit| = {err:.1e} "
          f"(the adapter moves the logits by {moved:.2f} of their scale)")
    assert moved > 100 * REL_TOL, "the adapter must change the outputs, or the test proves nothing"
    assert err <= REL_TOL


PEFT_CONFIGS = {  # created and initialised by PEFT, with non-zero B
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False, task_type="CAUSAL_LM"),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      layers_to_transform=[1], init_lora_weights=False,
                                      task_type="CAUSAL_LM"),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear",
                                    init_lora_weights=False, task_type="CAUSAL_LM"),
    "ia3": lambda: peft.IA3Config(init_ia3_weights=False, task_type="CAUSAL_LM"),
}
IMPORTED_TARGETS = {
    "lora": ("q_proj", "v_proj"),
    "rslora": "(layers_1/self_attn/k_proj|layers_1/self_attn/o_proj|layers_1/self_attn/q_proj|"
              "layers_1/self_attn/v_proj)",
    "dora": "all-linear",
    "ia3": ("down_proj", "k_proj", "v_proj"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_peft_saved_adapter_imports_with_same_logits(tiny, tmp_path, method, variant):
    model, pre = tiny(variant)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), PEFT_CONFIGS[method]()).eval()
    with torch.no_grad():  # DoRA's magnitude starts at the norms: move it
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    tree, cfg = fa.load_adapter(tmp_path / "adapter", pre.params, MT)
    assert (cfg.target_modules, getattr(cfg, "use_dora", False)) == (
        IMPORTED_TARGETS[method], method == "dora")
    if method != "ia3":
        assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(split(tree).trainable))
    reference = theirs(pm)
    err = rel_err(ours(pre, tree, fa.settings_for(cfg, MT)), reference)
    moved = rel_err(reference, ours(pre, pre.params, fa.settings_for(None, MT)))
    print(f"{method}/{variant}: max |ours - peft| / max |logit| = {err:.1e} (moved {moved:.2f})")
    assert moved > 100 * REL_TOL
    assert err <= REL_TOL


# --- mutation controls: deliberate errors in an exported PEFT file --------

def _edit_tensors(directory, edit):
    path = directory / WEIGHTS_NAME
    tensors = {k: np.ascontiguousarray(edit(k, v)) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _lora_b_untransposed(directory, cfg):
    """Our (r, out) B written without its transpose, reshaped to fit (out, r)."""
    _edit_tensors(directory, lambda k, v: v.T.reshape(v.shape) if k.endswith("lora_B.weight")
                  else v)


def _scale_alpha_not_alpha_over_r(directory, cfg):
    """lora_alpha written as alpha * r: PEFT scales by alpha, we by alpha / r."""
    _edit_config(directory, lora_alpha=cfg.alpha * cfg.r)


def _rslora_flag_dropped(directory, cfg):
    """use_rslora not written: PEFT scales by alpha / r, we by alpha / sqrt(r)."""
    _edit_config(directory, use_rslora=False)


# mutation -> (method, mutate(export directory, cfg)); also run on BLOOM by
# test_families_peft.py.
PEFT_MUTATIONS = {
    "lora_B untransposed": ("lora", _lora_b_untransposed),
    "scale alpha in place of alpha/r": ("lora", _scale_alpha_not_alpha_over_r),
    "rsLoRA scale alpha/r in place of alpha/sqrt(r)": ("rslora", _rslora_flag_dropped),
}


@pytest.mark.parametrize("mutation", list(PEFT_MUTATIONS))
def test_a_deliberate_error_in_the_export_fails_the_comparison(tiny, tmp_path, mutation):
    """Each error, written into our export, must move PEFT's logits away from
    ours by more than 10x REL_TOL (the comparison above would fail)."""
    model, pre = tiny("gqa")
    method, mutate = PEFT_MUTATIONS[mutation]
    tree, cfg = adapted(pre, method)
    err = rel_err(*export_to_peft(model, pre, tree, cfg, tmp_path / "adapter", mutate))
    print(f"gqa, {mutation}: max |ours - peft| / max |logit| = {err:.1e}")
    assert err > 10 * REL_TOL


def test_dora_gradients_match_peft(tiny, tmp_path):
    """Gradients of A, B and m agree with PEFT's: the norm is detached alike."""
    model, pre = tiny("gqa")
    cfg = lora.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=("q_proj", "down_proj"))
    tree = perturb(fa.inject(pre.params, cfg, jax.random.key(0), pre.config.model_type))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(fa.save_adapter(
        tree, cfg, tmp_path / "a", MT)), is_trainable=True)
    pm.train()  # dropout is 0: PEFT takes its "reuse the base output" branch, as we do
    tokens, mask = batch()
    valid = torch.tensor(mask).bool()
    logits = pm(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    (logits[valid] ** 2).mean().backward()
    frozen, trainable = split(tree)
    model_j = LlamaForCausalLM(pre.config, settings=fa.settings_for(cfg, MT))

    def loss(tr):
        out, _ = model_j.apply({"params": combine(frozen, tr)}, jnp.asarray(tokens),
                               jnp.asarray(mask, bool))
        return jnp.mean(out[mask.astype(bool)] ** 2)
    grads = jax.jit(jax.grad(loss))(trainable)
    torch_grads = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    for site in ("layers_0/self_attn/q_proj", "layers_1/mlp/down_proj"):
        g = grads
        for k in site.split("/"):
            g = g[k]
        prefix = "base_model.model." + names.module_name(site, MT)
        pairs = [(g["lora_a"], torch_grads[prefix + ".lora_A.default.weight"].T),
                 (g["lora_b"], torch_grads[prefix + ".lora_B.default.weight"].T),
                 (g["lora_magnitude"],
                  torch_grads[prefix + ".lora_magnitude_vector.default.weight"])]
        for mine, ref in pairs:
            np.testing.assert_allclose(np.asarray(mine), ref, rtol=1e-3,
                                       atol=1e-5 * np.abs(ref).max())


# --- tree-level guarantees -----------------------------------------------

@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_fresh_adapter_leaves_outputs_unchanged(tiny, method):
    _, pre = tiny("gqa")
    cfg = CONFIGS[method]
    tree = fa.inject(pre.params, cfg, jax.random.key(0), pre.config.model_type)
    # B = 0, m = ||W|| (so m / n is exactly 1), l = 1: exact up to the
    # additions of zeros, hence a tolerance at float32 resolution.
    np.testing.assert_allclose(ours(pre, tree, fa.settings_for(cfg, MT)),
                               ours(pre, pre.params, fa.settings_for(None, MT)), atol=1e-6)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_merged_equals_unmerged_and_unmerge_inverts_merge(tiny, method):
    _, pre = tiny("gqa")
    tree, cfg = adapted(pre, method)
    merged = fa.merge(tree, cfg)
    assert split(merged).trainable == {}, "merge must return a plain base tree"
    assert jax.tree.structure(merged) == jax.tree.structure(pre.params)
    # Merging changes only the summation order: the parity tolerance holds.
    err = rel_err(ours(pre, merged, fa.settings_for(None, MT)),
                  ours(pre, tree, fa.settings_for(cfg, MT)))
    print(f"{method}: max |merged - unmerged| / max |logit| = {err:.1e}")
    assert err <= REL_TOL
    norms = fa.api.dora_norms(tree, cfg) if method == "dora" else None
    back = fa.unmerge(merged, split(tree).trainable, cfg, dora_norms=norms)
    chex.assert_trees_all_equal_structs(back, tree)
    chex.assert_trees_all_close(back, tree, atol=1e-6)  # float32 rounding of W + d - d
    chex.assert_trees_all_equal(split(back).trainable, split(tree).trainable)


def test_dora_unmerge_without_norms_says_what_to_pass(tiny):
    _, pre = tiny("gqa")
    tree, cfg = adapted(pre, "dora")
    with pytest.raises(ValueError, match=r"api\.dora_norms\(tree, cfg\)"):
        fa.unmerge(fa.merge(tree, cfg), tree, cfg)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_split_combine_round_trip_is_exact(tiny, method):
    _, pre = tiny("gqa")
    tree, _ = adapted(pre, method)
    frozen, trainable = split(tree)
    chex.assert_trees_all_equal(frozen, pre.params)
    again = combine(frozen, trainable)
    assert jax.tree.structure(again) == jax.tree.structure(tree)
    chex.assert_trees_all_equal(again, tree)


def _adapter_shapes(tree):
    trainable = split(tree).trainable
    return {"/".join(k.key for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}


def test_tree_structure_matches_literal_spec(tiny):
    _, pre = tiny("gqa")  # d=64, 4 heads of 16, 2 kv heads (32), MLP 96, 2 layers
    base = pre.params
    got = _adapter_shapes(fa.inject(base, lora.LoraConfig(r=4), jax.random.key(0), MT))
    assert got == {
        "layers_0/self_attn/q_proj/lora_a": (64, 4), "layers_0/self_attn/q_proj/lora_b": (4, 64),
        "layers_0/self_attn/v_proj/lora_a": (64, 4), "layers_0/self_attn/v_proj/lora_b": (4, 32),
        "layers_1/self_attn/q_proj/lora_a": (64, 4), "layers_1/self_attn/q_proj/lora_b": (4, 64),
        "layers_1/self_attn/v_proj/lora_a": (64, 4), "layers_1/self_attn/v_proj/lora_b": (4, 32),
    }
    got = _adapter_shapes(fa.inject(base, lora.LoraConfig(r=2, use_dora=True,
                                                          target_modules=["o_proj"]),
                                    jax.random.key(0), MT))
    assert got == {
        "layers_0/self_attn/o_proj/lora_a": (64, 2), "layers_0/self_attn/o_proj/lora_b": (2, 64),
        "layers_0/self_attn/o_proj/lora_magnitude": (64,),
        "layers_1/self_attn/o_proj/lora_a": (64, 2), "layers_1/self_attn/o_proj/lora_b": (2, 64),
        "layers_1/self_attn/o_proj/lora_magnitude": (64,),
    }
    got = _adapter_shapes(fa.inject(base, ia3.IA3Config(), jax.random.key(0), MT))
    assert got == {
        "layers_0/self_attn/k_proj/ia3": (1, 32), "layers_0/self_attn/v_proj/ia3": (1, 32),
        "layers_0/mlp/down_proj/ia3": (96, 1),
        "layers_1/self_attn/k_proj/ia3": (1, 32), "layers_1/self_attn/v_proj/ia3": (1, 32),
        "layers_1/mlp/down_proj/ia3": (96, 1),
    }


def test_dora_column_norm_is_exact_algebra():
    keys = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(keys[0], (7, 5))
    a = jax.random.normal(keys[1], (7, 3))
    b = jax.random.normal(keys[2], (3, 5))
    np.testing.assert_allclose(dora.column_norm(w, a, b, 0.7),
                               jnp.linalg.norm(w + 0.7 * a @ b, axis=0), rtol=1e-5)


def test_can_overfit_with_only_adapter_leaves_trainable(tiny):
    """A fixed token -> token mapping, learned by LoRA alone; the base is
    untouched bit for bit."""
    _, pre = tiny("gqa")
    base = pre.params  # sensitized: logits of std ~8, a head that can express a fit
    base_copy = jax.tree.map(np.array, base)
    cfg = lora.LoraConfig(r=8, alpha=16, target_modules="all-linear")
    frozen, trainable = split(fa.inject(base, cfg, jax.random.key(0), MT))
    model = LlamaForCausalLM(pre.config, settings=fa.settings_for(cfg, MT))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 128, (4, 16)))
    targets = jnp.asarray(rng.permutation(128))[tokens]  # position t must say perm[token_t]
    opt = optax.adam(1e-2)

    @jax.jit
    def step(trainable, opt_state, frozen):
        def loss_fn(tr):
            logits, _ = model.apply({"params": combine(frozen, tr)}, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(trainable, updates), opt_state, loss

    opt_state, losses = opt.init(trainable), []
    for _ in range(100):
        trainable, opt_state, loss = step(trainable, opt_state, frozen)
        losses.append(float(loss))
    print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.05 * losses[0]
    chex.assert_trees_all_equal(frozen, base_copy)
    chex.assert_trees_all_equal(base, base_copy)


# --- the compiled training step never forms the (in, out) delta ---------

def delta_dots(hlo: str, kernel_shapes) -> list[str]:
    """HLO `dot` instructions (fused or not) whose result has a kernel's
    (in, out) shape or its transpose: a formed delta A @ B, or a kernel
    gradient. The kernel itself is a parameter, never a dot result."""
    shapes = {tuple(s) for s in kernel_shapes} | {tuple(s[::-1]) for s in kernel_shapes}
    found = []
    for m in re.finditer(r"= f32\[(\d+),(\d+)\]\{[^}]*\} dot\(", hlo):
        if (int(m.group(1)), int(m.group(2))) in shapes:
            found.append(hlo[m.start():hlo.find("\n", m.start())][:120])
    return found


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_step_never_forms_the_delta(tiny, method):
    _, pre = tiny("gqa")
    sites = ("q_proj", "v_proj", "down_proj")  # kernels (64, 64), (64, 32), (96, 64)
    cfg = lora.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=sites,
                          use_dora=method == "dora")
    frozen, trainable = split(fa.inject(pre.params, cfg, jax.random.key(0), MT))
    # b * t = 14 is no kernel dimension, so activations cannot be mistaken.
    tokens = jnp.zeros((2, 7), jnp.int32)
    kernel_shapes = [tree_get(pre.params, s)["kernel"].shape
                     for s in targeting.resolve(pre.params, sites)]

    def adapter_step(tr, fr):
        logits, _ = LlamaForCausalLM(pre.config, settings=fa.settings_for(cfg, MT)).apply(
            {"params": combine(fr, tr)}, tokens, deterministic=False,
            rngs={"dropout": jax.random.key(1)})
        return jnp.mean(logits ** 2)

    def merged_step(tr, fr):  # the implementation we must not have
        logits, _ = LlamaForCausalLM(pre.config).apply(
            {"params": fa.merge(combine(fr, tr), cfg)}, tokens)
        return jnp.mean(logits ** 2)

    def hlo(fn):
        return jax.jit(jax.grad(fn)).lower(trainable, frozen).compile().as_text()
    if method == "lora":  # once is enough to show the check can fail
        assert delta_dots(hlo(merged_step), kernel_shapes), "the detector must see a merge"
    assert delta_dots(hlo(adapter_step), kernel_shapes) == []


# --- full size, through eval_shape ---------------------------------------

def test_trainable_counts_on_llama_7b_shapes():
    abstract = abstract_params(LLAMA_7B)

    def count(cfg):
        shapes = jax.eval_shape(
            lambda b: fa.inject(b, cfg, jax.random.key(0), LLAMA_7B.model_type), abstract)
        return num_params(split(shapes).trainable)
    counts = {
        "lora r=8 q,v": count(lora.LoraConfig(r=8)),
        "lora r=32 q,k,v,up,down": count(lora.LoraConfig(
            r=32, target_modules=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"))),
        "dora r=8 q,v": count(lora.LoraConfig(r=8, use_dora=True)),
        "ia3 k,v,down": count(ia3.IA3Config()),
    }
    for name, n in counts.items():
        print(f"LLaMA-7B {name}: {n:,} trainable")
    assert counts["lora r=8 q,v"] == 4_194_304  # PEFT's print_trainable_parameters
    assert counts["lora r=32 q,k,v,up,down"] == 32 * ((4096 + 4096) * 3 + (4096 + 11008) * 2) * 32
    assert counts["lora r=32 q,k,v,up,down"] == 56_098_816
    assert counts["dora r=8 q,v"] == 4_194_304 + 32 * 2 * 4096  # + a magnitude per column
    assert counts["ia3 k,v,down"] == 32 * (4096 + 4096 + 11008)  # 614,400 as PEFT reports


# --- targeting -----------------------------------------------------------

def test_targeting_specs(tiny):
    _, pre = tiny("gqa")
    base = pre.params
    assert targeting.resolve(base, ["q_proj", "v_proj"]) == [
        "layers_0/self_attn/q_proj", "layers_0/self_attn/v_proj",
        "layers_1/self_attn/q_proj", "layers_1/self_attn/v_proj"]
    assert targeting.resolve(base, r"layers_1/mlp/(up|down)_proj") == [
        "layers_1/mlp/down_proj", "layers_1/mlp/up_proj"]  # tree (sorted) order
    assert len(targeting.resolve(base, "all-linear")) == 2 * 7
    assert targeting.resolve(base, family(MT).presets.target("ia3")) == [
        f"layers_{i}/{m}" for i in (0, 1)
        for m in ("mlp/down_proj", "self_attn/k_proj", "self_attn/v_proj")]
    with pytest.raises(ValueError, match=r"match no site.*'q_proj'"):
        targeting.resolve(base, ["query"])
    with pytest.raises(ValueError, match=r"match no site.*'up_proj'"):
        targeting.resolve(base, r"layers_9/.*")
    with pytest.raises(ValueError, match="match no site"):
        fa.inject(base, lora.LoraConfig(target_modules=["attn.c_attn"]), jax.random.key(0), MT)


# --- sharding axes -------------------------------------------------------

def test_adapter_axes_follow_the_kernel(tiny):
    _, pre = tiny("gqa")
    abstract = jax.eval_shape(lambda: LlamaForCausalLM(pre.config).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    base_axes = nn.get_partition_spec(abstract)
    tree = fa.inject(fa.inject(pre.params, CONFIGS["dora"], jax.random.key(0), MT),
                     ia3.IA3Config(target_modules=["k_proj", "down_proj"],
                                   feedforward_modules=["down_proj"]), jax.random.key(0), MT)
    got = axes.adapter_axes(tree, base_axes)
    q, k, down = (got["layers_0"]["self_attn"]["q_proj"], got["layers_0"]["self_attn"]["k_proj"],
                  got["layers_0"]["mlp"]["down_proj"])
    assert q == {"kernel": ("embed", "heads"), "bias": ("heads",), "lora_a": ("embed", None),
                 "lora_b": (None, "heads"), "lora_magnitude": ("heads",)}
    assert k["ia3"] == (None, "kv_heads") and down["ia3"] == ("mlp", None)
    assert got["embed_tokens"] == ("vocab", "embed")
    # The trainable part alone gets the same axes; every leaf has one per dim.
    trainable = split(tree).trainable
    assert axes.adapter_axes(trainable, base_axes) == tree_lib.split(got, lambda p: p[-1] not in (
        "kernel", "bias", "scale", "embed_tokens", "lm_head")).trainable
    for path, x in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        node = got
        for k_ in path:
            node = node[k_.key]
        assert len(node) == x.ndim


# --- named adapters ------------------------------------------------------

def test_named_adapters_share_one_base(tiny):
    _, pre = tiny("gqa")
    adapters = {}
    for name in ("lora", "ia3"):
        tree, cfg = adapted(pre, name)
        adapters[name] = (cfg, split(tree).trainable)
    for name, (cfg, trainable) in adapters.items():
        tree, settings = fa.activate(pre.params, adapters, name, MT)
        assert settings == fa.settings_for(cfg, MT)
        np.testing.assert_array_equal(ours(pre, tree, settings),
                                      ours(pre, combine(pre.params, trainable), settings))
    a, b = (ours(pre, *fa.activate(pre.params, adapters, n, MT)) for n in ("lora", "ia3"))
    assert np.abs(a - b).max() > 1e-2
    with pytest.raises(KeyError, match="'ia3', 'lora'"):
        fa.activate(pre.params, adapters, "nope", MT)


# --- the PEFT files ------------------------------------------------------

def test_export_replaces_an_existing_export_whole(tiny, tmp_path):
    _, pre = tiny("gqa")
    tree, cfg = adapted(pre, "lora")
    out = tmp_path / "adapter"
    fa.save_adapter(tree, cfg, out, MT)
    (out / "stale.txt").write_text("from an older export")
    tree2, cfg2 = adapted(pre, "ia3")
    fa.save_adapter(tree2, cfg2, out, MT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dirs left
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]


def test_import_refuses_pickles_and_unknown_types(tiny, tmp_path):
    _, pre = tiny("gqa")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="pickled adapter.*refused"):
        fa.load_adapter(tmp_path / "a", pre.params, MT)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA"}))
    with pytest.raises(ValueError, match="'VERA' is not supported; supported: BOTTLENECK, IA3, "
                       "LORA, PREFIX_TUNING, PROMPT_TUNING, P_TUNING"):
        fa.load_adapter(tmp_path / "a", pre.params, MT)
    tree, cfg = adapted(pre, "lora")
    fa.save_adapter(tree, cfg, tmp_path / "b", MT)
    mha_base = tiny("mha")[1].params  # v_proj is (64, 64) there, (64, 32) here
    with pytest.raises(ValueError, match="v_proj/lora_b: shape .* does not fit"):
        fa.load_adapter(tmp_path / "b", mha_base, MT)
