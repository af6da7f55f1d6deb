"""Reliability in-process: the NaN/Inf policy, --overwrite and --resume
safety, a damaged checkpoint on resume, and loading that never unpickles or
runs code from the model directory. (Killing real training processes is in
test_preemption.py; the malformed-input tables are in test_fuzz.py.)"""

import json
import pathlib
import pickle
import shutil
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from tiny import make_model_dir, run_config  # noqa: E402

from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import data as data_lib  # noqa: E402
from train.checkpoint import Checkpointer  # noqa: E402
from flax_adapters.sharding import global_batch  # noqa: E402
from flax_adapters.step import nonfinite_verdict  # noqa: E402
from train.loop import TrainingError, _truncate_metrics, build, compile_steps, run  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def cfg_for(model_dir, out, *overrides):
    return run_config(model_dir, out, "steps=4", "checkpoint_every=1", "keep_checkpoints=10",
                      "mesh.data=1", *overrides)


def one_device():
    return jax.devices()[:1]


def metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def steps_on_disk(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def assert_trees_equal(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                                      np.asarray(y)), a, b)

# ------------------------------------------------------------------ NaN/Inf policy


# optim.lr=1e30 is a real divergence: step 1 runs at lr 0 (warmup), step 2's
# update blows the adapter up to ~1e30 (still finite), and from step 3 on
# the activations overflow and the loss is NaN.
DIVERGE = ("optim.lr=1e30", "steps=8")


def test_nonfinite_stop_keeps_the_last_good_checkpoint(model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(model_dir, out, *DIVERGE, "optim.nonfinite=stop")
    with pytest.raises(TrainingError) as err:
        run(cfg, devices=one_device())
    msg = str(err.value)
    assert msg.startswith("non-finite loss or gradient at step 3 (optim.nonfinite=stop); no "
                          "non-finite update was applied and training stopped")
    assert f"Last good checkpoint: {out.resolve() / 'checkpoints' / '2'}." in msg
    assert "\n" not in msg
    assert steps_on_disk(out) == ["1", "2"]  # nothing written after the bad step
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and np.isnan(rows[2]["loss"])
    assert [r["skipped"] for r in rows] == [0, 0, 1]
    assert not (out / "summary.json").exists()
    # The kept checkpoint restores, verified against its fingerprint.
    like = build(cfg, one_device()).state
    state, meta = Checkpointer(out / "checkpoints", 10).restore(2, like)
    assert meta["step"] == 2 and int(state.step) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))


def test_nonfinite_skip_counts_and_stops_after_n_in_a_row(model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(model_dir, out, *DIVERGE, "optim.nonfinite=skip",
                  "optim.max_consecutive_nonfinite=3")
    with pytest.raises(TrainingError, match=r"^3 steps in a row with a non-finite loss or "
                       r"gradient, up to step 5 \(optim.nonfinite=skip stops after "
                       r"optim.max_consecutive_nonfinite=3\)"):
        run(cfg, devices=one_device())
    rows = metrics(out)
    assert [r["skipped"] for r in rows] == [0, 0, 1, 2, 3]
    assert steps_on_disk(out) == ["1", "2", "3", "4"]
    # Skipped steps never touched the adapter or Adam's moments: the state
    # checkpointed after two skips is the state after step 2, plus the counts.
    like = build(cfg, one_device()).state
    ck = Checkpointer(out / "checkpoints", 10)
    at2, _ = ck.restore(2, like)
    at4, _ = ck.restore(4, like)
    assert_trees_equal(at4.trainable, at2.trainable)
    assert_trees_equal(at4.opt_state.inner_state, at2.opt_state.inner_state)
    assert (int(at4.opt_state.notfinite_count), int(at4.opt_state.total_notfinite)) == (2, 2)


def test_a_skipped_step_changes_nothing_and_training_recovers(model_dir, tmp_path):
    """One poisoned batch (a NaN in the frozen base for one step only)."""
    cfg = cfg_for(model_dir, tmp_path / "run", "optim.warmup_steps=0")
    s = build(cfg, one_device())
    step_fn, _, batch_sh = compile_steps(s, cfg)
    key = jax.random.key(0)
    batch = global_batch(s.prepared.train.batch_at(0), 1, batch_sh)
    poisoned = jax.tree_util.tree_map(lambda x: x, s.frozen)
    poisoned["norm"] = {"scale": s.frozen["norm"]["scale"] * np.nan}
    before = jax.tree_util.tree_map(np.array, s.state.trainable)
    state, m = step_fn(s.state, poisoned, batch, key)
    assert not bool(m["finite"]) and int(m["nonfinite_in_a_row"]) == 1
    assert_trees_equal(state.trainable, before)
    assert nonfinite_verdict(jax.device_get(m), 1, "skip", 2) is None
    assert "optim.nonfinite=stop" in nonfinite_verdict(jax.device_get(m), 1, "stop", 2)
    state, m = step_fn(state, s.frozen, batch, key)
    assert bool(m["finite"]) and int(m["nonfinite_in_a_row"]) == 0
    assert int(m["nonfinite_total"]) == 1
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                     state.trainable, before)
    assert any(jax.tree_util.tree_leaves(changed))

# ------------------------------------------------------------- output directory


@pytest.mark.parametrize("bad", [
    "model.path=/nonexistent/model",                              # fails loading the model
    "adapter.settings.target_modules=[qkv]",                      # fails after it loaded
    "data.path=/nonexistent/data.json",                           # fails preparing the data
])
def test_overwrite_deletes_nothing_until_the_new_run_is_built(model_dir, tmp_path, bad):
    out = tmp_path / "run"
    (out / "checkpoints" / "7").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("precious\n")
    with pytest.raises((ValueError, OSError, TrainingError)):
        run(cfg_for(model_dir, out, bad), overwrite=True, devices=one_device())
    assert (out / "metrics.jsonl").read_text() == "precious\n"
    assert (out / "checkpoints" / "7").is_dir()


def test_overwrite_replaces_the_old_run_once_built(model_dir, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "7").mkdir(parents=True)
    (out / "stale.txt").write_text("old run")
    run(cfg_for(model_dir, out, "steps=1"), overwrite=True, devices=one_device())
    assert not (out / "stale.txt").exists() and steps_on_disk(out) == ["1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no trash left beside it


def test_output_dir_that_is_a_file(model_dir, tmp_path):
    f = tmp_path / "run"
    f.write_text("not a directory")
    with pytest.raises(TrainingError, match="is a file"):
        run(cfg_for(model_dir, f), devices=one_device())
    assert f.read_text() == "not a directory"

# ------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    """An uninterrupted 4-step run checkpointed at every step."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(cfg_for(model_dir, out), devices=one_device())
    return out


def test_resume_refuses_a_different_config_and_moves_nothing(model_dir, tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with pytest.raises(TrainingError, match=r"written under a different config \(optim.lr: "
                       r"0.01 -> 0.02; seed: 0 -> 3\)"):
        run(cfg_for(model_dir, out, "optim.lr=2e-2", "seed=3"), resume=True,
            devices=one_device())
    assert steps_on_disk(out) == steps_on_disk(finished)


def test_resume_compares_adapter_settings_with_their_defaults():
    from train.config import resume_mismatches
    lora = lambda **s: {"adapter": {"method": "lora", "settings": s}}  # noqa: E731
    assert resume_mismatches(lora(), lora(r=16, dropout=0.0)) == []  # the defaults, spelled out
    assert resume_mismatches(lora(), lora(r=8)) == ["adapter.settings.r: 16 -> 8"]
    assert resume_mismatches(lora(r=8), {"adapter": {"method": "ia3", "settings": {}}}) == [
        "adapter.method: 'lora' -> 'ia3'", "adapter.settings.r: 8 -> None"]


def test_resume_after_the_newest_checkpoint_rotted(model_dir, tmp_path, finished, caplog):
    """A flipped byte in step 4's array data: orbax would restore it silently
    as different numbers; the fingerprint catches it, step 4 is set aside and
    the run resumes from step 3 to the same losses and adapter."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    # One byte in the middle of each array data file (orbax keeps two copies
    # of the OCDBT data; which one it reads is its business).
    for f in (out / "checkpoints" / "4" / "state").rglob("d/*"):
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        f.write_bytes(bytes(raw))
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 5, "lo')
    with caplog.at_level("WARNING"):
        run(cfg_for(model_dir, out), resume=True, devices=one_device())
    assert "checkpoint" in caplog.text and "moved to 4.corrupt" in caplog.text
    assert "torn line" in caplog.text
    assert "4.corrupt" in steps_on_disk(out) and "4" in steps_on_disk(out)
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(finished)]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (finished / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_failure_that_is_not_damage_moves_no_checkpoint(model_dir, tmp_path, finished,
                                                          monkeypatch):
    """Out of memory (or an I/O error) while restoring says nothing about the
    files: it propagates and every checkpoint stays where it is."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)

    def no_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while restoring")
    monkeypatch.setattr(Checkpointer, "_read_state", no_memory)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        run(cfg_for(model_dir, out), resume=True, devices=one_device())
    assert steps_on_disk(out) == steps_on_disk(finished)


def test_truncate_metrics_drops_torn_and_later_lines(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}'
                 '\n{"step": 4, "lo')
    assert _truncate_metrics(f, 2) == {"step": 2, "loss": 1.5}
    assert [json.loads(ln)["step"] for ln in f.read_text().splitlines()] == [1, 2]


def test_heldout_scores_only_numeric_answers(tmp_path):
    from tiny import make_tokenizer
    records = [{"instruction": f"q{i}", "output": f"a{i}", "answer": a} for i, a in
               enumerate(["3", "option1", None, "2.5", "nan", 7] * 5)]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(records))
    cfg = config_lib.from_dict(config_lib.DataConfig, {"path": str(f), "val_set_size": 12})
    prepared = data_lib.prepare(cfg, make_tokenizer(), batch_size=4, seed=0)
    assert all(data_lib._is_number(r["answer"]) for r in prepared.test)
    assert prepared.info["test"] + prepared.info["test_unscored"] == 12

# ------------------------------------------------------- nothing runs, nothing unpickles


class _Evil:
    """Unpickling this creates `marker`: what a malicious .bin does."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _plant(directory: pathlib.Path, marker: pathlib.Path) -> None:
    """Everything a hostile model directory could use to run code on load."""
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    (directory / "training_args.bin").write_bytes(pickle.dumps(_Evil(marker)))
    for name, key in (("config.json", "AutoConfig"), ("tokenizer_config.json", "AutoTokenizer")):
        cfg = json.loads((directory / name).read_text())
        cfg["auto_map"] = {key: f"evil_{key.lower()}.Evil", "AutoModelForCausalLM":
                           "evil_model.Evil"}
        (directory / name).write_text(json.dumps(cfg))
    for module in ("evil_autoconfig", "evil_autotokenizer", "evil_model"):
        (directory / f"{module}.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nEvil = None\n")


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fails the test on any unpickling, by the pickle module or by name."""
    calls = []

    def hook(event, args):
        if event == "pickle.find_class":
            calls.append(args)
    sys.addaudithook(hook)  # process-wide and permanent: it only records

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("something tried to unpickle")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    yield calls
    assert not calls, calls


@pytest.mark.parametrize("tokenizer_class", [True, False])
def test_loading_never_runs_code_or_unpickles(model_dir, tmp_path, no_unpickling,
                                              tokenizer_class):
    d = tmp_path / "hostile"
    shutil.copytree(model_dir, d)
    marker = tmp_path / "PWNED"
    _plant(d, marker)
    if not tokenizer_class:  # only the auto_map is left to say how to build it
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("tokenizer_class", None)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    try:
        pre = load_pretrained(d)
    except ValueError as e:  # refusing is fine; running the code is not
        assert "custom code" in str(e) and "\n" not in str(e)
    else:
        assert type(pre.tokenizer).__module__.startswith("transformers.")
    assert not marker.exists()
    assert not [m for m in sys.modules if m.startswith("evil_")]


def test_training_checkpoints_restore_without_unpickling(finished, model_dir, no_unpickling):
    like = build(cfg_for(model_dir, finished), one_device()).state
    state, meta = Checkpointer(finished / "checkpoints", 10).restore(4, like)
    assert meta["step"] == 4


def test_gguf_and_peft_files_load_without_unpickling(tmp_path, model_dir, finished,
                                                     no_unpickling):
    pytest.importorskip("gguf")
    from test_gguf import TINY, random_state, tiny_byte_level_vocab, write_gguf

    import flax_adapters as fa

    write_gguf(tmp_path / "m.gguf", TINY, random_state(TINY), more=tiny_byte_level_vocab())
    assert load_pretrained(tmp_path / "m.gguf").tokenizer is not None
    adapter = tmp_path / "adapter"
    shutil.copytree(finished / "adapter", adapter)
    marker = tmp_path / "PWNED"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    pre = load_pretrained(model_dir)
    tree, cfg = fa.load_adapter(adapter, pre.params, pre.config.model_type)
    assert cfg.r == 4 and not marker.exists()
