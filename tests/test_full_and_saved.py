"""Full fine-tuning and modules_to_save against PyTorch: one AdamW step of
our train step (train/step.py) against torch.optim.AdamW from the same
weights on the same batch, PEFT interchange of modules_to_save, and
`python -m train adapter.method=full` exporting a model transformers loads.

Tolerances: float32 throughout. The gradients of the two frameworks differ
by summation order (~1e-6 relative). Adam's first step moves each weight by
lr * g / (|g| + eps) -- about lr * sign(g) -- so a gradient error of 1e-6
relative moves a weight by ~1e-9; only a gradient within rounding of zero
could flip sign (none does here, checked by the tight bound). So the
updated weights must agree to 1e-6 absolute (lr = 1e-3: a wrong sign, a
missing bias correction or weight decay shows up at 1e-4 or more).
"""

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny import make_model_dir  # noqa: E402

from flax_adapters.adapters import api, full, lora, peft_io  # noqa: E402
from flax_adapters.adapters.tree import combine, get, split  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.checkpoints.hf import hf_name_to_path  # noqa: E402
from flax_adapters.models import LlamaForCausalLM  # noqa: E402
from train import config as config_lib  # noqa: E402
from train.loop import run  # noqa: E402
from train.step import TrainState, make_optimizer, train_step  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LR, WD, CLIP = 1e-3, 0.1, 1.0
TOL = 1e-6


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


def our_step(pre, tree, cfg):
    """One jitted `train_step` (AdamW, constant lr, clipping) on `tokens()`;
    returns (trained part, loss)."""
    frozen, trainable = split(tree, api.trainable(cfg))
    model = LlamaForCausalLM(pre.config, settings=api.settings_for(cfg))
    opt = make_optimizer(LR, steps=1, warmup_steps=0, schedule="constant", weight_decay=WD,
                         b1=0.9, b2=0.999, max_grad_norm=CLIP)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, opt.init(trainable))
    t = jnp.asarray(tokens())[None]
    ones = jnp.ones(t.shape, bool)
    step = jax.jit(functools.partial(train_step, model=model, optimizer=opt))
    state, metrics = step(state, frozen, {"tokens": t, "valid": ones, "loss_mask": ones},
                          jax.random.key(0))
    return state.trainable, float(metrics["loss"])


def torch_step(model) -> float:
    """The same step in PyTorch: loss from labels, backward, clip, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    ids = torch.from_numpy(tokens().astype(np.int64))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()
    return float(loss.detach())


def leaf(tree, path):
    node = tree
    for k in path:
        node = node[k]
    return np.asarray(node)


def test_full_fine_tuning_one_adamw_step_matches_pytorch(tiny):
    model, pre = tiny
    cfg = full.FullConfig()
    tree = api.inject(pre.params, cfg, jax.random.key(0))
    assert split(tree, api.trainable(cfg)).frozen == {}  # every leaf is trained
    trained, loss = our_step(pre, tree, cfg)
    ref = copy.deepcopy(model).train()
    ref_loss = torch_step(ref)
    assert abs(loss - ref_loss) < 1e-5
    moved = 0.0
    for name, p in ref.state_dict().items():
        path, transpose = hf_name_to_path(name)
        want = p.numpy().T if transpose else p.numpy()
        np.testing.assert_allclose(leaf(trained, path), want, rtol=0, atol=TOL, err_msg=name)
        moved = max(moved, float(np.abs(want - leaf(pre.params, path)).max()))
    assert moved > 0.5 * LR  # the step moved the weights (by about lr)


SAVED = lora.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"),
                        modules_to_save=("lm_head", "norm"))


def perturbed_lora(pre):
    """Our LoRA + modules_to_save tree with a non-zero B (so A gets gradients)."""
    tree = api.inject(pre.params, SAVED, jax.random.key(0))
    frozen, trainable = split(tree)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape),
                                       trainable)
    return combine(frozen, trainable)


def test_modules_to_save_one_adamw_step_matches_peft(tiny, tmp_path):
    model, pre = tiny
    tree = perturbed_lora(pre)
    trained, loss = our_step(pre, tree, SAVED)
    # The saved modules are trained with the adapter: lm_head, model.norm, every layer norm.
    assert set(trained) == {"lm_head", "norm", "layers_0", "layers_1"}
    assert set(trained["layers_0"]) == {"input_layernorm", "post_attention_layernorm",
                                        "self_attn"}
    init_dir = peft_io.export_peft(tree, SAVED, tmp_path / "init")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(init_dir), is_trainable=True)
    ref.train()
    names = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert "base_model.model.lm_head.modules_to_save.default.weight" in names
    assert len(names) == 2 * 2 * 2 + 1 + 1 + 2 * 2  # lora A/B x q,v x 2 layers; head; norms
    ref_loss = torch_step(ref)
    assert abs(loss - ref_loss) < 1e-5
    params = dict(ref.named_parameters())
    for name in names:
        key = name.removeprefix(peft_io.PREFIX).replace(".modules_to_save.default", "")
        if ".lora_" in key:
            module, kind = key.split(".lora_")
            site = peft_io.site_name(module)
            mine = get(trained, site)["lora_a" if kind.startswith("A") else "lora_b"]
            want = params[name].detach().numpy().T
        else:
            path, transpose = hf_name_to_path(key)
            mine = leaf(trained, path)
            want = params[name].detach().numpy()
            want = want.T if transpose else want
        np.testing.assert_allclose(np.asarray(mine), want, rtol=0, atol=TOL, err_msg=name)


def test_modules_to_save_export_loads_in_peft_with_identical_logits(tiny, tmp_path):
    model, pre = tiny
    trained, _ = our_step(pre, perturbed_lora(pre), SAVED)
    tree = combine(split(perturbed_lora(pre), api.trainable(SAVED)).frozen, trained)
    out = peft_io.export_peft(tree, SAVED, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((out / peft_io.CONFIG_NAME).read_text())
    assert config["modules_to_save"] == ["lm_head", "norm"]
    from flax_adapters.checkpoints.safetensors_io import iter_tensors
    keys = {k for k, _ in iter_tensors(out / peft_io.WEIGHTS_NAME)}
    assert {"base_model.model.lm_head.weight", "base_model.model.model.norm.weight",
            "base_model.model.model.layers.1.post_attention_layernorm.weight"} <= keys
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    ids = torch.from_numpy(tokens().astype(np.int64))
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits.numpy()
    ours_model = LlamaForCausalLM(pre.config, settings=api.settings_for(SAVED))
    ours = np.asarray(ours_model.apply({"params": tree}, jnp.asarray(tokens()))[0])
    base = np.asarray(ours_model.apply({"params": pre.params}, jnp.asarray(tokens()))[0])
    assert np.abs(ours - base).max() > 1e-2  # the trained head and norms matter
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)  # summation order only
    # And back: importing the export gives our tree again.
    back, cfg = peft_io.import_peft(out, pre.params)
    assert cfg.modules_to_save == ("lm_head", "norm")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), back, tree)
    # Named adapters on one base: the saved modules come with the adapter.
    active, _ = api.activate(pre.params, {"a": (cfg, split(back, api.trainable(cfg)).trainable)},
                             "a")
    np.testing.assert_array_equal(np.asarray(active["lm_head"]), np.asarray(back["lm_head"]))


def test_modules_to_save_bad_input(tiny, tmp_path):
    _, pre = tiny
    with pytest.raises(ValueError, match="modules_to_save 'classifier' matches no module.*lm_head"):
        api.inject(pre.params, lora.LoraConfig(modules_to_save=("classifier",)), jax.random.key(0))
    with pytest.raises(ValueError, match="q_proj, which the adapter also modifies"):
        api.inject(pre.params, lora.LoraConfig(target_modules=("q_proj",),
                                               modules_to_save=("q_proj",)), jax.random.key(0))
    tied = {k: v for k, v in pre.params.items() if k != "lm_head"}
    with pytest.raises(ValueError, match="ties it to the output head"):
        api.inject(tied, lora.LoraConfig(modules_to_save=("embed_tokens",)), jax.random.key(0))
    # A PEFT adapter whose base tensors modules_to_save does not name is refused.
    out = peft_io.export_peft(perturbed_lora(pre), SAVED, tmp_path / "a")
    cfg_file = out / peft_io.CONFIG_NAME
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="is a base weight, but modules_to_save"):
        peft_io.import_peft(out, pre.params)


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
