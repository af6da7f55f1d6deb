"""Memory of a LoRA train step against full fine-tuning, as XLA plans it.

    python -m bench.memory [--model smollm2|tiny] [--batches 1,4,16] [--seq 128]

For each batch size, our float32 train step (one device, AdamW) is compiled
on abstract arrays (bench/collectives.py: nothing is allocated) for LoRA
r=16 on q,k,v,up,down with dropout 0.05 (LLM-Adapters) and 0, and for full
fine-tuning, each without and with remat (activation checkpointing per
layer). Reported from XLA's memory analysis of the compiled step: the
arguments (parameters, adapter and optimizer state; the donated state is
updated in place), the outputs not aliased to them, and the preallocated
temporaries (activations, gradients, workspace): their sum is the step's
memory. The PyTorch side is not in this table: `python -m bench.train_step
--model smollm2 --method lora|full` measures the peak RSS of both.

Remat rows run in a child process with
XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false: XLA:CPU's
default scheduler runs the recomputation early and keeps the activations it
was meant to drop (train/plan.py says the same to users).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
VARIANTS = (("lora", 0.05), ("lora", 0.0), ("full", 0.0))


def planned(model, batch: int, seq: int, remat: bool) -> list[dict]:
    import jax

    from bench.collectives import compiled_step, model_config
    from flax_adapters.sharding import MeshConfig

    cfg = model_config(model)
    rows = []
    for method, dropout in VARIANTS:
        compiled, _ = compiled_step(cfg, method, MeshConfig(data=1), batch, seq, dropout=dropout,
                                    remat=remat, devices=jax.devices()[:1])
        m = compiled.memory_analysis()
        rows.append({"method": method, "dropout": dropout, "batch": batch, "remat": remat,
                     "args": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes,
                     "out": m.output_size_in_bytes - m.alias_size_in_bytes})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="smollm2")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--remat", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        for b in batches:
            print(json.dumps(planned(args.model, b, args.seq, args.remat)), flush=True)
        return

    from tqdm import tqdm

    rows = []
    for remat in tqdm((False, True), desc="remat off, on", unit="pass"):
        env = dict(os.environ)
        if remat:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SCHEDULER_FLAG).strip()
        cmd = [sys.executable, "-m", "bench.memory", "--worker", "--model", args.model,
               "--batches", args.batches, "--seq", str(args.seq)] + (["--remat"] if remat else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        rows += [r for line in out.stdout.splitlines() if line.startswith("[")
                 for r in json.loads(line)]

    print(f"model {args.model}, float32, one device, seq {args.seq}; MiB as XLA plans the "
          "compiled step (arguments + unaliased outputs + temporaries)")
    print("| batch | remat | LoRA (dropout 0.05) | LoRA (dropout 0) | full fine-tuning | "
          "LoRA / full (0.05) | LoRA / full (0) |\n|---|---|---|---|---|---|---|")
    total = {(r["batch"], r["remat"], r["method"], r["dropout"]):
             r["args"] + r["out"] + r["temp"] for r in rows}
    for b in batches:
        for remat in (False, True):
            d05, d0, full = (total[(b, remat, m, d)] for m, d in VARIANTS)
            print(f"| {b} | {'on' if remat else 'off'} | {d05 / 2**20:.0f} | {d0 / 2**20:.0f} | "
                  f"{full / 2**20:.0f} | {100 * d05 / full:.0f}% | {100 * d0 / full:.0f}% |")
    print("\nparts (MiB: arguments / unaliased outputs / temporaries):")
    for r in rows:
        print(f"  batch {r['batch']:>3} remat {'on ' if r['remat'] else 'off'} {r['method']:>4} "
              f"dropout {r['dropout']:<4g}: {r['args'] / 2**20:.0f} / {r['out'] / 2**20:.0f} / "
              f"{r['temp'] / 2**20:.0f}")


if __name__ == "__main__":
    main()
