"""`python -m train [--config FILE] [key.sub=value ...] [--resume] [--overwrite]`

With no arguments: SmolLM2-135M-Instruct (the embedded default model) + LoRA
on the embedded arithmetic word problems, then held-out accuracy before and
after. `--help` lists every config field.
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

    from train.runtime import keep_freed_memory
    keep_freed_memory()  # before JAX allocates anything; see train/runtime.py

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


if __name__ == "__main__":
    sys.exit(main())
