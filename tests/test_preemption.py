"""Real `python -m train` processes signalled and killed, then resumed: the
result must be bit for bit the result of one uninterrupted run.

Every run trains the tiny model for STEPS steps with a checkpoint after
every step, so most of its time is spent saving and a kill often lands in
the middle of one (orbax's `<step>.orbax-checkpoint-tmp` directory is on
disk; the tests wait for it). One CPU device (XLA_FLAGS dropped, as in
test_cli_smoke). Compared with the uninterrupted reference: every step's
loss (exactly, as floats), the exported adapter file (byte for byte), and
the held-out accuracy before and after.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")

from tiny import make_model_dir  # noqa: E402

from train.checkpoint import TMP_SUFFIX  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def train_process(out, args):
    """A `python -m train *args` process; its stderr goes to a file beside `out`."""
    n = len(list(out.parent.glob(f"{out.name}.*.err")))
    err = out.parent / f"{out.name}.{n}.err"
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=out.parent, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"))
    proc.err = err
    return proc


def start(model_dir, out, *extra):
    return train_process(out, [
        f"model.path={model_dir}", f"output_dir={out}", f"steps={STEPS}", "batch_size=8",
        "micro_batch_size=8", "checkpoint_every=1", "keep_checkpoints=2", "eval_every=0",
        "log_every=0", "eval_generate=4", "max_new_tokens=4", "optim.lr=1e-2",
        "optim.warmup_steps=1", "data.embedded_train_size=200", "data.val_set_size=16",
        "adapter.settings.r=4", *extra])


def finish(proc, timeout=600) -> tuple[int, str]:
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, proc.err.read_text()


def wait_until(proc, condition, timeout=600) -> bool:
    """Polls `condition` while `proc` runs; False if it exited first."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        if condition():
            return True
        if time.time() > deadline:
            proc.kill()
            raise TimeoutError("the condition never held")
        time.sleep(0.002)
    return False


def lines_written(out) -> int:
    f = out / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def saving(out) -> bool:
    d = out / "checkpoints"
    return d.exists() and any(TMP_SUFFIX in p.name for p in d.iterdir())


def results(out) -> dict:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"steps": [r["step"] for r in rows], "losses": [r["loss"] for r in rows],
            "adapter": (out / "adapter" / "adapter_model.safetensors").read_bytes(),
            "accuracy": (summary["accuracy_before"], summary["accuracy_after"])}


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    rc, err = finish(start(model_dir, out))
    assert rc == 0, err[-3000:]
    return results(out)


def test_same_seed_same_bits_in_another_process(model_dir, tmp_path, reference):
    """Determinism on CPU: a second process with the same seed reproduces
    every loss exactly, and the adapter byte for byte."""
    rc, err = finish(start(model_dir, tmp_path / "same"))
    assert rc == 0, err[-3000:]
    assert results(tmp_path / "same") == reference
    assert reference["steps"] == list(range(1, STEPS + 1))
    assert reference["losses"][-1] < reference["losses"][0]


def test_sigterm_and_sigint_checkpoint_then_resume_exactly(model_dir, tmp_path, reference):
    out = tmp_path / "run"
    # SIGTERM (a TPU VM being preempted) once 3 steps are logged.
    proc = start(model_dir, out)
    assert wait_until(proc, lambda: lines_written(out) >= 3)
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    first = lines_written(out)
    assert last_line(err) == (f"preempted: SIGTERM received; saved step {first} in "
                              f"{out.resolve() / 'checkpoints' / str(first)}; continue with "
                              "the same command and --resume")
    assert "Traceback" not in err and not saving(out)
    # SIGINT (Ctrl-C) in the middle of a checkpoint save: the save completes.
    proc = start(model_dir, out, "--resume")
    assert wait_until(proc, lambda: lines_written(out) > first and saving(out))
    proc.send_signal(signal.SIGINT)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGINT, err[-3000:]
    second = lines_written(out)
    assert f"resumed from step {first}" in err and second > first
    assert last_line(err).startswith(f"preempted: SIGINT received; saved step {second} in ")
    assert not saving(out)
    # Resume to the end.
    rc, err = finish(start(model_dir, out, "--resume"))
    assert rc == 0 and f"resumed from step {second}" in err, err[-3000:]
    assert results(out) == reference


def test_kill_9_at_a_random_point_and_mid_save(model_dir, tmp_path, reference):
    out = tmp_path / "run"
    rng = random.Random(int(os.environ.get("PREEMPT_SEED", "0")))
    delay = rng.uniform(0.0, 1.0)  # well inside the ~12 steps that follow
    # kill -9 at a random moment of training (seeded; PREEMPT_SEED picks another).
    proc = start(model_dir, out)
    assert wait_until(proc, lambda: lines_written(out) >= 1)
    time.sleep(delay)
    proc.kill()
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL, f"the run ended before the kill at +{delay:.2f}s"
    # kill -9 while a checkpoint is being written, until one lands mid-save.
    for attempt in range(4):
        before = lines_written(out)
        proc = start(model_dir, out, "--resume")
        assert wait_until(proc, lambda: lines_written(out) > before and saving(out))
        proc.kill()
        finish(proc)
        if saving(out):  # the half-written save is still on disk: the kill hit it
            break
    else:
        pytest.fail("no kill landed in the middle of a save in 4 tries")
    left = sorted(p.name for p in (out / "checkpoints").iterdir() if TMP_SUFFIX in p.name)
    rc, err = finish(start(model_dir, out, "--resume"))
    assert rc == 0, err[-3000:]
    assert "incomplete checkpoint save" in err and left[0] in err
    assert not saving(out)
    assert results(out) == reference
