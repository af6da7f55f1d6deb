"""Bottleneck adapters (LLM-Adapters' AdapterH, AdapterP and parallel adapter).

The reference is LLM-Adapters' `bottleneck.Linear.forward` restated in
PyTorch below (`RefAdapterLinear`, its three adapter types, equations
copied from AGI-Edgerunners/LLM-Adapters peft/src/peft/tuners/bottleneck.py)
wrapped around transformers' LLaMA modules, fed with the tensors of OUR
export in LLM-Adapters' key names: one test checks the maths, the layouts
and the export schema together. The tiny LLaMAs are re-initialised by
`families.sensitize` (logits up to ~35, MLP inputs in the non-linear range)
and the adapter leaves perturbed by tiny.perturb, so the adapters'
non-linearities work past their linear range. Comparisons are relative:
max |ours - reference| / max |logit|, with the model parity tests' REL_TOL
= 1e-5 (the same float32 operations in another summation order). Measured
on 2026-12-04 (AMD EPYC): 9e-7..2.3e-6, a margin of > 4x; the adapters
move the logits by 0.79..1.32 of their scale, asserted at 100x REL_TOL.
"""

import json

import numpy as np
from families import REL_TOL, rel_err, sensitize
from tiny import padded_batch as tiny_padded_batch
from tiny import perturb
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

import flax_adapters as fa  # noqa: E402
from flax_adapters import BottleneckConfig, combine, num_params, split  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.models.registry import abstract_params  # noqa: E402
from flax_adapters.models import LlamaForCausalLM  # noqa: E402
from flax_adapters.models.config import LLAMA_7B  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=256)
MT = "llama"  # the tiny models' pre.config.model_type
HEADS = {"mha": dict(num_attention_heads=4, num_key_value_heads=4),
         "gqa": dict(num_attention_heads=4, num_key_value_heads=2)}

# One config per placement, each with another non-linearity and scaling.
KINDS = {
    "adapterh": BottleneckConfig(bottleneck_size=16, non_linearity="tanh", scaling=1.0),
    "adapterp": BottleneckConfig(bottleneck_size=16, non_linearity="relu", scaling=2.0,
                                 use_adapterp=True),
    "parallel": BottleneckConfig(bottleneck_size=16, non_linearity="gelu", scaling="learned",
                                 use_parallel_adapter=True),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{'mha' | 'gqa': (directory, Pretrained)} of tiny random LLaMAs."""
    out = {}
    for name, heads in HEADS.items():
        torch.manual_seed(0)
        model = sensitize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **heads)))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, load_pretrained(path))
    return out



def padded_batch():
    return tiny_padded_batch(TINY["vocab_size"])


def logits(pre, tree, cfg, tokens, mask):
    model = LlamaForCausalLM(pre.config, settings=fa.settings_for(cfg, MT))
    out, _ = jax.jit(model.apply)({"params": tree}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    return np.asarray(out)


class RefAdapterLinear(torch.nn.Module):
    """LLM-Adapters' bottleneck.Linear.forward around a frozen nn.Linear."""

    def __init__(self, base, adapter_type, down, up, scaling, act):
        super().__init__()
        self.base, self.adapter_type, self.scaling = base, adapter_type, scaling
        self.adapter_down = torch.nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.adapter_up = torch.nn.Linear(up.shape[1], up.shape[0], bias=False)
        self.adapter_down.weight.data = torch.tensor(down)
        self.adapter_up.weight.data = torch.tensor(up)
        self.act_fn = ACT2FN[act]

    def adapter(self, x):
        return self.adapter_up(self.act_fn(self.adapter_down(x))) * self.scaling

    def forward(self, x):
        if self.adapter_type == "mh_adapter":
            return self.base(x + self.adapter(x))
        if self.adapter_type == "output_adapter":
            y = self.base(x)
            return y + self.adapter(y)
        return self.base(x) + self.adapter(x)  # parallel_adapter


def reference_logits(path, export_dir, tokens, mask):
    """The torch model with LLM-Adapters' adapters built from an export."""
    config = json.loads((export_dir / "adapter_config.json").read_text())
    tensors = load_file(export_dir / "adapter_model.safetensors")
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    types = {"gate_proj": "mh_adapter", "up_proj": "mh_adapter", "down_proj": "output_adapter"}
    sites = {k.rsplit(".adapter_", 1)[0] for k in tensors}
    for key in sites:
        module = key.removeprefix("base_model.model.")
        parent_name, name = module.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        scaling = config["scaling"]
        if scaling == "learned":
            scaling = torch.tensor(tensors[key + ".adapter_scaling"])
        kind = "parallel_adapter" if config["use_parallel_adapter"] else types[name]
        setattr(parent, name, RefAdapterLinear(
            getattr(parent, name), kind, tensors[key + ".adapter_down.weight"],
            tensors[key + ".adapter_up.weight"], scaling, config["non_linearity"]))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
    return out.logits.numpy()


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_llm_adapters(tiny, tmp_path, heads, kind):
    path, pre = tiny[heads]
    cfg = KINDS[kind]
    # perturb: N(0, 0.2) added to the N(0, 0.02) projections, so the
    # non-linearity sees pre-activations of ~0.2 * sqrt(64) = 1.6 times its
    # input's RMS, past its linear range; a learned scale becomes
    # 1 + N(0, 0.2), other than its initial 1.
    tree = perturb(fa.inject(pre.params, cfg, jax.random.key(1), MT))
    fa.save_adapter(tree, cfg, tmp_path / "export", MT)
    tokens, mask = padded_batch()
    ref = reference_logits(path, tmp_path / "export", tokens, mask)
    ours = logits(pre, tree, cfg, tokens, mask)
    valid = mask.astype(bool)
    err = rel_err(ours[valid], ref[valid])
    moved = rel_err(ours[valid], logits(pre, pre.params, None, tokens, mask)[valid])
    print(f"{kind}/{heads}: max |ours - LLM-Adapters reference| / max |logit| = {err:.1e} "
          f"(the adapter moves the logits by {moved:.2f} of their scale)")
    assert moved > 100 * REL_TOL, "the adapter must change the outputs, or the test proves nothing"
    assert err <= REL_TOL


@pytest.mark.parametrize("kind", list(KINDS))
def test_fresh_mam_adapter_is_identity(tiny, kind):
    _, pre = tiny["gqa"]
    cfg = BottleneckConfig(**{**KINDS[kind].__dict__, "init": "mam_adapter"})
    tree = fa.inject(pre.params, cfg, jax.random.key(2), MT)
    tokens, mask = padded_batch()
    valid = mask.astype(bool)
    # up = 0 makes the adapter's output exactly 0; only XLA's fusion may differ.
    err = rel_err(logits(pre, tree, cfg, tokens, mask)[valid],
                  logits(pre, pre.params, None, tokens, mask)[valid])
    print(f"{kind}: max |fresh - base| / max |logit| = {err:.1e}")
    assert err <= REL_TOL


def test_structure(tiny):
    _, pre = tiny["gqa"]  # d=64, mlp 96, kv width 32

    def shapes(tree, layer="layers_1"):
        return jax.tree_util.tree_map(lambda x: tuple(x.shape), tree[layer])

    h = shapes(fa.inject(pre.params, BottleneckConfig(bottleneck_size=8), jax.random.key(0), MT))
    assert h["mlp"] == {
        "gate_proj": {"kernel": (64, 96), "adapter_down": (64, 8), "adapter_up": (8, 64)},
        "up_proj": {"kernel": (64, 96), "adapter_down": (64, 8), "adapter_up": (8, 64)},
        "down_proj": {"kernel": (96, 64), "adapter_down": (64, 8), "adapter_up": (8, 64)},
    }
    assert h["self_attn"]["q_proj"] == {"kernel": (64, 64)}
    p = shapes(fa.inject(pre.params, BottleneckConfig(bottleneck_size=8, use_adapterp=True),
                         jax.random.key(0), MT))
    assert p["mlp"]["down_proj"] == {"kernel": (96, 64), "adapter_down": (64, 8),
                                     "adapter_up": (8, 64)}
    assert p["mlp"]["gate_proj"] == {"kernel": (64, 96)}
    par = shapes(fa.inject(pre.params, BottleneckConfig(
        bottleneck_size=8, use_parallel_adapter=True, scaling="learned"), jax.random.key(0), MT))
    assert par["self_attn"]["k_proj"] == {"kernel": (64, 32), "adapter_down": (64, 8),
                                          "adapter_up": (8, 32), "adapter_scaling": (1,)}
    assert par["self_attn"]["o_proj"] == {"kernel": (64, 64)}
    assert sorted(par["self_attn"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_bert_init_statistics(tiny):
    _, pre = tiny["gqa"]
    tree = fa.inject(pre.params, BottleneckConfig(bottleneck_size=64), jax.random.key(0), MT)
    leaves = tree["layers_0"]["mlp"]["gate_proj"]
    for name in ("adapter_down", "adapter_up"):  # LLM-Adapters' "bert": N(0, 0.02)
        assert abs(float(jnp.std(leaves[name])) - 0.02) < 0.002
        assert leaves[name].dtype == jnp.float32


def test_learned_scaling_is_trainable(tiny):
    _, pre = tiny["gqa"]
    cfg = KINDS["parallel"]
    frozen, trainable = split(fa.inject(pre.params, cfg, jax.random.key(3), MT))
    assert trainable["layers_0"]["self_attn"]["q_proj"]["adapter_scaling"].shape == (1,)
    assert "adapter_scaling" not in frozen["layers_0"]["self_attn"]["q_proj"]
    model = LlamaForCausalLM(pre.config, settings=fa.settings_for(cfg, MT))
    tokens, _ = padded_batch()

    def loss(tr):
        out, _ = model.apply({"params": combine(frozen, tr)}, jnp.asarray(tokens))
        return jnp.mean(out ** 2)

    grads = jax.grad(loss)(trainable)
    g = grads["layers_0"]["self_attn"]["q_proj"]["adapter_scaling"]
    assert float(jnp.abs(g).max()) > 0


def test_export_import_round_trip(tiny, tmp_path):
    _, pre = tiny["gqa"]
    for kind, cfg in KINDS.items():
        tree = fa.inject(pre.params, cfg, jax.random.key(4), MT)
        out = tmp_path / kind
        fa.save_adapter(tree, cfg, out, MT)
        fa.save_adapter(tree, cfg, out, MT)  # replacing an export is atomic too
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == "BOTTLENECK" and config["bias"] == "none"
        assert config["bottleneck_size"] == 16 and config["init_weights"] == "bert"
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
        keys = load_file(out / "adapter_model.safetensors")
        if kind == "adapterp":
            assert sorted(keys) == [
                f"base_model.model.model.layers.{i}.mlp.down_proj.adapter_{w}.weight"
                for i in range(2) for w in ("down", "up")]
            assert keys["base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight"
                        ].shape == (16, 64)  # torch layout (out, in)
        back, cfg2 = fa.load_adapter(out, pre.params, MT)
        chex.assert_trees_all_equal(back, tree)
        assert dataclass_fields(cfg2, "target_modules") == dataclass_fields(cfg, "target_modules")


def dataclass_fields(cfg, *skip):
    return {k: v for k, v in cfg.__dict__.items() if k not in skip}


def test_import_refuses_mismatch(tiny, tmp_path):
    _, pre_gqa = tiny["gqa"]
    cfg = KINDS["parallel"]
    fa.save_adapter(fa.inject(pre_gqa.params, cfg, jax.random.key(0), MT), cfg,
                    tmp_path / "a", MT)
    _, pre_mha = tiny["mha"]  # k_proj is 64 wide there, 32 in the export
    with pytest.raises(ValueError, match="k_proj/adapter_up: shape .* does not fit"):
        fa.load_adapter(tmp_path / "a", pre_mha.params, MT)


def test_errors(tiny):
    _, pre = tiny["gqa"]
    with pytest.raises(ValueError, match="series bottleneck adapter cannot go on"):
        fa.inject(pre.params, BottleneckConfig(target_modules=["q_proj"]), jax.random.key(0), MT)
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckConfig(non_linearity="softmax")
    with pytest.raises(ValueError, match="exclusive"):
        BottleneckConfig(use_adapterp=True, use_parallel_adapter=True)
    tree = fa.inject(pre.params, BottleneckConfig(bottleneck_size=4), jax.random.key(0), MT)
    with pytest.raises(ValueError, match="settings_for"):  # leaves but no placement: refuse
        LlamaForCausalLM(pre.config).apply({"params": tree}, jnp.zeros((1, 3), jnp.int32))


def test_can_overfit_and_base_is_untouched(tiny):
    _, pre = tiny["gqa"]
    base = pre.params  # sensitized: logits of std ~8, a head that can express a fit
    cfg = BottleneckConfig(bottleneck_size=16, adapter_dropout=0.1)
    frozen, trainable = split(fa.inject(base, cfg, jax.random.key(5), MT))
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    model = LlamaForCausalLM(pre.config, settings=fa.settings_for(cfg, MT))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, size=(2, 16)))
    opt = optax.adam(1e-2)

    @jax.jit
    def step(tr, opt_state, key):
        def loss_fn(tr):
            out, _ = model.apply({"params": combine(frozen, tr)}, tokens, deterministic=False,
                                 rngs={"dropout": key})
            logp = jax.nn.log_softmax(out[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        loss, grads = jax.value_and_grad(loss_fn)(tr)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(tr, updates), opt_state, loss

    opt_state, losses = opt.init(trainable), []
    for i in range(50):
        trainable, opt_state, loss = step(trainable, opt_state, jax.random.key(i))
        losses.append(float(loss))
    print(f"bottleneck overfit: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.05 * losses[0] and losses[-1] < 0.5  # uniform guessing: 4.85
    chex.assert_trees_all_equal(frozen, frozen_before)  # the base, bit for bit
    changed = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.any(a != b)), trainable,
        split(fa.inject(base, cfg, jax.random.key(5), MT)).trainable))
    assert all(changed)  # every adapter leaf trained


def test_llama7b_trainable_counts():
    """LLM-Adapters' parameter counts on LLaMA-7B, from shapes only."""
    base = abstract_params(LLAMA_7B)
    counts = {}
    for name, cfg in {"AdapterH": BottleneckConfig(),
                      "AdapterP": BottleneckConfig(use_adapterp=True),
                      "Parallel": BottleneckConfig(use_parallel_adapter=True)}.items():
        tree = jax.eval_shape(lambda b, cfg=cfg: fa.inject(b, cfg, jax.random.key(0), MT), base)
        counts[name] = num_params(split(tree).trainable)
        print(f"LLaMA-7B {name} (bottleneck 256): {counts[name]:,} trainable parameters")
    # 3 adapters x (4096*256 + 256*4096) x 32 layers; AdapterP: 1 adapter per layer.
    assert counts["AdapterH"] == 201_326_592
    assert counts["AdapterP"] == 67_108_864
    assert counts["Parallel"] == 201_326_592  # q, k, v are all 4096 -> 4096 on LLaMA-7B
