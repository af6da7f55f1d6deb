"""QLoRA end to end through the command line, on the tiny model: `python -m
train model.quantize=nf4` killed with SIGKILL after a checkpoint, resumed
with --resume, exported as a PEFT adapter, loaded in PEFT and evaluated.

What is equal to what, and why. The base is NF4-quantized at load (QLoRA:
block 64, double quantization, embeddings and head too); only the LoRA
factors train, in float32, and they are what the export holds.
- The resumed run equals one uninterrupted run bit for bit: every step's
  loss, the exported safetensors file byte for byte, the held-out
  generations (both runs quantize the same float weights the same way).
- The PEFT file holds the trained leaves exactly (float32, transposed to
  PyTorch's layout), and PEFT 0.21 loads it onto the float base with those
  values unchanged.
- On the same NF4 base our loader reproduces the trained model exactly:
  the same parameter tree, leaf for leaf, as the trained state restored from
  the last checkpoint, and logits equal bit for bit.
- `python -m eval --adapter DIR --quantize nf4` (the base as trained)
  reproduces the trained run's held-out generations.
- On the float base (what PEFT users load) the model is the trained adapter
  over a base that differs by NF4's rounding: PEFT's logits equal ours on
  that base to float32 rounding (atol 1e-5), and both differ from the
  trained (quantized) model's by about the quantization error, which the
  test prints and bounds loosely.
"""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_preemption import ENV, train_process  # noqa: E402
from test_preemption import finish as finish_process  # noqa: E402
from tiny import make_model_dir  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 8
HELDOUT = 4  # held-out problems generated before and after training
ARGS = ("model.quantize=nf4", f"steps={STEPS}", "batch_size=8", "micro_batch_size=8",
        "checkpoint_every=1", "keep_checkpoints=2", "eval_every=0", "log_every=0",
        f"eval_generate={HELDOUT}", "max_new_tokens=4", "optim.lr=1e-2",
        "optim.warmup_steps=1", "data.embedded_train_size=200", "data.val_set_size=16",
        "adapter.settings.r=4", "adapter.settings.dropout=0.1")


def overrides(model_dir, out):
    return [f"model.path={model_dir}", f"output_dir={out}", *ARGS]


def start(model_dir, out, *extra):
    """A train process (one CPU device: the suite's 8 fake devices dropped)."""
    return train_process(out, [*overrides(model_dir, out), *extra])


def finish(proc) -> tuple[int, str]:
    return finish_process(proc, timeout=300)


def saved_steps(out) -> list[int]:
    """Steps of the completed checkpoints (orbax renames a save into place last)."""
    d = out / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def results(out) -> dict:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    heldout = [json.loads(ln) for ln in (out / "heldout_after.jsonl").read_text().splitlines()]
    return {"steps": [r["step"] for r in rows], "losses": [r["loss"] for r in rows],
            "adapter": (out / "adapter" / "adapter_model.safetensors").read_bytes(),
            "generations": [h["generation"] for h in heldout]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """(reference output dir, killed-and-resumed output dir)."""
    root = tmp_path_factory.mktemp("qlora")
    ref, out = root / "ref", root / "run"
    reference = start(model_dir, ref)  # alongside the run that is killed
    proc = start(model_dir, out)
    deadline = time.time() + 300
    while proc.poll() is None and not [s for s in saved_steps(out) if s >= 2]:
        assert time.time() < deadline, "no checkpoint in 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    rc, err = finish(proc)
    assert rc == -signal.SIGKILL, f"the run ended before the kill (rc {rc}): {err[-2000:]}"
    killed_at = max(saved_steps(out))
    assert killed_at < STEPS
    rc, err = finish(start(model_dir, out, "--resume"))
    assert rc == 0, err[-3000:]
    assert f"resumed from step {killed_at}" in err
    rc, err = finish(reference)
    assert rc == 0, err[-3000:]
    return ref, out


def test_kill_9_and_resume_equal_an_uninterrupted_run(runs):
    ref, out = runs
    want, got = results(ref), results(out)
    assert want["steps"] == list(range(1, STEPS + 1))
    assert got == want  # losses as floats, the adapter file byte for byte, generations
    assert json.loads((out / "summary.json").read_text())["accuracy_after"] == \
        json.loads((ref / "summary.json").read_text())["accuracy_after"]


def test_export_is_the_trained_adapter_in_peft_and_on_the_quantized_base(runs, model_dir):
    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from safetensors.numpy import load_file

    import flax_adapters as fa
    from eval.generator import load_generator
    from flax_adapters.quant.array import quantized_leaves
    from train import config as config_lib
    from train.checkpoint import Checkpointer
    from train.loop import build

    _, out = runs
    adapter_dir = out / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # The trained state, from the run's last checkpoint, on its NF4 base.
    cfg = config_lib.load(None, overrides(model_dir, out) + ["mesh.data=1"])
    s = build(cfg, devices=jax.devices()[:1])
    step, state, _ = Checkpointer(out / "checkpoints", 2).restore_latest(s.state)
    assert step == STEPS
    assert "layers_0/self_attn/q_proj/kernel" in quantized_leaves(s.frozen)
    trained_leaves = {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in
                      jax.tree_util.tree_flatten_with_path(state.trainable)[0]}

    # 1. The PEFT file holds the trained leaves exactly (PyTorch layout: transposed).
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(tensors) == len(trained_leaves) == 2 * 7 * 2  # A, B x 7 linears x 2 layers
    for key, x in trained_leaves.items():  # e.g. layers_0/self_attn/q_proj/lora_a
        layer, *mid, site, leaf = key.split("/")
        name = (f"base_model.model.model.layers.{layer.split('_')[1]}.{'.'.join(mid)}.{site}."
                f"lora_{leaf[-1].upper()}.weight")
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], x.T, err_msg=name)

    # 2. PEFT 0.21 loads it onto the float base (transformers), values unchanged.
    base = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(tensors)
    for name, x in tensors.items():
        np.testing.assert_array_equal(loaded[name.replace(".weight", ".default.weight")].numpy(),
                                      x, err_msg=name)

    # 3. On the same NF4 base, our loader gives the trained model bit for bit.
    tokens = np.random.default_rng(0).integers(3, 40, (2, 9)).astype(np.int32)
    trained = fa.materialize(fa.combine(s.frozen, state.trainable))
    want = np.asarray(s.model.apply({"params": trained}, jnp.asarray(tokens))[0])
    quantized = fa.load_pretrained(model_dir, quantize=cfg.model.quant_config())
    params, adapter_cfg = fa.load_adapter(adapter_dir, quantized.params, "llama")
    model = fa.model_class(quantized.config)(quantized.config,
                                             settings=fa.settings_for(adapter_cfg, "llama"))
    got = np.asarray(model.apply({"params": fa.materialize(params)}, jnp.asarray(tokens))[0])
    np.testing.assert_array_equal(got, want)
    # the same tree, leaf for leaf (so the same held-out generations too: see
    # test_python_m_eval_scores_the_exported_adapter)
    jax.tree_util.tree_map(np.testing.assert_array_equal, fa.materialize(params), trained)

    # 4. On the float base: PEFT's logits equal ours to float32 rounding; both sit
    # NF4's rounding of the base away from the trained model's.
    ours_float = load_generator(str(model_dir), str(adapter_dir))
    float_logits = np.asarray(ours_float.model.apply({"params": ours_float.params},
                                                     jnp.asarray(tokens))[0])
    with torch.no_grad():
        peft_logits = peft_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(peft_logits, float_logits, rtol=0, atol=1e-5)
    gap = float(np.abs(float_logits - want).max())
    print(f"\nmax |logit(float base + adapter) - logit(NF4 base + adapter)| = {gap:.4f}")
    # The tiny model's logits are within about +-0.6 (tests/tiny.py); NF4's error is
    # a fraction of that, and never zero.
    assert 0 < gap < 0.5


def test_python_m_eval_scores_the_exported_adapter(runs, model_dir, tmp_path):
    """`python -m eval --model DIR --adapter out/adapter` runs and scores the
    held-out problems; with `--quantize nf4` (the base as it was trained on) its
    generations are the trained run's own."""
    _, out = runs
    heldout = [json.loads(ln) for ln in (out / "heldout_after.jsonl").read_text().splitlines()]
    records = [{"instruction": h["question"], "input": "", "output": "", "answer": h["answer"]}
               for h in heldout]
    (tmp_path / "data.json").write_text(json.dumps(records))
    proc = subprocess.run([sys.executable, "-m", "eval", "--dataset", "gsm8k", "--data_path",
                           str(tmp_path / "data.json"), "--model", str(model_dir), "--adapter",
                           str(out / "adapter"), "--output_dir", str(tmp_path / "eval"),
                           "--max_new_tokens", "4", "--quantize", "nf4"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "summary.json").read_text())["datasets"]["gsm8k"]
    assert result["n"] == HELDOUT and 0 <= result["accuracy"] <= 1
    rows = [json.loads(ln) for ln in (tmp_path / "eval" / "gsm8k.jsonl").read_text()
            .splitlines()]
    rows.sort(key=lambda r: r["index"])
    assert [r["generation"] for r in rows] == [h["generation"] for h in heldout]
