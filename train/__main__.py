"""`python -m train [--config FILE] [key.sub=value ...] [--resume] [--overwrite]`

With no arguments: SmolLM2-135M-Instruct (the embedded default model) + LoRA
on the embedded arithmetic word problems, then held-out accuracy before and
after. `--help` lists every config field.

Exit status: 0 done; 1 the run failed (the message says why and what was
kept); 2 bad config or command line; 128 + N stopped by signal N (143 for
SIGTERM, 130 for SIGINT) after checkpointing: rerun with --resume.
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
                        help="replace an existing run in output_dir (deleted only once the "
                        "new run has loaded its model and data)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
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
    from train.preempt import Preempted

    try:
        run(cfg, resume=args.resume, overwrite=args.overwrite)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # outside the training loop, or a second Ctrl-C
        print("interrupted: the last complete checkpoint (if any) is intact; rerun with "
              "--resume", file=sys.stderr)
        return 130
    except (TrainingError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
