"""Step time of our LoRA train step against sequence length and batch size.

    python -m bench.scaling [--model tiny|smollm2] [--seqs 64,128,256,512] [--batch 8]
                            [--batches 2,4,8,16,32] [--seq 128] [--steps 6] [--mallopt]

Our step exactly as bench/train_step.py runs it (LoRA r=16 on q,k,v,up,down,
float32, AdamW, one device), in this process, over two sweeps: sequence
length at a fixed batch, batch size at a fixed sequence length. For each
point: the median step time, tokens/s, the FLOP count of the formula in
bench/train_step.py and its share of the machine's measured float32 matmul
peak, the compile time of the new shape, and the XLA compilations during the
timed steps (must be 0). Attention is quadratic in the sequence and the rest
linear, so tokens/s should stay flat in the batch and fall slowly with the
sequence; a fall with the batch points at memory traffic, not compute.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from tqdm import tqdm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--seqs", default="64,128,256,512")
    parser.add_argument("--batch", type=int, default=8, help="batch of the sequence sweep")
    parser.add_argument("--batches", default="2,4,8,16,32")
    parser.add_argument("--seq", type=int, default=128, help="sequence of the batch sweep")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per point")
    parser.add_argument("--mallopt", action="store_true",
                        help="keep freed memory for reuse (glibc mallopt), as python -m train")
    args = parser.parse_args(argv)

    import jax

    from bench.train_step import (CompileCounter, Ours, load_ours, make_batches, make_tiny_dir,
                                  matmul_peak, model_dims, step_flops)
    from flax_adapters.runtime import keep_freed_memory, set_matmul_precision

    if args.mallopt:
        keep_freed_memory()
    set_matmul_precision("auto")  # as python -m train by default (highest on CPU)
    counter = CompileCounter()
    tmp = tempfile.TemporaryDirectory()
    pre = load_ours(make_tiny_dir(tmp.name) if args.model == "tiny" else None)
    dims = model_dims(pre.config)
    points = [(args.batch, int(s)) for s in args.seqs.split(",")] + \
        [(int(b), args.seq) for b in args.batches.split(",")]
    rows, runs = [], {}
    for batch, seq in tqdm(points, desc="sweep", unit="shape"):
        if batch not in runs:
            runs[batch] = Ours(pre, batch, "lora", 0.05)
        run = runs[batch]
        batches = make_batches(dims["V"], batch, seq, count=2)
        mark = counter.mark()
        start = time.perf_counter()
        run(batches[0])
        first = time.perf_counter() - start
        compile_s = counter.since(mark)[1]
        mark = counter.mark()
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            run(batches[(i + 1) % 2])
            times.append(time.perf_counter() - start)
        rows.append((batch, seq, statistics.median(times), first, compile_s,
                     counter.since(mark)[0]))
    peak = matmul_peak()["jax"]
    tmp.cleanup()

    print(f"jax {jax.__version__}; model {args.model}; LoRA r=16 on q,k,v,up,down, float32, "
          f"one device; median of {args.steps} steps; float32 matmul peak {peak / 1e9:.0f} "
          f"GFLOP/s")
    print("| batch | seq | tokens | step s | tokens/s | GFLOP/step | % of matmul peak | "
          "first call s | XLA compile s | recompiles |\n|---|---|---|---|---|---|---|---|---|---|")
    for batch, seq, t, first, compile_s, recompiles in rows:
        flops = step_flops(dims, batch, seq)["step"]
        print(f"| {batch} | {seq} | {batch * seq} | {t:.3f} | {batch * seq / t:.0f} | "
              f"{flops / 1e9:.1f} | {100 * flops / t / peak:.0f}% | {first:.1f} | "
              f"{compile_s:.1f} | {recompiles} |")


if __name__ == "__main__":
    main()
