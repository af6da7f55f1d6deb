"""`python -m train [--config FILE] [key.sub=value ...] [--resume] [--overwrite] [--dry_run]`

With no arguments: SmolLM2-135M-Instruct (the embedded default model) + LoRA
on the embedded arithmetic word problems, then held-out accuracy before and
after. `--help` lists every config field. `--dry_run` prints the plan
(parameters, memory per device, shardings, whether it fits) and exits
without loading weights (train/plan.py).

Several hosts: run the same command on every host. TPU pod slices and SLURM
job steps are detected; elsewhere pass --coordinator_address,
--num_processes and --process_id (train/distributed.py). For a local test:
`python -m train.launch --num_processes 2 -- ...`.

Exit status: 0 done; 1 the run failed (the message says why and what was
kept); 2 bad config or command line; 128 + N stopped by signal N (143 for
SIGTERM, 130 for SIGINT) after checkpointing: rerun with --resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    from train import config as config_lib

    parser = argparse.ArgumentParser(
        prog="python -m train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="config fields (override with key.sub=value):\n" + config_lib.help_text() +
        "\n\nadapter.settings per adapter.method:\n" + config_lib.adapter_help())
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run in output_dir (deleted only once the "
                        "new run has loaded its model and data)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the plan (parameters, memory per device, shardings, fit) "
                        "without loading weights or allocating, then exit")
    parser.add_argument("--device", help="--dry_run: the device kind to check the fit on "
                        "(v4, v5e, v5p, v6e, a100-40gb, a100-80gb, h100, l4, t4); default: "
                        "this machine's")
    parser.add_argument("--device_memory_gb", type=float,
                        help="--dry_run: memory per device in GiB (overrides --device)")
    parser.add_argument("--num_devices", type=int,
                        help="--dry_run: devices of the mesh; default: this machine's")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    multi = parser.add_argument_group(
        "several processes", "detected on TPU pod slices and in SLURM job steps; elsewhere "
        "pass the first three on every process")
    multi.add_argument("--coordinator_address", help="host:port of process 0")
    multi.add_argument("--num_processes", type=int, help="how many processes in all")
    multi.add_argument("--process_id", type=int, help="this process, 0 .. num_processes-1")
    multi.add_argument("--heartbeat_timeout", type=int, default=60, metavar="SECONDS",
                       help="a process silent this long counts as dead and all the others "
                       "stop (default: %(default)s)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = config_lib.load(args.config, args.overrides)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.dry_run:
        return _dry_run(cfg, args)

    from flax_adapters.runtime import keep_freed_memory, set_matmul_precision
    keep_freed_memory()  # before JAX allocates anything; see flax_adapters/runtime.py

    import jax

    from train import distributed

    # Before anything touches a device: with several processes, jax.devices()
    # must list all of theirs.
    try:
        distributed.initialize(distributed.DistributedConfig(
            args.coordinator_address, args.num_processes, args.process_id,
            args.heartbeat_timeout))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- JAX's runtime errors: unreachable coordinator, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: the processes could not connect ({first}); check that every process "
              "got the same --coordinator_address and --num_processes, and that process 0 "
              "runs and its port is reachable", file=sys.stderr)
        return 1
    if jax.process_index() > 0:  # process 0 speaks for all; warnings still show everywhere
        logging.getLogger().setLevel(logging.WARNING)
    # Float32 matmul precision per backend (model.matmul_precision; "auto": full
    # float32 on CPU, where it is free, the backend's fast default on GPU/TPU).
    set_matmul_precision(cfg.model.matmul_precision)

    from train.loop import TrainingError, run
    from train.preempt import Preempted

    try:
        run(cfg, resume=args.resume, overwrite=args.overwrite)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        distributed.stop()
        return e.exit_code
    except KeyboardInterrupt:  # outside the training loop, or a second Ctrl-C
        print("interrupted: the last complete checkpoint (if any) is intact; rerun with "
              "--resume", file=sys.stderr)
        return 130
    except (TrainingError, ValueError, OSError) as e:
        return distributed.fail(f"error: {e}")
    except BaseException as e:
        if not distributed.is_multiprocess():
            raise
        # the others stop too, with its first line
        distributed.fail(f"error: {type(e).__name__}: {e}".splitlines()[0],
                         details=traceback.format_exc())
    distributed.stop()
    return 0


def _dry_run(cfg, args) -> int:
    # A plan touches no device memory; on GPUs, do not let JAX's backend
    # start-up preallocate most of it either.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from train import plan

    kind, memory_gb = args.device, args.device_memory_gb
    if kind is None and memory_gb is None:
        device = jax.devices()[0]
        kind = device.device_kind if device.platform != "cpu" else "cpu"
        limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" \
            else None
        memory_gb = None if limit is None else limit / plan.GiB
    try:
        p = plan.make_plan(cfg, num_devices=args.num_devices or jax.device_count(),
                           device_kind=kind, device_memory_gb=memory_gb, references=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
