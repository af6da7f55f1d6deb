"""Full fine-tuning and modules_to_save against PyTorch: one AdamW step of
our train step (train/step.py) against torch.optim.AdamW from the same
weights on the same batch, PEFT interchange of modules_to_save, and
`python -m train adapter.method=full` exporting a model transformers loads.

What one AdamW step makes comparable (float32 throughout). The two
frameworks' gradients differ by summation order: about 1e-6 of each
tensor's largest gradient, a large relative error for the
gradients that cancel to almost nothing. So the step is compared in three
parts (`assert_same_adamw_step`):

- the Adam moments, which are the clipped gradient and its square
  (mu = (1 - b1) g, nu = (1 - b2) g^2 after one step): to 1e-4 relative
  plus 1e-5 of the tensor's largest value (summation order only: at most
  1.1e-6 of the largest value measured on 2026-12-03, Intel Xeon);
- every updated weight on each side against AdamW's formula applied to that
  side's own moments, to 1e-6 absolute;
- the two sides' updated weights, to 1e-6 absolute plus what the measured
  gradient difference can move them. The step is lr * g / (|g| + eps)
  ~ lr * sign(g): where |g| >> eps it hardly depends on the gradient's
  error (< 1e-9 here), so a wrong learning rate, sign, bias correction or
  weight decay (1e-5 or more at lr = 1e-3) fails; where |g| is near eps it
  amplifies the gradient's relative error (by up to lr / 4 at |g| = eps: the
  1.05e-6 of `layers.1.q_proj[2,56]` measured on 2026-12-02, which a plain
  1e-6 bound failed on).

`test_a_wrong_adamw_step_fails_the_comparison` keeps this able to fail.
"""

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny import make_model_dir  # noqa: E402

import flax_adapters as fa  # noqa: E402
from flax_adapters.adapters import full, lora  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.checkpoints.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME  # noqa: E402
from flax_adapters.models import LlamaForCausalLM  # noqa: E402
from flax_adapters.models.names import hf_name_to_path, site_name  # noqa: E402
from flax_adapters.step import TrainState, make_optimizer, train_step  # noqa: E402
from flax_adapters.tree import combine, get, split  # noqa: E402
from train import config as config_lib  # noqa: E402
from train.loop import run  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LR, WD, CLIP, B1, B2, EPS = 1e-3, 0.1, 1.0, 0.9, 0.999, 1e-8
MOMENT_RTOL, MOMENT_ATOL_OF_MAX = 1e-4, 1e-5  # summation order (see the docstring)
WEIGHT_ATOL = 1e-6
MT = "llama"  # the tiny model's pre.config.model_type


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, our Pretrained) of one random LLaMA (untied head)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    with torch.no_grad():  # norms away from 1, so their gradients are not degenerate
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return model, load_pretrained(path)


def tokens():
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], (4, 16)).astype(np.int32)


def adam_moments(opt_state) -> tuple[dict, dict]:
    """(mu, nu) of the Adam inside our optimizer chain."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    return adam.mu, adam.nu


def our_step(pre, tree, cfg, lr=LR):
    """One jitted `train_step` (AdamW, constant lr, clipping) on `tokens()`;
    returns (trained part, loss, mu, nu, grad norm before clipping)."""
    frozen, trainable = split(tree, fa.trainable(cfg, MT))
    model = LlamaForCausalLM(pre.config, settings=fa.settings_for(cfg, MT))
    opt = make_optimizer(lr, steps=1, warmup_steps=0, schedule="constant", weight_decay=WD,
                         b1=B1, b2=B2, max_grad_norm=CLIP)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, opt.init(trainable))
    t = jnp.asarray(tokens())[None]
    ones = jnp.ones(t.shape, bool)
    step = jax.jit(functools.partial(train_step, model=model, optimizer=opt))
    state, metrics = step(state, frozen, {"tokens": t, "valid": ones, "loss_mask": ones},
                          jax.random.key(0))
    mu, nu = adam_moments(state.opt_state)
    return state.trainable, float(metrics["loss"]), mu, nu, float(metrics["grad_norm"])


def torch_step(model, lr=LR, clip=True) -> tuple[float, dict]:
    """The same step in PyTorch: loss from labels, backward, clip, AdamW.
    Returns (loss, {parameter name: (weight, exp_avg, exp_avg_sq)})."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=lr, betas=(B1, B2), eps=EPS,
                            weight_decay=WD)
    ids = torch.from_numpy(tokens().astype(np.int64))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_([p for _, p in named], CLIP)
    opt.step()
    return float(loss.detach()), {
        n: tuple(x.detach().numpy().copy() for x in
                 (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])) for n, p in named}


def adamw_formula(w0, mu, nu, lr=LR):
    """AdamW's first step from the moments (optax and torch both compute this)."""
    m_hat, v_hat = mu / (1 - B1), nu / (1 - B2)
    return w0 * (1 - lr * WD) - lr * m_hat / (np.sqrt(v_hat) + EPS)


def assert_same_adamw_step(before: dict, ours: dict, ref: dict) -> None:
    """`before`: {name: weight before the step}; `ours`, `ref`: {name: (weight
    after, mu, nu)}, all in one layout. See the module docstring."""
    assert set(ours) == set(ref) == set(before)
    for name in sorted(ref):
        (w, mu, nu), (w_ref, mu_ref, nu_ref) = ours[name], ref[name]
        for what, mine, want in (("mu", mu, mu_ref), ("nu", nu, nu_ref)):
            np.testing.assert_allclose(mine, want, rtol=MOMENT_RTOL,
                                       atol=MOMENT_ATOL_OF_MAX * np.abs(want).max(),
                                       err_msg=f"{name}: Adam's {what}")
        for side, (w_side, mu_side, nu_side) in (("ours", ours[name]), ("torch", ref[name])):
            np.testing.assert_allclose(w_side, adamw_formula(before[name], mu_side, nu_side),
                                       rtol=0, atol=WEIGHT_ATOL,
                                       err_msg=f"{name}: {side} weights vs AdamW's formula")
        # The step is lr * u(g), u(g) = g / (|g| + eps), with u' = eps / (|g| + eps)^2
        # largest where |g| is smallest (at 0 when the two gradients differ in sign):
        # the two sides' gradient difference moves the weights by at most that much.
        g, g_ref = mu / (1 - B1), mu_ref / (1 - B1)
        nearest_zero = np.where(np.sign(g) == np.sign(g_ref),
                                np.minimum(np.abs(g), np.abs(g_ref)), 0.0)
        amplified = LR * EPS * np.abs(g - g_ref) / (nearest_zero + EPS) ** 2
        assert (amplified < 0.1 * WEIGHT_ATOL).mean() > 0.95, f"{name}: a vacuous bound"
        np.testing.assert_array_less(np.abs(w - w_ref), WEIGHT_ATOL + amplified,
                                     err_msg=f"{name}: updated weights")

def leaf(tree, path):
    node = tree
    for k in path:
        node = node[k]
    return np.asarray(node)


def in_torch_layout(tree, name):
    """The leaf of our tree named `name` (a Hugging Face parameter name), in
    PyTorch's layout."""
    path, transpose = hf_name_to_path(name, MT)
    value = leaf(tree, path)
    return value.T if transpose else value


def full_step_results(model, pre, our_lr=LR, torch_lr=LR, torch_clip=True):
    """(before, ours, ref) of one full fine-tuning step, for `assert_same_adamw_step`."""
    cfg = full.FullConfig()
    tree = fa.inject(pre.params, cfg, jax.random.key(0), MT)
    assert split(tree, fa.trainable(cfg, MT)).frozen == {}  # every leaf is trained
    trained, loss, mu, nu, grad_norm = our_step(pre, tree, cfg, our_lr)
    assert grad_norm > 1.5 * CLIP  # so the clipping is part of what is compared
    ref_loss, ref = torch_step(copy.deepcopy(model).train(), torch_lr, torch_clip)
    assert abs(loss - ref_loss) < 1e-5
    before = {n: in_torch_layout(pre.params, n) for n in ref}
    ours = {n: tuple(in_torch_layout(t, n) for t in (trained, mu, nu)) for n in ref}
    return before, ours, ref


def test_full_fine_tuning_one_adamw_step_matches_pytorch(tiny):
    model, pre = tiny
    before, ours, ref = full_step_results(model, pre)
    assert_same_adamw_step(before, ours, ref)
    moved = max(float(np.abs(ref[n][0] - before[n]).max()) for n in ref)
    assert moved > 0.5 * LR  # the step moved the weights (by about lr)


def test_a_wrong_adamw_step_fails_the_comparison(tiny):
    """Mutation controls: each a real optimizer error, each must fail."""
    model, pre = tiny
    before, ours, ref = full_step_results(model, pre)
    no_bias_correction = {n: (before[n] * (1 - LR * WD) - LR * mu / (np.sqrt(nu) + EPS), mu, nu)
                          for n, (_, mu, nu) in ours.items()}
    no_weight_decay = {n: (w + LR * WD * before[n], mu, nu) for n, (w, mu, nu) in ours.items()}
    for wrong in (no_bias_correction, no_weight_decay):
        with pytest.raises(AssertionError):
            assert_same_adamw_step(before, wrong, ref)
    with pytest.raises(AssertionError, match="weights"):  # a learning rate 1% off
        assert_same_adamw_step(*full_step_results(model, pre, our_lr=1.01 * LR))
    with pytest.raises(AssertionError, match="mu"):  # a gradient that was not clipped
        assert_same_adamw_step(*full_step_results(model, pre, torch_clip=False))


SAVED = lora.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"),
                        modules_to_save=("lm_head", "norm"))


def perturbed_lora(pre):
    """Our LoRA + modules_to_save tree with a non-zero B (so A gets gradients)."""
    tree = fa.inject(pre.params, SAVED, jax.random.key(0), MT)
    frozen, trainable = fa.split(tree)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape),
                                       trainable)
    return combine(frozen, trainable)


def test_modules_to_save_one_adamw_step_matches_peft(tiny, tmp_path):
    model, pre = tiny
    tree = perturbed_lora(pre)
    trained, loss, mu, nu, _ = our_step(pre, tree, SAVED)
    # The saved modules are trained with the adapter: lm_head, model.norm, every layer norm.
    assert set(trained) == {"lm_head", "norm", "layers_0", "layers_1"}
    assert set(trained["layers_0"]) == {"input_layernorm", "post_attention_layernorm",
                                        "self_attn"}
    init_dir = fa.save_adapter(tree, SAVED, tmp_path / "init", MT)
    ref_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(init_dir),
                                               is_trainable=True)
    ref_model.train()
    names = {n for n, p in ref_model.named_parameters() if p.requires_grad}
    assert "base_model.model.lm_head.modules_to_save.default.weight" in names
    assert len(names) == 2 * 2 * 2 + 1 + 1 + 2 * 2  # lora A/B x q,v x 2 layers; head; norms
    ref_loss, ref = torch_step(ref_model)
    assert set(ref) == names
    assert abs(loss - ref_loss) < 1e-5

    def ours_in_torch_layout(t, name):
        key = name.removeprefix(PREFIX).replace(".modules_to_save.default", "")
        if ".lora_" in key:
            module, kind = key.split(".lora_")
            return np.asarray(get(t, site_name(module, MT))[
                "lora_a" if kind.startswith("A") else "lora_b"]).T
        return in_torch_layout(t, key)

    before = {n: ours_in_torch_layout(split(tree, fa.trainable(SAVED, MT)).trainable, n)
              for n in names}
    ours = {n: tuple(ours_in_torch_layout(t, n) for t in (trained, mu, nu)) for n in names}
    assert_same_adamw_step(before, ours, ref)


def test_modules_to_save_export_loads_in_peft_with_identical_logits(tiny, tmp_path):
    model, pre = tiny
    trained = our_step(pre, perturbed_lora(pre), SAVED)[0]
    tree = combine(split(perturbed_lora(pre), fa.trainable(SAVED, MT)).frozen, trained)
    out = fa.save_adapter(tree, SAVED, tmp_path / "adapter", MT, base_model_name_or_path="tiny")
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["modules_to_save"] == ["lm_head", "norm"]
    from flax_adapters.checkpoints.safetensors_io import iter_tensors
    keys = {k for k, _ in iter_tensors(out / WEIGHTS_NAME)}
    assert {"base_model.model.lm_head.weight", "base_model.model.model.norm.weight",
            "base_model.model.model.layers.1.post_attention_layernorm.weight"} <= keys
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    ids = torch.from_numpy(tokens().astype(np.int64))
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits.numpy()
    ours_model = LlamaForCausalLM(pre.config, settings=fa.settings_for(SAVED, MT))
    ours = np.asarray(ours_model.apply({"params": tree}, jnp.asarray(tokens()))[0])
    base = np.asarray(ours_model.apply({"params": pre.params}, jnp.asarray(tokens()))[0])
    assert np.abs(ours - base).max() > 1e-2  # the trained head and norms matter
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)  # summation order only
    # And back: importing the export gives our tree again.
    back, cfg = fa.load_adapter(out, pre.params, MT)
    assert cfg.modules_to_save == ("lm_head", "norm")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), back, tree)
    # Named adapters on one base: the saved modules come with the adapter.
    active, _ = fa.activate(pre.params, {"a": (cfg, split(back, fa.trainable(cfg, MT)).trainable)},
                            "a", MT)
    np.testing.assert_array_equal(np.asarray(active["lm_head"]), np.asarray(back["lm_head"]))


def test_modules_to_save_bad_input(tiny, tmp_path):
    _, pre = tiny
    with pytest.raises(ValueError, match="modules_to_save 'classifier' matches no module.*lm_head"):
        fa.inject(pre.params, lora.LoraConfig(modules_to_save=("classifier",)), jax.random.key(0),
                  MT)
    with pytest.raises(ValueError, match="q_proj, which the adapter also modifies"):
        fa.inject(pre.params, lora.LoraConfig(target_modules=("q_proj",),
                                              modules_to_save=("q_proj",)), jax.random.key(0), MT)
    tied = {k: v for k, v in pre.params.items() if k != "lm_head"}
    with pytest.raises(ValueError, match="ties it to the output head"):
        fa.inject(tied, lora.LoraConfig(modules_to_save=("embed_tokens",)), jax.random.key(0), MT)
    # A PEFT adapter whose base tensors modules_to_save does not name is refused.
    out = fa.save_adapter(perturbed_lora(pre), SAVED, tmp_path / "a", MT)
    cfg_file = out / CONFIG_NAME
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="is a base weight, but modules_to_save"):
        fa.load_adapter(out, pre.params, MT)


def test_full_fine_tuning_run_exports_a_model_transformers_loads(tmp_path):
    model_dir = make_model_dir(tmp_path / "base")
    out = tmp_path / "run"
    cfg = config_lib.load(None, [
        f"model.path={model_dir}", f"output_dir={out}", "adapter.method=full", "steps=3",
        "batch_size=8", "micro_batch_size=8", "eval_generate=0", "eval_every=0",
        "checkpoint_every=0", "log_every=0", "optim.lr=1e-3", "optim.warmup_steps=1",
        "data.embedded_train_size=64", "data.val_set_size=8", "mesh.data=1"])
    summary = run(cfg, devices=jax.devices()[:1])
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert (out / "checkpoints" / "3").is_dir()  # the same orbax checkpoints as adapters
    assert summary["adapter_dir"] == str(out / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ours = load_pretrained(out / "model")  # our loader reads it back too, tokenizer included
    assert ours.tokenizer is not None
    ids = tokens() % ours.config.vocab_size
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    mine = np.asarray(LlamaForCausalLM(ours.config).apply({"params": ours.params},
                                                          jnp.asarray(ids))[0])
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4)
    base = load_pretrained(model_dir).params
    assert np.abs(np.asarray(ours.params["lm_head"]) - np.asarray(base["lm_head"])).max() > 0
