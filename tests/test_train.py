"""`python -m train` end to end on a tiny real model (random LLaMA + word-level
tokenizer, saved to disk), on 1 and 8 fake CPU devices."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from tiny import LEARNING_RUN, make_model_dir, run_config  # noqa: E402

import flax_adapters as fa  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from train import config as config_lib  # noqa: E402
from train.loop import build, compile_steps, run  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def cfg_for(model_dir, out, *overrides):
    return run_config(model_dir, out, "adapter.settings.target_modules=[q_proj,k_proj,v_proj,"
                      "o_proj,gate_proj,up_proj,down_proj]", *overrides)


def losses(out):
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def devices(n):
    return jax.devices()[:n]


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(cfg_for(model_dir, out, "mesh.data=1"), devices=devices(1))
    return losses(out)


# Same data, same adapter init, different partitioning: only the order of
# float32 reductions changes (observed differences ~1e-6 over 5 steps).
@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, fsdp=4),
                                  dict(data=2, fsdp=2, tensor=2)])
def test_losses_do_not_depend_on_the_mesh(model_dir, tmp_path, reference, mesh):
    out = tmp_path / "run"
    run(cfg_for(model_dir, out, *[f"mesh.{k}={v}" for k, v in mesh.items()]),
        devices=devices(8))
    np.testing.assert_allclose(losses(out), reference, rtol=1e-5, atol=1e-5)
    assert reference[-1] < reference[0]  # and it learns


def test_gradient_accumulation_equals_the_full_batch(model_dir, tmp_path, reference):
    out = tmp_path / "run"
    run(cfg_for(model_dir, out, "micro_batch_size=2", "mesh.data=1"), devices=devices(1))
    np.testing.assert_allclose(losses(out), reference, rtol=1e-5, atol=1e-5)


def test_resume_continues_exactly(model_dir, tmp_path, reference):
    out = tmp_path / "run"
    cfg = cfg_for(model_dir, out, "mesh.data=1", "checkpoint_every=2", "keep_checkpoints=5")
    run(cfg, devices=devices(1))
    # As if the process had died after step 2's checkpoint: later ones never written.
    for step in (4, 5):
        shutil.rmtree(out / "checkpoints" / str(step))
    run(cfg, resume=True, devices=devices(1))
    np.testing.assert_allclose(losses(out), reference, rtol=1e-6, atol=1e-6)
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4, 5]


def test_only_adapter_leaves_change(model_dir, tmp_path):
    cfg = cfg_for(model_dir, tmp_path / "run", "mesh.data=1")
    s = build(cfg, devices(1))
    step_fn, _, batch_sh = compile_steps(s, cfg)
    from flax_adapters.sharding import global_batch
    before_trainable = jax.tree_util.tree_map(np.array, s.state.trainable)
    state = s.state
    for step in range(3):
        state, _ = step_fn(state, s.frozen, global_batch(s.prepared.train.batch_at(step), 1,
                                                         batch_sh), jax.random.key(0))
    fresh = load_pretrained(model_dir).params
    frozen_now = fa.split(fa.combine(s.frozen, state.trainable)).frozen
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen_now, fresh)  # bit-identical
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != np.asarray(b))),
                                     before_trainable, state.trainable)
    assert any(jax.tree_util.tree_leaves(changed))


def test_refuses_to_overwrite_a_run(model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    from train.loop import TrainingError
    with pytest.raises(TrainingError, match="--resume.*--overwrite"):
        run(cfg_for(model_dir, out, "mesh.data=1"), devices=devices(1))
    assert (out / "metrics.jsonl").read_text() == "precious\n"


@pytest.mark.parametrize("override, match", [
    ("optim.lrr=1", "unknown key optim.lrr; did you mean lr"),
    ("steps=abc", "steps: expected int"),
    ("adapter.method=loraa", "unknown adapter.method 'loraa'"),
    ("adapter.settings.rank=4", "unknown key adapter.settings.rank"),
    ("batch_size=10", "not a multiple of micro_batch_size"),
    ("data.template=foo", "is not one of"),
])
def test_bad_config_is_one_clear_error(override, match):
    with pytest.raises(ValueError, match=match):
        config_lib.load(None, [override, "micro_batch_size=4", "batch_size=8"]
                        if "batch_size" not in override else [override, "micro_batch_size=4"])


def test_targets_that_match_nothing(model_dir, tmp_path):
    with pytest.raises(ValueError, match="match no site.*q_proj"):
        run(cfg_for(model_dir, tmp_path / "run", "adapter.settings.target_modules=[qkv]",
                    "mesh.data=1"), devices=devices(1))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_smoke(model_dir, tmp_path):
    """The real entry point in a subprocess: it learns (held-out accuracy by
    generation and the loss, see tiny.LEARNING_RUN) and exports."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", f"model.path={model_dir}", f"output_dir={out}",
           *LEARNING_RUN]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # 8 of the 64 problems more. Measured rises of 19-30 points over 3 seeds (this one,
    # seed 0: 6.3% -> 29.7%; tiny.LEARNING_RUN); a run that learns only the answer's
    # format gained at most 9 points, one whose adapter is not applied at evaluation 0.
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.125, summary
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # Chance at the first step (ln of the ~100-word vocabulary: 4.8); the held-out loss
    # at the end 0.23 (0.23-0.46 over 3 seeds). With the noise head frozen it stays > 4.5.
    assert metrics[0]["loss"] > 4 and metrics[-1]["val_loss"] < 1.0, (metrics[0], metrics[-1])
    for f in ("metrics.jsonl", "loss.png", "report.md", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors"):
        assert (out / f).exists(), f
    bad = subprocess.run([sys.executable, "-m", "train", "optim.lrr=1"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean lr" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("malformed", "invalid JSON"),
    ("no_output", "record 1 has no string 'output'"),
    ("too_long", "all .* training examples are cut off before their answer"),
])
def test_bad_data_is_one_clear_error_and_writes_nothing(model_dir, tmp_path, case, match):
    f = tmp_path / "data.json"
    good = {"instruction": "Add 1 and 2.", "input": "", "output": "1 + 2 = 3. The answer is 3."}
    overrides = [f"data.path={f}", "data.val_set_size=0", "mesh.data=1"]
    if case == "malformed":
        f.write_text('[{"instruction": "x", "output": "y"},\n{"instruction": ')
    elif case == "no_output":
        f.write_text(json.dumps([good, {"instruction": "Add 1 and 2.", "input": ""}]))
    elif case == "too_long":
        f.write_text(json.dumps([good] * 20))
        overrides += ["data.cutoff_len=4", "data.train_on_inputs=false"]
    out = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        run(cfg_for(model_dir, out, *overrides), devices=devices(1))
    assert "\n" not in str(err.value)
    assert not out.exists()
