"""Collective traffic of the sharded train step, read from the compiled HLO.

    python -m bench.collectives [--model tiny|smollm2] [--method lora|full|...]
                                [--batch 16] [--seq 128] [--mesh data=8 --mesh fsdp=8 ...]

For each mesh of 8 devices (the process re-runs itself with
XLA_FLAGS=--xla_force_host_platform_device_count=8 when it has fewer), our
train step is jitted exactly as `train.loop.compile_steps` jits it (explicit
in/out shardings from the logical-axis rules, donated state), lowered on
abstract arrays (nothing is allocated, so real model shapes cost only the
compile) and compiled by XLA. Every all-gather, reduce-scatter, all-reduce,
all-to-all and collective-permute of the optimised HLO is counted with the
bytes of its full (unsharded) buffer on one device: an all-gather's output,
a reduce-scatter's input, an all-reduce's operand.

The expectation, from the shardings and the model shape (float32 everywhere):
- all-gather = every parameter sharded over fsdp, once (the forward gathers
  it, the backward reuses the gathered copy), except an untied embedding
  table whose vocabulary is not split over tensor: its lookup moves only
  the looked-up rows;
- gradient reduction (reduce-scatter + all-reduce) = the trainable
  parameters' bytes, divided by the tensor axis for leaves split over it;
- tensor parallelism (tensor > 1), Megatron-style, in units of one
  (tokens per device x d) activation: in the forward one all-reduce after
  each row-parallel matmul (o_proj, down_proj) and one for the
  vocabulary-sharded embedding lookup, 2 L + 1; in the backward one per
  column-parallel matmul (q, k, v, gate, up: XLA:CPU reduces each input
  gradient on its own; a pipeline that reassociates all-reduces, as TPU's
  does, needs 2 per layer) and one for the head's input gradient, less layer
  0's q, k, v when the embedding is frozen: 5 L + 1 - 3. LoRA adds a
  (tokens x r) partial sum beside some of them, not counted.
Small collectives (scalars: loss, token count, gradient norm) are listed in
their own column.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

MESHES = ("data=8", "fsdp=8", "data=2,tensor=4", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2")
OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4, "u32": 4,
               "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "s4": 0.5, "u4": 0.5}
SMALL = 1024  # bytes: scalars and tiny vectors are reported apart
# one HLO instruction: "%name = <shape> <op>(<operands>), ..." (op may be "-start" async)
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(OPS)
                         + r")(?:-start)?\((.*)$")
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (a shape or a tuple of them)."""
    total = 0
    for dtype, dims in SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += int(n * DTYPE_BYTES[dtype])
    return total


def collectives(hlo: str) -> list[dict]:
    """Each collective of an optimised HLO module: op, bytes of its full buffer,
    group size, and the computation it sits in."""
    out, computation = [], None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            computation = head.group(1)
            continue
        m = INSTRUCTION.match(line)
        if not m:
            continue
        result, op, rest = m.groups()
        groups = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
        size = len(groups.group(1).split(",")) if groups else None
        iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)  # iota form [groups,size]
        if iota:
            size = int(iota.group(2))
        named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
        if named:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the listed axes' sizes
            sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
            size = 1
            for axis in re.findall(r"'(\w+)'", named.group(2)):
                size *= int(sizes[axis])
        # operands are written without shapes: a reduce-scatter's input is its
        # output times the group
        nbytes = shape_bytes(result) * (size or 1 if op == "reduce-scatter" else 1)
        out.append({"op": op, "bytes": nbytes, "group": size, "computation": computation})
    return out


def model_config(which: str):
    from flax_adapters.models import config_from_hf
    from train.plan import PUBLISHED_CONFIGS

    if which == "tiny":
        from bench.train_step import TINY
        return config_from_hf({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                               **TINY})
    return config_from_hf(PUBLISHED_CONFIGS["default"])


def mesh_config(text: str):
    from flax_adapters.sharding import MeshConfig
    sizes = dict(data=1, fsdp=1, tensor=1)
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in sizes or not value.isdigit():
            raise SystemExit(f"--mesh {text!r}: expected data=N,fsdp=N,tensor=N (any subset)")
        sizes[key] = int(value)
    return MeshConfig(**sizes)


def compiled_step(model_cfg, method: str, mesh_cfg, batch: int, seq: int, *,
                  dropout: float = 0.0, remat: bool = False, devices=None):
    """(XLA's compiled train step, facts for the expectation) on `mesh_cfg`
    over `devices` (default: all), lowered on abstract arrays."""
    import jax
    import jax.numpy as jnp

    import flax_adapters as fa
    from bench.train_step import adapter_config
    from flax_adapters import sharding
    from flax_adapters.step import TrainState, optimizer_shardings
    from train import loop
    from train.config import OptimConfig, TrainConfig
    from train.plan import abstract_split, base_shapes, cast_shapes

    adapter_cfg = adapter_config(method, dropout)
    cfg = TrainConfig(steps=1000, batch_size=batch, micro_batch_size=batch,
                      optim=OptimConfig(lr=3e-4, weight_decay=0.0, max_grad_norm=1.0))
    mesh = sharding.make_mesh(mesh_cfg, devices)
    base, base_axes = base_shapes(model_cfg)
    model_type = model_cfg.model_type
    split = abstract_split(cast_shapes(base, jnp.float32), base_axes, adapter_cfg, model_type,
                           mesh)
    frozen, trainable, frozen_sh, trainable_sh = (split.frozen, split.trainable, split.frozen_sh,
                                                  split.trainable_sh)
    opt = loop.optimizer(cfg)
    opt_state = jax.eval_shape(opt.init, trainable)
    opt_sh = optimizer_shardings(opt, trainable, trainable_sh, mesh)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), trainable, opt_state)
    state_sh = TrainState(sharding.replicated(mesh), trainable_sh, opt_sh)
    model = fa.model_class(model_cfg)(model_cfg, dtype=jnp.float32,
                                      settings=fa.settings_for(adapter_cfg, model_type),
                                      remat=remat)
    setup = loop.Setup(model, None, adapter_cfg, model_type, mesh, frozen, state, state_sh,
                       frozen_sh, None)
    step, _, _ = loop.compile_steps(setup, cfg)
    rows = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
    flags = jax.ShapeDtypeStruct((1, batch, seq), jnp.bool_)
    compiled = step.lower(state, frozen, {"tokens": rows, "valid": flags, "loss_mask": flags},
                          jax.random.key(0)).compile()

    def sharded_bytes(shapes, shs, skip=()):
        """(bytes of the leaves split over fsdp, bytes of all leaves per tensor shard)."""
        on_fsdp = per_tensor = 0
        for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(shapes),
                                 jax.tree_util.tree_leaves(shs)):
            used = {a for entry in sh.spec if entry for a in
                    (entry if isinstance(entry, tuple) else (entry,))}
            nbytes = x.size * x.dtype.itemsize // (mesh.shape["tensor"] if "tensor" in used else 1)
            if "fsdp" in used and path[0].key not in skip:
                on_fsdp += nbytes
            per_tensor += nbytes
        return on_fsdp, per_tensor

    # An untied embedding table whose vocabulary is not split over tensor is
    # never gathered: its lookup moves only the looked-up rows.
    skip = () if model_cfg.tie_word_embeddings or mesh.shape["tensor"] > 1 else ("embed_tokens",)
    trainable_fsdp, grads = sharded_bytes(trainable, trainable_sh)
    gathered = sharded_bytes(frozen, frozen_sh, skip)[0] + trainable_fsdp
    L, d = model_cfg.num_hidden_layers, model_cfg.hidden_size
    unit = batch * seq // (mesh.shape["data"] * mesh.shape["fsdp"]) * d * 4
    # forward: o_proj, down_proj per layer + the embedding lookup; backward: q, k,
    # v, gate, up per layer (not layer 0's q, k, v with a frozen embedding) + the head
    activations = ((2 * L + 1) + (5 * L + 1 - (0 if method == "full" else 3))) * unit \
        if mesh.shape["tensor"] > 1 else 0
    if mesh.shape["data"] * mesh.shape["fsdp"] == 1:
        grads = 0  # one batch shard: nothing to reduce
    return compiled, {"gather": gathered, "grads": grads, "activations": activations,
                      "mesh": dict(mesh.shape),
                      "trainable": sum(x.size for x in jax.tree_util.tree_leaves(trainable))}


def measure(model_cfg, method: str, mesh_text: str, batch: int, seq: int) -> tuple[str, dict]:
    """(HLO, {facts..., bytes: op -> bytes, count: op -> number, small, loops,
    measured, expected}) of the step on the mesh `mesh_text`."""
    compiled, facts = compiled_step(model_cfg, method, mesh_config(mesh_text), batch, seq)
    hlo = compiled.as_text()
    by_op, count, small, loops = collections.Counter(), collections.Counter(), 0, 0
    for c in collectives(hlo):
        loops += bool(c["computation"] and "body" in c["computation"])
        if c["bytes"] <= SMALL:
            small += c["bytes"]
            continue
        by_op[c["op"]] += c["bytes"]
        count[c["op"]] += 1
    return hlo, {**facts, "bytes": by_op, "count": count, "small": small, "loops": loops,
                 "measured": sum(by_op.values()),
                 "expected": facts["gather"] + facts["grads"] + facts["activations"]}


def mb(n: float) -> str:
    return f"{n / 2 ** 20:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--method", default="lora",
                        choices=("lora", "series", "parallel", "prefix", "full"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mesh", action="append", default=None,
                        help=f"data=N,fsdp=N,tensor=N over 8 devices (repeatable; default "
                             f"{' '.join(MESHES)})")
    parser.add_argument("--dump", help="directory to write each mesh's optimised HLO into")
    args = parser.parse_args(argv)

    flag = "--xla_force_host_platform_device_count=8"
    if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
        raise SystemExit(subprocess.call([sys.executable, "-m", "bench.collectives",
                                          *(argv if argv is not None else sys.argv[1:])],
                                         env=env))
    import jax
    from tqdm import tqdm

    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, have {jax.device_count()}: set XLA_FLAGS={flag}")
    model_cfg = model_config(args.model)
    meshes = args.mesh or list(MESHES)
    rows = []
    for text in tqdm(meshes, desc="compile", unit="mesh"):
        hlo, row = measure(model_cfg, args.method, text, args.batch, args.seq)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, text.replace(",", "_") + ".hlo"), "w") as f:
                f.write(hlo)
        rows.append(row)

    print(f"jax {jax.__version__}, {jax.device_count()} CPU devices; model {args.model} "
          f"({model_cfg.num_hidden_layers} layers, d={model_cfg.hidden_size}, vocab "
          f"{model_cfg.vocab_size}), method {args.method} "
          f"({rows[0]['trainable']:,} trainable), float32, batch {args.batch} x seq "
          f"{args.seq}; MiB per step on one device, measured (count) / expected")
    print("| mesh (data, fsdp, tensor) | all-gather | reduce-scatter | all-reduce | "
          "other | small (<=1 KiB) | expected gather | expected grads | expected activations |"
          " measured / expected |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, by_op, count = r["mesh"], r["bytes"], r["count"]
        other = sum(v for k, v in by_op.items() if k not in OPS[:3])
        ratio = f"{r['measured'] / r['expected']:.2f}" if r["expected"] else \
            ("-" if not r["measured"] else "inf")
        cell = {op: f"{mb(by_op[op])} ({count[op]})" for op in OPS[:3]}
        print(f"| {m['data']}, {m['fsdp']}, {m['tensor']} | {cell['all-gather']} | "
              f"{cell['reduce-scatter']} | {cell['all-reduce']} | {mb(other)} | "
              f"{r['small']} B | {mb(r['gather'])} | {mb(r['grads'])} | "
              f"{mb(r['activations'])} | {ratio} |"
              + (f" ({r['loops']} inside loop bodies: counted once)" if r["loops"] else ""))


if __name__ == "__main__":
    main()
