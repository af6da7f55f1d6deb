"""Several processes, one mesh, as on a TPU pod slice: `python -m train.launch`
runs 2 processes x 4 CPU devices (gloo collectives) that must train exactly as
1 process x 8 devices and as 1 device; checkpoints cross process counts and
mesh shapes; a dead or failing process stops the others in bounded time.

Every launch pays JAX start-up and compilation twice over, so there are five:
two meshes from scratch, one resume, one kill, one failure."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from tiny import make_model_dir  # noqa: E402

from train import config as config_lib  # noqa: E402
from train import launch  # noqa: E402
from train.loop import run  # noqa: E402

pytestmark = pytest.mark.slow

HEARTBEAT = 15  # --heartbeat_timeout of every launch: the bound on a hang

CASES = {
    # pure data parallelism; the held-out generation runs on all processes
    "data": ["mesh.data=8", "micro_batch_size=8", "eval_generate=4", "max_new_tokens=8"],
    # parameters sharded over fsdp x tensor, 2 accumulated micro-batches
    # (each process loads rows 0-1 and 4-5), LoRA dropout drawn on the mesh
    "fsdp_tensor": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "micro_batch_size=4",
                    "adapter.settings.dropout=0.1", "eval_generate=0"],
}


ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]  # same micro-batches


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def overrides(model_dir, out, case, *extra):
    return [f"model.path={model_dir}", f"output_dir={out}", "steps=5", "batch_size=8",
            "eval_every=0", "checkpoint_every=2", "keep_checkpoints=5", "log_every=1",
            "optim.lr=1e-2", "optim.warmup_steps=1", "data.embedded_train_size=200",
            "data.val_set_size=16", "adapter.settings.r=4",
            "adapter.settings.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
            "down_proj]", *CASES[case], *extra]


def in_process(args, n_devices, resume=False):
    run(config_lib.load(None, args), resume=resume, devices=jax.devices()[:n_devices])


def two_processes(args) -> str:
    """`python -m train.launch` with 2 x 4 devices; its prefixed output."""
    proc = subprocess.run(
        [sys.executable, "-m", "train.launch", "--num_processes", "2", "--devices_per_process",
         "4", "--", *args, "--heartbeat_timeout", str(HEARTBEAT)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


def metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [m["loss"] for m in metrics(out)]


def drop_checkpoints_after(out, step):
    """As if the run had died right after checkpoint `step`."""
    for d in (out / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > step:
            shutil.rmtree(d)


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """case -> {"one_device", "eight_devices", "two_processes"}: output dirs;
    plus the 2-process output text under "log"."""
    out = {}
    for case in CASES:
        root = tmp_path_factory.mktemp(case)
        dirs = {k: root / k for k in ("one_device", "eight_devices", "two_processes")}
        in_process(overrides(model_dir, dirs["one_device"], case, *ONE_DEVICE), 1)
        in_process(overrides(model_dir, dirs["eight_devices"], case, "eval_generate=0"), 8)
        dirs["log"] = two_processes(overrides(model_dir, dirs["two_processes"], case))
        out[case] = dirs
    return out


# Same data, same adapter init and dropout masks, different partitioning:
# only the order of float32 reductions changes (observed differences ~1e-6).
TOL = dict(rtol=1e-5, atol=1e-5)
GLOO_WORDS = set("[Gloo] Rank is connected to peer ranks. Expected number of ranks :".split())


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_as_one(runs, case):
    r = runs[case]
    two = losses(r["two_processes"])
    np.testing.assert_allclose(two, losses(r["one_device"]), **TOL)
    np.testing.assert_allclose(two, losses(r["eight_devices"]), **TOL)
    assert two[-1] < two[0]
    val = [m["val_loss"] for m in metrics(r["two_processes"]) if "val_loss" in m]
    np.testing.assert_allclose(val, [metrics(r["one_device"])[-1]["val_loss"]], **TOL)

    # Written once, by process 0: five metric lines, not ten; process 1 is silent
    assert [m["step"] for m in metrics(r["two_processes"])] == [1, 2, 3, 4, 5]
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "loss.png",
              "report.md", "summary.json"):
        assert (r["two_processes"] / f).is_file(), f
    assert not list(r["two_processes"].glob(".shared-check*"))
    lines = r["log"].splitlines()  # records end at "\n" or "\r" (progress bars)
    assert sum("step=5 loss=" in ln for ln in lines if ln.startswith("[0] ")) == 1
    # Gloo writes "[Gloo] Rank 4 is connected to 7 peer ranks. Expected number of
    # connected peer ranks is : 7" to std::cerr piece by piece from several
    # threads, so its pieces can land on separate, interleaved or glued lines
    # ("...: 7[Gloo] Rank 6..."): a line made only of that message's words and
    # numbers is Gloo's, anything else is ours.
    own = [ln for ln in lines if ln.startswith("[1] ") and not all(
           w in GLOO_WORDS or w.isdigit() for w in ln[4:].replace("[Gloo]", " [Gloo] ").split())]
    assert not own, own[:5]  # no logs, metrics or progress bar from process 1

    if case == "data":  # the held-out generation ran on all processes, on the mesh
        two_summary = json.loads((r["two_processes"] / "summary.json").read_text())
        one_summary = json.loads((r["one_device"] / "summary.json").read_text())
        assert two_summary["accuracy_after"] == one_summary["accuracy_after"]
        assert (r["two_processes"] / "heldout_after.jsonl").read_text() == \
            (r["one_device"] / "heldout_after.jsonl").read_text()


def test_checkpoint_of_two_processes_resumes_in_one(runs, model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["data"]["two_processes"], out)
    drop_checkpoints_after(out, 2)
    # one process, 4 devices, another mesh shape
    in_process(overrides(model_dir, out, "data", "mesh.fsdp=2", "mesh.tensor=2",
                         "mesh.data=1"), 4, resume=True)
    np.testing.assert_allclose(losses(out), losses(runs["data"]["one_device"]), **TOL)


def test_checkpoint_of_one_process_resumes_in_two(runs, model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["data"]["one_device"], out)
    drop_checkpoints_after(out, 2)
    # tensor=8 spans both processes: each loads every row of the batch
    log = two_processes(overrides(model_dir, out, "data", "mesh.data=1", "mesh.tensor=8",
                                  "--resume"))
    assert "resumed from step 2" in log
    np.testing.assert_allclose(losses(out), losses(runs["data"]["one_device"]), **TOL)


def start_logged(args_per_process, tmp_path):
    port = launch.free_port()
    env = launch.process_env(4)
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(len(args_per_process))]
    procs = [subprocess.Popen(launch.command([*a, "--heartbeat_timeout", str(HEARTBEAT)], i,
                                             len(args_per_process), f"127.0.0.1:{port}"),
                              env=env, stdout=logs[i], stderr=subprocess.STDOUT)
             for i, a in enumerate(args_per_process)]
    return procs, [tmp_path / f"process{i}.log" for i in range(len(procs))]


def wait_all(procs, timeout):
    """Exit codes; kills what is still running after `timeout` (None = hung)."""
    deadline, codes = time.monotonic() + timeout, []
    for p in procs:
        try:
            codes.append(p.wait(max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
    return codes


# How the runtime reports a vanished peer: JAX's coordination service (after
# the heartbeat timeout, or at once when the coordinator itself is gone), or,
# on the CPU backend, gloo when the peer's socket closes mid-collective.
PEER_DIED = ("another task died", "Received data size doesn't match expected size",
             "Connection reset by peer", "Connection closed by peer")


def test_a_killed_process_stops_the_others_in_bounded_time(model_dir, tmp_path):
    out = tmp_path / "run"
    args = overrides(model_dir, out, "data", "steps=100000", "checkpoint_every=0",
                     "eval_generate=0")
    procs, logs = start_logged([args, args], tmp_path)
    try:
        t0 = time.monotonic()
        while not ((out / "metrics.jsonl").exists() and metrics(out)):  # training runs
            assert time.monotonic() - t0 < 600, logs[0].read_text()[-3000:]
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        bound = HEARTBEAT + 30  # detection within the heartbeat timeout, plus a loaded machine
        code = wait_all(procs[:1], bound)[0]
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    text = logs[0].read_text()
    assert code is not None, f"process 0 still ran {bound} s after process 1 was killed"
    assert code != 0 and waited < bound
    assert any(m in text for m in PEER_DIED), text[-3000:]


def test_an_error_on_one_process_stops_all_with_its_message(model_dir, tmp_path):
    """Process 1 sees another output_dir than process 0, as on hosts whose
    output_dir is a local disk: it fails, and process 0 stops with its error."""
    procs, logs = start_logged([overrides(model_dir, tmp_path / "a", "data", "eval_generate=0"),
                                overrides(model_dir, tmp_path / "b", "data", "eval_generate=0")],
                               tmp_path)
    try:
        failed = wait_all(procs[1:], 300)[0]
        t1 = time.monotonic()
        stopped = wait_all(procs[:1], 30)[0]  # the watchdog polls each second
        waited = time.monotonic() - t1
    finally:
        for p in procs:
            p.kill()
    texts = [p.read_text() for p in logs]
    cause = (f"process 1 does not see what process 0 wrote to output_dir {tmp_path / 'b'}: on "
             "several hosts it must be a shared file system")
    assert (stopped, failed) == (1, 1), texts
    assert f"error: {cause}" in texts[1]
    assert f"error: process 1 failed, so process 0 stops too. Its error: {cause}" in texts[0]
    assert waited < 30
    assert "Traceback" not in texts[0] + texts[1]
    assert not list((tmp_path / "a").glob(".shared-check*"))  # process 0 cleaned up
