"""Several processes, one mesh: process discovery, start-up and failure handling.

JAX's multi-controller runtime is the distributed engine
(https://docs.jax.dev/en/latest/multi_process.html): every host runs the same
`python -m train`, `jax.distributed.initialize` connects the processes through
a coordinator service hosted by process 0, and `jax.devices()` then lists the
devices of every process, so one mesh spans them all. This module decides
whether and how to call it, in this order:

  * explicit flags `--coordinator_address --num_processes --process_id`
    (any cluster; the local launcher, train/launch.py, passes them);
  * `JAX_COORDINATOR_ADDRESS` in the environment (JAX's own variable; the
    process count and id then come from JAX's cluster detection);
  * a SLURM job step with more than one task (`srun`; JAX reads SLURM_*);
  * a Cloud TPU VM that is one worker of a multi-host pod slice (JAX's own
    TPU detection, which asks the GCE metadata server or reads GKE's
    TPU_WORKER_HOSTNAMES);
  * otherwise one process: nothing to connect.

A collective blocks until every process joins it, so one dead process would
hang all the others. Two guards, both bounded in time:
  * a process that dies (killed, out of memory, segfault) stops sending
    heartbeats; the coordinator notices within `heartbeat_timeout` seconds and
    JAX terminates every other process ("...another task died");
  * a process that fails with a Python error posts its message to the
    coordinator's key-value store before it exits (`fail`); a watchdog thread
    in every process polls the store once a second and stops its process with
    that message, so every log shows the cause.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sys
import threading
import time
from typing import Callable, Mapping

import numpy as np

log = logging.getLogger("train")

_ERRORS = "flax_adapters/failed/"   # key-value store directory: process id -> its error
_POLL_SECONDS = 1.0
# A failing process waits this long before it exits, so every watchdog has
# read its message before the coordinator (if it is process 0) goes away.
_GRACE_SECONDS = 3 * _POLL_SECONDS
_BARRIER_SECONDS = 600  # the longest wait at a barrier (process 0 writing the report)
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")  # what JAX's SLURM detection reads; set inside `srun` only
GKE_TPU_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the others (all None: detect from the environment)."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    # Seconds without a heartbeat after which a process counts as dead and
    # every other process is stopped; also the shutdown barrier's bound.
    heartbeat_timeout: int = 60


def detect(cfg: DistributedConfig, environ: Mapping[str, str],
           tpu_pod: Callable[[], bool]) -> str | None:
    """How this process finds the others: "flags", "jax_env", "slurm", "tpu",
    or None when it runs alone. `tpu_pod()` is only asked when nothing else
    decided (it may query the TPU VM's metadata server)."""
    if cfg.heartbeat_timeout < 1:
        raise ValueError(f"--heartbeat_timeout must be >= 1 second, got {cfg.heartbeat_timeout}")
    given = (cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ValueError("--coordinator_address, --num_processes and --process_id go "
                             "together: pass all three, or none to detect them from a TPU VM "
                             "or SLURM environment")
        if ":" not in cfg.coordinator_address:
            raise ValueError(f"--coordinator_address {cfg.coordinator_address!r} needs a port: "
                             "host:port of process 0, e.g. 10.0.0.1:8476")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise ValueError(f"--process_id {cfg.process_id} must be in [0, --num_processes "
                             f"{cfg.num_processes})")
        return "flags"
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "jax_env"
    # An sbatch script itself sees SLURM_NTASKS > 1 but is one process; only
    # the tasks started by srun have a step node list.
    if all(v in environ for v in SLURM_VARS) and int(environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    if any(environ.get(v) for v in GKE_TPU_VARS) or tpu_pod():
        return "tpu"
    return None


def on_tpu_pod_slice() -> bool:
    """True on a worker of a multi-host Cloud TPU slice.

    Asks the detectors `jax.distributed.initialize()` itself uses (private
    JAX modules, pinned by pyproject's jax bound), so "detected here" and
    "initialize finds the cluster" cannot disagree; a single-host TPU VM or
    Colab TPU is one process and needs no coordinator."""
    from jax._src import cloud_tpu_init
    from jax._src.clusters import cloud_tpu_cluster as tpu

    if not cloud_tpu_init.running_in_cloud_tpu_vm:
        return False
    return any(c.is_env_present() and c.get_process_count() > 1
               for c in (tpu.GkeTpuCluster, tpu.GceTpuCluster))


def initialize(cfg: DistributedConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """Connects this process to the others, if there are any; returns how
    (see `detect`). Must run before anything touches a JAX device."""
    import jax

    how = detect(cfg, environ, on_tpu_pod_slice)
    if how is None:
        return None
    # Cross-process collectives on the CPU backend (tests, CPU clusters) need
    # an implementation; gloo ships with jaxlib. GPU and TPU ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The shutdown barrier only waits long when a process is gone, which the
    # heartbeat bound already detects: same bound.
    timeouts = dict(heartbeat_timeout_seconds=cfg.heartbeat_timeout,
                    shutdown_timeout_seconds=cfg.heartbeat_timeout)
    try:
        if how == "flags":
            jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes,
                                       cfg.process_id, **timeouts)
        else:
            jax.distributed.initialize(
                cluster_detection_method="slurm" if how == "slurm" else None, **timeouts)
    except ValueError as e:  # JAX found no process count or id in this environment
        raise ValueError(f"several processes detected ({how}), but JAX says: "
                         f"{str(e).rstrip('.')}; pass "
                         "--coordinator_address, --num_processes and --process_id") from None
    _Watchdog.start(jax.process_index())
    return how


def _client():
    # The coordinator's key-value store and barriers: jax.distributed's client
    # (not re-exported publicly; orbax and levanter use it the same way).
    from jax._src import distributed

    return distributed.global_state.client


def is_multiprocess() -> bool:
    return _client() is not None


_barriers = itertools.count()


def barrier(name: str) -> None:
    """Blocks until every process reaches this point (nothing when alone)."""
    if not is_multiprocess():
        return
    _client().wait_at_barrier(f"flax_adapters/{name}/{next(_barriers)}",
                              _BARRIER_SECONDS * 1000)


def fail(message: str, code: int = 1, details: str = "") -> int:
    """Prints `details` (a traceback) and `message`; with several processes
    also tells the others (their watchdogs stop them with it) and exits now,
    skipping the shutdown barrier the others would never reach. Alone:
    returns `code` for the caller.

    An error that follows another process's failure (a collective whose peer
    is gone) is a consequence, not a cause: it is not reported; the watchdog,
    which already printed the cause, ends the process."""
    if _Watchdog.stopping.is_set():
        time.sleep(2 * _GRACE_SECONDS)
        os._exit(1)
    print(details + message, file=sys.stderr, flush=True)
    if not is_multiprocess():
        return code
    import jax

    _Watchdog.failing = True
    try:
        _client().key_value_set(f"{_ERRORS}{jax.process_index()}", message)
    except Exception:  # noqa: BLE001 -- the coordinator itself is gone: exit anyway
        pass
    time.sleep(_GRACE_SECONDS)
    sys.stdout.flush()
    os._exit(code)


def stop() -> None:
    """Ends the watchdog before a clean exit (JAX's shutdown would make its
    next poll fail and look like a lost coordinator)."""
    _Watchdog.stopped.set()


class _Watchdog:
    """Stops this process when another one reports a failure (see the module
    docstring) or the coordinator can no longer be reached."""

    stopped = threading.Event()
    stopping = threading.Event()  # set when it stops this process for another's failure
    failing = False  # this process is already failing: stay quiet

    @classmethod
    def start(cls, me: int) -> None:
        threading.Thread(target=cls._run, args=(me, _client()), name="flax_adapters-watchdog",
                         daemon=True).start()

    @classmethod
    def _run(cls, me: int, client) -> None:
        while not cls.stopped.wait(_POLL_SECONDS):
            try:
                failed = client.key_value_dir_get(_ERRORS)
            except Exception as e:  # noqa: BLE001 -- any RPC error means the same here
                if cls.stopped.is_set() or cls.failing:
                    return
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                cls._exit(f"error: process {me} lost the coordinator (process 0) and stops: it "
                          f"stopped or crashed, see its output ({first})")
            others = [(k, v) for k, v in failed if not k.endswith(f"/{me}")]
            if others and not cls.failing and not cls.stopped.is_set():
                key, message = others[0]
                cls._exit(f"error: process {key.rsplit('/', 1)[1]} failed, so process {me} "
                          f"stops too. Its error: {message.removeprefix('error: ')}")

    @classmethod
    def _exit(cls, message: str) -> None:
        cls.stopping.set()
        print(message, file=sys.stderr, flush=True)
        time.sleep(_GRACE_SECONDS)  # let the remaining watchdogs read the store too
        os._exit(1)


# ------------------------------------------------------------------ data and files


def gather(local: np.ndarray) -> np.ndarray:
    """(k, ...) on every process -> (process_count, k, ...), in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local))


def host_copy(tree, mesh):
    """`tree` with every array replicated and fetched as numpy, so process 0
    can export it. A collective: every process calls it (a shard held by
    another process cannot be read otherwise). Alone: `tree` itself."""
    if not is_multiprocess():
        return tree
    import jax

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(np.asarray, jax.jit(lambda t: t, out_shardings=replicated)(tree))


def process_rows(batch_sharding, accum: int, micro: int) -> np.ndarray:
    """Rows of the global batch that this process loads, in the order
    `jax.make_array_from_process_local_data` expects them.

    The batch has `accum * micro` rows and micro-batch a is rows
    [a * micro, (a + 1) * micro), for every process count; it goes to the mesh
    as (accum, micro, t) with `batch_sharding` splitting dimension 1. A process
    loads the dimension-1 rows its own devices hold (several processes load the
    same rows when a replicated mesh axis spans them), for every micro-batch.
    """
    shape = (accum, micro) + (1,) * (len(batch_sharding.spec) - 2)
    held = sorted({idx[1].indices(micro)[:2]
                   for idx in batch_sharding.addressable_devices_indices_map(shape).values()})
    local = np.unique(np.concatenate([np.arange(a, b) for a, b in held]))
    return (np.arange(accum)[:, None] * micro + local[None, :]).reshape(-1)


def check_shared_directory(path) -> None:
    """Every process must see `path` as process 0 wrote it: all of them write
    their shards of each checkpoint into it, and process 0 finalises it."""
    if not is_multiprocess():
        return
    import jax

    marker = path / f".shared-check-{os.getpid()}" if jax.process_index() == 0 else None
    name = _broadcast_name(marker.name if marker else "")
    if marker is not None:
        marker.write_text(name)
    barrier("shared-directory written")
    seen = (path / name).is_file()
    barrier("shared-directory read")
    if marker is not None:
        marker.unlink()
    if not seen:
        raise ValueError(f"process {jax.process_index()} does not see what process 0 wrote to "
                         f"output_dir {path}: on several hosts it must be a shared file system "
                         "(NFS, Filestore, a GCS FUSE mount) mounted at the same path on all")


def _broadcast_name(name: str) -> str:
    import jax

    key = f"flax_adapters/shared-check/{next(_barriers)}"
    if jax.process_index() == 0:
        _client().key_value_set(key, name)
    return _client().blocking_key_value_get(key, _BARRIER_SECONDS * 1000)
