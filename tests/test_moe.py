"""Mixtral and Qwen3-MoE (models/moe.py): what a mixture of experts has that
the parametrized family tests (families.VARIANTS "mixtral", "qwen3_moe": parity,
bfloat16, cache, greedy, PEFT, bottleneck, train) do not cover.

- The routing of the sensitized test batch is not on a knife edge: the
  smallest gap between a token's k-th and (k+1)-th router probability is
  ~6e-4 (Mixtral) and ~1.4e-3 (Qwen3-MoE), far above float32's ~1e-7, so
  both sides pick the same experts and a comparison is of the maths.
- Checkpoints: the published per-expert tensors stack into one leaf per
  projection and save_hf_dir writes them back (transformers loads the
  result); a checkpoint in transformers 5's fused live names loads the same;
  an absent or surplus expert is named.
- On 8 fake CPU devices the experts shard over tensor ('expert'), straight
  from the file, and the logits equal one device's.
- LoRA on the experts as PEFT's target_parameters (ParamWrapper): both ways
  through the PEFT format, the gradients equal PEFT's, merged == unmerged;
  mutation controls on the ParamWrapper layout; the refusals.
- Qwen3-MoE's dense layers (decoder_sparse_step, mlp_only_layers).

Tolerance: the families' REL_TOL = 1e-5 of the logit scale (measured
9e-7..2.5e-6 here, float32 on both sides, other summation orders; the
adapters move the logits by 0.62..1.23 of their scale, the layout mutations
by 1.0..1.1).
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

from families import REL_TOL, VOCAB, rel_err, save_tiny, tiny_models  # noqa: E402
from tiny import padded_batch, perturb  # noqa: E402

import flax_adapters as fa  # noqa: E402
from flax_adapters import sharding, split  # noqa: E402
from flax_adapters.adapters import lora  # noqa: E402
from flax_adapters.adapters.axes import adapter_axes  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.checkpoints.adapter import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from flax_adapters.checkpoints.hf import save_hf_dir  # noqa: E402
from flax_adapters.models import config_from_hf, logical_axes, model_class  # noqa: E402

NAMES = ("mixtral", "qwen3_moe")
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
TOKENS, MASK = padded_batch(VOCAB)
VALID = MASK.astype(bool)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (directory, torch model, our Pretrained)."""
    return tiny_models(tmp_path_factory)


def ours(pre, tree, cfg=None, tokens=TOKENS, mask=MASK):
    model = model_class(pre.config)(pre.config, settings=fa.settings_for(
        cfg, pre.config.model_type))
    logits, _ = model.apply({"params": fa.materialize(tree)}, jnp.asarray(tokens),
                            jnp.asarray(mask, bool))
    return np.asarray(logits)


def theirs(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS),
                     attention_mask=torch.tensor(MASK)).logits.numpy()


@pytest.mark.parametrize("name", NAMES)
def test_routing_is_not_on_a_knife_edge(tiny, name):
    _, model, pre = tiny(name)
    with torch.no_grad():
        router = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(MASK),
                       output_router_logits=True).router_logits
    k = pre.config.num_experts_per_tok
    for i, logits in enumerate(router):
        probs = np.sort(torch.softmax(logits.float(), -1).numpy().reshape(*TOKENS.shape, -1)[VALID],
                        axis=-1)[:, ::-1]
        gap = float((probs[:, k - 1] - probs[:, k]).min())
        print(f"{name} layer {i}: smallest p_k - p_(k+1) = {gap:.1e}")
        assert gap > 1e-4


def test_tree_and_checkpoint_names_round_trip(tiny, tmp_path):
    """The layer's tree (a literal spec), save_hf_dir's published names (those
    transformers' save_pretrained writes), transformers loading our save, and
    our loader reading it back bit for bit."""
    from safetensors.numpy import load_file

    path, model, pre = tiny("mixtral")
    layer = jax.tree.map(np.shape, pre.params["layers_0"])
    assert layer["mlp"] == {"gate": {"weight": (4, 64)},
                            "experts": {"gate_up_proj": {"kernels": (4, 64, 96)},
                                        "down_proj": {"kernels": (4, 48, 64)}}}
    out = save_hf_dir(pre.params, pre.hf_config, tmp_path / "saved")
    assert set(load_file(out / "model.safetensors")) == set(load_file(path / "model.safetensors"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(theirs(reloaded), theirs(model))
    again = load_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)


def test_live_names_load_the_same(tiny, tmp_path):
    """A checkpoint in transformers 5's module names, experts fused (E, 2f, d) and
    the router under `mlp.gate`, loads into the same tree."""
    from safetensors.torch import save_file

    path, model, pre = tiny("mixtral")
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "config.json").write_text((path / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "live" / "model.safetensors")
    live = load_pretrained(tmp_path / "live")
    jax.tree.map(np.testing.assert_array_equal, live.params, pre.params)


def test_missing_or_surplus_experts_are_named(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _, _ = tiny("mixtral")
    tensors = load_file(path / "model.safetensors")
    for case, change, match in [
            ("missing", lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
             r"missing 1 expert tensor\(s\) of layers_1/mlp/experts/gate_up_proj/kernels, e.g. "
             r"\['model.layers.1.block_sparse_moe.experts.2.w3.weight'\]"),
            ("surplus", lambda t: t.update({
                "model.layers.0.block_sparse_moe.experts.4.w2.weight":
                    t["model.layers.0.block_sparse_moe.experts.0.w2.weight"]}),
             "is expert 4's, but config.json implies 4 experts")]:
        (tmp_path / case).mkdir()
        (tmp_path / case / "config.json").write_text((path / "config.json").read_text())
        changed = dict(tensors)
        change(changed)
        save_file(changed, tmp_path / case / "model.safetensors")
        with pytest.raises(ValueError, match=match):
            load_pretrained(tmp_path / case)


def test_experts_shard_over_tensor_on_8_devices(tiny):
    """Loaded straight into a (data 2, fsdp 2, tensor 2) mesh: each device holds 2
    of the 4 experts, half the model width; the logits with LoRA on the experts
    and attention equal one device's."""
    from jax.sharding import PartitionSpec as P

    path, _, pre = tiny("mixtral")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    placed = load_pretrained(path, mesh=mesh).params
    kernels = placed["layers_0"]["mlp"]["experts"]["gate_up_proj"]["kernels"]
    assert kernels.sharding.spec == P("tensor", "fsdp", None)
    assert {s.data.shape for s in kernels.addressable_shards} == {(2, 32, 96)}
    jax.tree.map(np.testing.assert_array_equal, placed, pre.params)

    cfg = lora.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS)
    tree = perturb(fa.inject(pre.params, cfg, jax.random.key(0), "mixtral"))
    axes = adapter_axes(tree, logical_axes(pre.config))
    assert axes["layers_0"]["mlp"]["experts"]["down_proj"]["lora_b"] == ("expert", None, "embed")
    on_mesh = jax.device_put(tree, sharding.tree_shardings(axes, tree, mesh))
    model = model_class(pre.config)(pre.config, settings=fa.settings_for(cfg, "mixtral"))
    tokens, mask = np.concatenate([TOKENS, TOKENS[:1]]), np.concatenate([MASK, MASK[:1]])
    forward = jax.jit(sharding.on_mesh(lambda p, t, m: model.apply({"params": p}, t, m)[0],
                                       mesh))
    sharded = np.asarray(forward(on_mesh, jnp.asarray(tokens), jnp.asarray(mask, bool)))
    one = ours(pre, tree, cfg, tokens, mask)
    err = rel_err(sharded[mask.astype(bool)], one[mask.astype(bool)])
    print(f"8 devices vs 1: {err:.1e}")
    assert err <= REL_TOL


# (target_modules, target_parameters): experts beside attention; the experts alone,
# one of the two parameters (PEFT's target_modules=[]).
EXPERT_TARGETS = {"attention_and_experts": (("q_proj", "v_proj"), EXPERTS),
                  "down_proj_alone": ((), ("mlp.experts.down_proj",))}


@pytest.mark.parametrize("targets", list(EXPERT_TARGETS))
@pytest.mark.parametrize("name", NAMES)
def test_experts_lora_both_ways_with_peft(tiny, tmp_path, name, targets):
    _, model, pre = tiny(name)
    modules, parameters = EXPERT_TARGETS[targets]
    cfg = lora.LoraConfig(r=2, alpha=4, target_modules=modules, target_parameters=parameters)
    tree = perturb(fa.inject(pre.params, cfg, jax.random.key(0), name))
    out = fa.save_adapter(split(tree).trainable, cfg, tmp_path / "ours", name)
    config = json.loads((out / CONFIG_NAME).read_text())
    assert (config["target_modules"], config["target_parameters"]) == (
        sorted(modules), sorted(parameters))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    mine = ours(pre, tree, cfg)[VALID]
    errs = {"export": rel_err(mine, theirs(loaded)[VALID])}
    moved = rel_err(mine, ours(pre, pre.params)[VALID])

    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=list(modules), target_parameters=list(parameters),
        init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    back, back_cfg = fa.load_adapter(tmp_path / "peft", pre.params, name)
    assert (back_cfg.target_modules, back_cfg.target_parameters) == (modules,
                                                                      tuple(sorted(parameters)))
    errs["import"] = rel_err(ours(pre, back, back_cfg)[VALID], theirs(pm)[VALID])
    print(f"{name} {targets}: max |ours - peft| / max |logit|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" (moved {moved:.2f})")
    assert moved > 100 * REL_TOL
    assert max(errs.values()) <= REL_TOL, errs


def test_experts_lora_gradients_equal_peft(tiny):
    """d(loss)/d(A, B) of the experts' LoRA, through ragged_dot's transpose
    rules, against PEFT's autograd with the same factors, in PEFT's layout
    (loss: the logits against fixed random weights)."""
    _, model, pre = tiny("mixtral")
    cfg = lora.LoraConfig(r=2, alpha=4, target_modules=(), target_parameters=EXPERTS)
    frozen, trainable = split(perturb(fa.inject(pre.params, cfg, jax.random.key(0), "mixtral")))
    weights = np.random.default_rng(0).normal(size=(*TOKENS.shape, VOCAB)) * MASK[..., None]
    m = model_class(pre.config)(pre.config, settings=fa.settings_for(cfg, "mixtral"))
    grads = jax.grad(lambda tr: jnp.sum(m.apply(
        {"params": fa.combine(frozen, tr)}, jnp.asarray(TOKENS), jnp.asarray(MASK, bool))[0]
        * weights))(trainable)

    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=list(EXPERTS)))
    factors = dict(pm.named_parameters())
    # PEFT wraps gate_up_proj first, down_proj around it (registration order)
    wrappers = {"down_proj": "", "gate_up_proj": "base_layer."}
    pairs = [(f"layers_{i}", site, leaf,
              f"base_model.model.model.layers.{i}.mlp.experts.{wrappers[site]}"
              f"{'lora_A' if leaf == 'lora_a' else 'lora_B'}.default.weight")
             for i in range(pre.config.num_hidden_layers) for site in wrappers
             for leaf in ("lora_a", "lora_b")]
    with torch.no_grad():
        for layer, site, leaf, key in pairs:
            factors[key].copy_(torch.tensor(np.asarray(lora.to_peft_experts(
                leaf, np.asarray(trainable[layer]["mlp"]["experts"][site][leaf])))))
    logits = pm(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(MASK)).logits
    (logits * torch.tensor(weights, dtype=torch.float32)).sum().backward()
    worst = max(rel_err(lora.to_peft_experts(leaf, np.asarray(
        grads[layer]["mlp"]["experts"][site][leaf])), factors[key].grad.numpy())
        for layer, site, leaf, key in pairs)
    print(f"experts' LoRA gradients: max |ours - peft| / max |peft| = {worst:.1e}")
    assert worst <= REL_TOL


def test_experts_lora_fresh_is_identity_and_merges(tiny):
    """A fresh adapter (B = 0) leaves the logits; merged (W_e + s A_e B_e per
    expert) equals unmerged, and unmerge gives the tree back."""
    _, _, pre = tiny("mixtral")
    cfg = lora.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS)
    fresh = fa.inject(pre.params, cfg, jax.random.key(0), "mixtral")
    base = ours(pre, pre.params)[VALID]
    assert rel_err(ours(pre, fresh, cfg)[VALID], base) <= REL_TOL
    tree = perturb(fresh)
    merged = fa.merge(tree, cfg)
    assert not split(merged).trainable
    err = rel_err(ours(pre, merged)[VALID], ours(pre, tree, cfg)[VALID])
    print(f"merged vs unmerged: {err:.1e}")
    assert err <= REL_TOL
    back = lora.unmerge(merged, split(tree).trainable, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back, tree)


# Deliberate errors in the ParamWrapper layout of an export: PEFT's logits must move
# away from ours by > 10x REL_TOL.
LAYOUT_MUTATIONS = {
    "lora_B's columns expert-major (e * r + j) in place of rank-major (j * E + e)":
        lambda key, v, e: (v.reshape(v.shape[0], -1, e).transpose(0, 2, 1).reshape(v.shape)
                           if "lora_B" in key and "experts" in key else v),
    "lora_A's rows rank-major (j * E + e) in place of expert-major (e * r + j)":
        lambda key, v, e: (v.reshape(e, -1, v.shape[1]).transpose(1, 0, 2).reshape(v.shape)
                           if "lora_A" in key and "experts" in key else v),
}


@pytest.mark.parametrize("mutation", list(LAYOUT_MUTATIONS))
def test_a_deliberate_layout_error_fails_the_comparison(tiny, tmp_path, mutation):
    from safetensors.numpy import load_file, save_file

    _, model, pre = tiny("mixtral")
    cfg = lora.LoraConfig(r=2, alpha=4, target_modules=(), target_parameters=EXPERTS)
    tree = perturb(fa.inject(pre.params, cfg, jax.random.key(0), "mixtral"))
    out = fa.save_adapter(split(tree).trainable, cfg, tmp_path / "ours", "mixtral")
    tensors = load_file(out / WEIGHTS_NAME)
    save_file({k: np.ascontiguousarray(LAYOUT_MUTATIONS[mutation](k, v, 4))
               for k, v in tensors.items()}, out / WEIGHTS_NAME)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    err = rel_err(ours(pre, tree, cfg)[VALID], theirs(loaded)[VALID])
    print(f"{mutation}: {err:.1e}")
    assert err > 10 * REL_TOL


def test_all_linear_on_experts_names_the_modules(tiny, tmp_path):
    """Our "all-linear" is the linear sites (attention); PEFT's on a mixture also
    adapts the router and the experts, so the export names the modules, and
    PEFT computes what we do."""
    _, model, pre = tiny("mixtral")
    cfg = lora.LoraConfig(r=2, alpha=4, target_modules="all-linear")
    tree = perturb(fa.inject(pre.params, cfg, jax.random.key(0), "mixtral"))
    out = fa.save_adapter(split(tree).trainable, cfg, tmp_path / "ours", "mixtral")
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    assert rel_err(ours(pre, tree, cfg)[VALID], theirs(loaded)[VALID]) <= REL_TOL


def test_refusals(tiny):
    _, _, pre = tiny("mixtral")
    for bad in (dict(dropout=0.1), dict(use_dora=True)):
        with pytest.raises(ValueError, match="takes no dropout and no DoRA, as PEFT's"):
            lora.LoraConfig(target_parameters=EXPERTS, **bad)
    with pytest.raises(ValueError, match=r"match no stacked expert parameter; this model's are "
                       r"\['mlp.experts.down_proj', 'mlp.experts.gate_up_proj'\]"):
        fa.inject(pre.params, lora.LoraConfig(target_parameters=("mlp.experts.w1",)),
                  jax.random.key(0), "mixtral")
    dense = {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.zeros((4, 4))}}}}
    with pytest.raises(ValueError, match="this model has none"):
        fa.inject(dense, lora.LoraConfig(target_modules=("q_proj",), target_parameters=EXPERTS),
                  jax.random.key(0), "llama")
    with pytest.raises(ValueError, match="num_experts_per_tok=5 exceeds the 4 experts"):
        config_from_hf({**pre.hf_config, "num_experts_per_tok": 5})


def test_qwen3_moe_dense_layers_match_transformers(tmp_path):
    """decoder_sparse_step 2 (layer 1 sparse) and mlp_only_layers [1] (then no
    sparse layer of 2: every MLP dense) against transformers, and both kinds of
    layer in the tree."""
    for name, overrides, sparse in [("step", dict(decoder_sparse_step=2), [False, True]),
                                    ("only", dict(decoder_sparse_step=2, mlp_only_layers=[1]),
                                     [False, False])]:
        model = save_tiny(tmp_path / name, "qwen3_moe", **overrides)
        pre = load_pretrained(tmp_path / name)
        assert [("experts" in pre.params[f"layers_{i}"]["mlp"]) for i in range(2)] == sparse
        err = rel_err(ours(pre, pre.params)[VALID], theirs(model)[VALID])
        print(f"qwen3_moe {overrides}: {err:.1e}")
        assert err <= REL_TOL
