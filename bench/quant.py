"""Memory and LoRA train-step speed of a quantized frozen base (NF4, int8)
against float32 and bfloat16, on SmolLM2-135M-Instruct.

    python -m bench.quant [--batch 4] [--seq 128] [--steps 5]

Each base runs in its own worker process (bench/train_step.py's protocol):
the default GGUF loaded with `load_pretrained(dtype=..., quantize=...)`
(NF4: block 64 with double quantization; int8: per output channel; both
quantize the kernels and the tied embedding), then our LoRA train step
exactly as bench/train_step.py runs it (r=16 on q, k, v, up, down, AdamW,
float32 compute on every base, so the rows differ only in how the frozen
weights are stored and dequantized).

Memory, measured in each worker right after loading, before the step is
built:
- params: the exact bytes of the parameter tree (`quant.array.stored_bytes`,
  i.e. what the device arrays hold), and the bytes of every live device
  array of the process (`jax.live_arrays()`), which must agree.
- RSS: the process's resident anonymous memory (RssAnon, /proc) with only
  the parameters kept, minus the same before loading (after the imports and
  JAX start-up), each after `malloc_trim` (glibc otherwise keeps the pages
  of the loader's freed float32 tensors). It also holds the few compiled
  quantization functions, so it bounds the parameter memory from above.
  The peak while loading is reported too: the GGUF reader dequantizes the
  whole file to float32 before our loader converts it tensor by tensor.
- compiled code: two more workers quantize zero arrays of the model's
  shapes (nothing of them is kept) to measure what the compiled
  quantization functions alone leave resident -- a fixed cost, not
  proportional to the model, included in the RSS column.
Speed: the workers step interleaved (one step of each base per repetition),
median of the repetitions; ratios against float32. The first call (trace +
compile + one step) is reported separately.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
import types

from bench.train_step import Worker, say, make_batches, vm_mb

BASES = {  # name -> load_pretrained(dtype, quantize)
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "int8": ("float32", "int8"),
    "nf4": ("float32", "nf4"),
}


def resident_mb() -> float:
    """Anonymous resident memory (MB), after returning freed heap pages to the
    OS: glibc keeps the loader's freed float32 tensors otherwise."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return vm_mb("RssAnon") * 1.048576


def worker(args) -> None:
    import gguf  # noqa: F401 -- imported before the baseline, as the loader imports it
    import jax
    import jax.numpy as jnp
    import transformers  # noqa: F401 -- likewise (the GGUF tokenizer)

    from bench.train_step import Ours
    from flax_adapters.checkpoints import default_model_path, load_pretrained
    from flax_adapters.quant.array import stored_bytes
    from flax_adapters.runtime import set_matmul_precision

    set_matmul_precision("auto")  # as python -m train by default (highest on CPU)
    jnp.zeros(()).block_until_ready()  # start the runtime before the baseline
    before = resident_mb()
    dtype, quantize = BASES[args.worker]
    t0 = time.perf_counter()
    pre = load_pretrained(default_model_path(), dtype=dtype, quantize=quantize)
    jax.block_until_ready(pre.params)
    load_s, load_peak = time.perf_counter() - t0, vm_mb("VmHWM") * 1.048576
    # Keep the parameters only (the tokenizer is not parameter memory).
    pre = types.SimpleNamespace(params=pre.params, config=pre.config)
    after = resident_mb()
    param_bytes = stored_bytes(pre.params)
    live_bytes = sum(a.nbytes for a in jax.live_arrays())
    run = Ours(pre, args.batch, "lora", args.dropout)
    batches = make_batches(pre.config.vocab_size, args.batch, args.seq)
    del pre
    start = time.perf_counter()
    loss0 = run(batches[0])
    say(ready=True, first_s=time.perf_counter() - start, loss0=loss0, load_s=load_s,
         param_bytes=param_bytes, live_bytes=live_bytes, rss_params_mb=after - before,
         rss_load_peak_mb=load_peak)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "step":
            t0 = time.perf_counter()
            loss = run(batches[int(cmd[1]) % len(batches)])
            say(wall=time.perf_counter() - t0, loss=loss)
        elif cmd[0] == "done":
            say(rss_peak_mb=vm_mb("VmHWM") * 1.048576)
            return


def compile_worker(args) -> None:
    """RSS left by quantizing zero arrays of every leaf shape: the compiled code."""
    import jax
    import numpy as np

    from flax_adapters.checkpoints import default_model_path, load_pretrained
    from flax_adapters.quant.params import QuantConfig, quantize_leaf

    pre = load_pretrained(default_model_path())  # float32; only its shapes are used
    leaves = [(tuple(k.key for k in path), leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(pre.params)[0]]
    cfg = QuantConfig(COMPILE[args.worker])
    del pre
    before = resident_mb()
    for path, shape in leaves:
        jax.block_until_ready(quantize_leaf(path, np.zeros(shape, np.float32), cfg))
    say(ready=True, compile_rss_mb=resident_mb() - before)
    for line in sys.stdin:
        if line.split()[0] == "done":
            say(done=True)
            return


COMPILE = {"compile-int8": "int8", "compile-nf4": "nf4"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions per base")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--worker", choices=[*BASES, *COMPILE], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return (compile_worker if args.worker in COMPILE else worker)(args)

    load_start = os.getloadavg()[0]
    ready, workers = {}, {}
    for name in BASES:  # one at a time: a loading/compiling worker would slow the others
        workers[name] = Worker(name, args, None, dict(os.environ), module="bench.quant")
        ready[name] = workers[name].recv()
    times = {name: [] for name in BASES}
    for i in range(args.steps):
        for name, w in workers.items():
            w.send(f"step {i + 1}")
            times[name].append(w.recv()["wall"])
    done = {name: w.close() for name, w in workers.items()}
    compiled = {}
    for name in COMPILE:
        w = Worker(name, args, None, dict(os.environ), module="bench.quant")
        compiled[name.removeprefix("compile-")] = w.recv()["compile_rss_mb"]
        w.close()
    report(args, ready, done, times, load_start, compiled)


def report(args, ready, done, times, load_start, compiled):
    import jax

    f32, bf16 = ready["float32"]["param_bytes"], ready["bfloat16"]["param_bytes"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> float32 -> each base); jax {jax.__version__} "
          f"CPU, {os.cpu_count()} cores; load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"LoRA r=16 on q,k,v,up,down; batch {args.batch} x seq {args.seq}; float32 compute; "
          f"median of {args.steps} interleaved steps\n")
    print("| base | param bytes (MB) | vs bfloat16 | live device arrays (MB) | RSS of params "
          "(MB) | load s | first call s | step s | step vs float32 | first loss |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for name, r in ready.items():
        print(f"| {name} | {r['param_bytes'] / 1e6:.1f} | {r['param_bytes'] / bf16:.1%} | "
              f"{r['live_bytes'] / 1e6:.1f} | {r['rss_params_mb']:.0f} | "
              f"{r['load_s']:.1f} | {r['first_s']:.1f} | {med[name]:.3f} | "
              f"{med[name] / med['float32']:.2f}x | {r['loss0']:.4f} |")
    print(f"\nfloat32 params {f32 / 1e6:.1f} MB. Peak RSS while loading (MB): " + ", ".join(
        f"{k} {v['rss_load_peak_mb']:.0f}" for k, v in ready.items()) + "; over the whole "
        "run: " + ", ".join(f"{k} {v['rss_peak_mb']:.0f}" for k, v in done.items()))
    print("RSS left by the compiled quantization functions alone (MB): " + ", ".join(
        f"{k} {v:.0f}" for k, v in compiled.items()))
    nf4 = ready["nf4"]["param_bytes"] / bf16
    print(f"goal NF4 <= 30% of bfloat16: {nf4:.1%} -> {'met' if nf4 <= 0.30 else 'NOT met'}")


if __name__ == "__main__":
    main()
