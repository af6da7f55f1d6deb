"""`python -m train [--config FILE] [key.sub=value ...] [--resume] [--overwrite] [--dry_run]`

With no arguments: SmolLM2-135M-Instruct (the embedded default model) + LoRA
on the embedded arithmetic word problems, then held-out accuracy before and
after. `--help` lists every config field. `--dry_run` prints the plan
(parameters, memory per device, shardings, whether it fits) and exits
without loading weights (train/plan.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


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
                        help="replace an existing run in output_dir")
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
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = config_lib.load(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.dry_run:
        return _dry_run(cfg, args)

    import jax

    # Multi-host: TPU pod slices and SLURM clusters announce themselves in the
    # environment; jax.distributed.initialize() then needs no arguments.
    if "TPU_WORKER_HOSTNAMES" in os.environ or "JAX_COORDINATOR_ADDRESS" in os.environ or \
            int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    # Reproducible float32 matmuls: the default precision on some backends is
    # bf16 passes; our parity claims are float32.
    jax.config.update("jax_default_matmul_precision", "highest")

    from train.loop import TrainingError, run

    try:
        run(cfg, resume=args.resume, overwrite=args.overwrite)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
                           device_kind=kind, device_memory_gb=memory_gb)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
