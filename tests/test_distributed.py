"""train/distributed.py and train/launch.py without a second JAX process:
process discovery from the environment, the rows a process loads, the mesh's
device order, and the launcher's supervision of real (non-JAX) subprocesses.
The multi-process runs themselves are in test_multihost.py."""

import io
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flax_adapters import sharding
from train import distributed, launch
from train.distributed import DistributedConfig, detect

SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2",
              "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def no_pod():
    return False


def never():
    raise AssertionError("the TPU metadata must not be asked when something else decided")


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"HOME": "/root", "SLURM_NTASKS": "4"}, None),  # an sbatch shell, not an srun task
    (SLURM_STEP, "slurm"),
    ({**SLURM_STEP, "SLURM_NTASKS": "1"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476"}, "jax_env"),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, "tpu"),       # GKE TPU pods
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "tpu"),
])
def test_detect_from_the_environment(environ, expected):
    assert detect(DistributedConfig(), environ, no_pod) == expected


def test_detect_a_tpu_vm_pod_slice_through_jax():
    assert detect(DistributedConfig(), {}, lambda: True) == "tpu"
    # JAX's own detectors are importable and say "no pod" on this machine
    assert distributed.on_tpu_pod_slice() is False


def test_explicit_flags():
    cfg = DistributedConfig("127.0.0.1:1234", 2, 1)
    assert detect(cfg, {**SLURM_STEP, "TPU_WORKER_HOSTNAMES": "a,b"}, never) == "flags"


@pytest.mark.parametrize("cfg, match", [
    (DistributedConfig("127.0.0.1:1234", 2, None), "go together: pass all three"),
    (DistributedConfig(None, 2, 0), "go together"),
    (DistributedConfig("127.0.0.1", 2, 0), "needs a port"),
    (DistributedConfig("127.0.0.1:1234", 2, 2), r"must be in \[0, --num_processes 2\)"),
    (DistributedConfig(heartbeat_timeout=0), "heartbeat_timeout must be >= 1"),
])
def test_bad_flags_are_one_clear_error(cfg, match):
    with pytest.raises(ValueError, match=match):
        detect(cfg, {}, no_pod)


def test_alone_nothing_is_connected(capsys):
    assert not distributed.is_multiprocess()
    distributed.barrier("nothing to wait for")
    assert distributed.fail("error: it broke", 3) == 3  # returns instead of exiting
    assert capsys.readouterr().err == "error: it broke\n"


@pytest.mark.parametrize("mesh_cfg, accum, micro", [
    (sharding.MeshConfig(data=8), 1, 8),
    (sharding.MeshConfig(data=1, fsdp=4, tensor=2), 2, 4),
])
def test_one_process_loads_every_row_in_micro_batch_order(mesh_cfg, accum, micro):
    mesh = sharding.make_mesh(mesh_cfg)
    batch_sh = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), None))
    np.testing.assert_array_equal(distributed.process_rows(batch_sh, accum, micro),
                                  np.arange(accum * micro))


def test_mesh_lays_devices_out_process_by_process():
    shuffled = [jax.devices()[i] for i in (5, 2, 7, 0, 1, 6, 3, 4)]
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), shuffled)
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())


# ---------------------------------------------------------------------- launcher


def test_process_env_sets_the_device_count_once():
    env = launch.process_env(4, {"XLA_FLAGS": "--xla_foo=1 "
                                              "--xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["PYTHONUNBUFFERED"] == "1"
    cmd = launch.command(["steps=3"], 1, 2, "127.0.0.1:99")
    assert cmd[1:] == ["-m", "train", "steps=3", "--coordinator_address", "127.0.0.1:99",
                       "--num_processes", "2", "--process_id", "1"]


def python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def test_launcher_prefixes_output_and_stops_the_rest_on_a_failure():
    procs = [python("import sys, time; print('bar 1/2\\rbar 2/2'); time.sleep(0.5); "
                    "print('bad input', flush=True); sys.exit(3)"),
             python("import time; print('working', flush=True); time.sleep(60)")]
    out = io.StringIO()
    threads = launch.stream(procs, out)
    t0 = time.monotonic()
    assert launch.supervise(procs, out) == 3
    assert time.monotonic() - t0 < launch.STOP_GRACE_SECONDS  # SIGTERM was enough
    assert procs[1].returncode == -15
    for t in threads:
        t.join(5)
    text = out.getvalue()
    # Each record ends at "\n" or "\r" and the two processes' records
    # interleave in any order ("[0] bar 1/2\r[1] working\n" is a valid output).
    assert "[0] bar 1/2\r" in text and "[0] bar 2/2\n" in text
    assert {"[0] bar 1/2", "[0] bar 2/2", "[0] bad input", "[1] working",
            "[launch] process 0 exited with code 3; stopping the others"} <= set(text.splitlines())


def test_launcher_names_the_signal_and_reports_success():
    procs = [python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"),
             python("import time; time.sleep(60)")]
    out = io.StringIO()
    assert launch.supervise(procs, out) == 128 + 9
    assert "process 0 was killed by SIGKILL" in out.getvalue()
    assert launch.supervise([python("pass"), python("pass")], io.StringIO()) == 0
