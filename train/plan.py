"""`python -m train --dry_run`: what a run will hold on each device, before
it runs. Nothing is loaded or allocated: shapes come from `jax.eval_shape`,
shardings from an abstract mesh, and the model's shape from its config.json
(a local directory's, a GGUF header, `model.config_json`, or the table of
published configs below), never from its weights.

Memory per device, in this order (what `train.loop.build` and the jitted
`flax_adapters.step.train_step` hold):

    frozen base   every base leaf at model.param_dtype, sharded by its logical
                  axes (flax_adapters/sharding.py RULES on the mesh)
    adapter       the trainable leaves, float32, sharded like their kernel
    optimizer     the optax state of `train.loop.optimizer` (AdamW: two float32
                  moments per trainable leaf, sharded like it; a few scalars)
    gradients     two trainable-sized float32 trees: the accumulator of the
                  micro-batch scan and the gradient of the current micro-batch
    activations   A below, for one micro-batch (micro_batch_size / (data x fsdp)
                  rows per device) at the longest bucket, cutoff_len tokens

Activations. Let R(n) be the bytes of the residuals `jax.vjp` keeps for the
backward pass of the training loss (flax_adapters.step.token_loss with dropout on) of
the same model cut to n layers: the outputs of operations it saves, not the
parameters, inputs or constants. R is counted exactly, by tracing the loss
with abstract inputs (`residual_bytes`), so it follows the model family, the
adapter's sites, dropout masks, prefix slots and the dtypes. Then

    per layer   rho = R(2) - R(1)            head and embeddings   eta = R(1) - rho
    remat off   A = eta + L * rho + rho
    remat on    A = eta' + L * rho' + 3 * rho      (rho', eta': the same with remat)

Without remat the L layers keep their residuals, and the backward of one
layer holds about one layer's worth more (cotangents and temporaries). With
remat they keep only their inputs (rho'); the layer being differentiated is
recomputed (rho) and its backward needs about two layers' worth more, as
measured. Checked against XLA's buffer assignment of the compiled train step
of tiny models (`compiled.memory_analysis()`, tests/test_plan.py): measured
/ estimate was 0.62-1.12 in float32 over LoRA (with dropout), series,
parallel and prefix, remat off and on; the estimate errs high where XLA fuses
residuals away (series, prefix: ~0.65). In bfloat16 on CPU it was 1.16 (remat
off) and 1.52 (remat on): XLA:CPU keeps float32 copies of bfloat16 work;
TPUs and GPUs need not, but no such device was at hand to measure. The CPU backend's default (concurrency-optimised)
scheduler hoists the recomputation, so there remat saves almost nothing
(measured: 79.7 vs 85.3 KB per token on an 8-layer model); with
`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false` it does.

With tensor > 1 the activations are not divided by the tensor axis (how far
XLA shards them there depends on its propagation): an upper bound.

The dry run's plan ends with the same recipe re-planned on two reference machines
(REFERENCE_MACHINES): a TPU v5e-8 (fsdp over its 8 chips of 16 GiB; the
micro-batch raised to the smallest multiple of 8 rows that divides the
batch) and one 80 GB GPU (one device, the recipe's micro-batch), each with a
bfloat16 and an NF4 base. Each verdict is the full plan of that mesh,
computed from its shardings like the plan above it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import pathlib
import re
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp

import flax_adapters as fa
from flax_adapters import sharding, tree
from flax_adapters.adapters.axes import adapter_axes
from flax_adapters.models import abstract_params, config_from_hf, logical_axes, model_class
from flax_adapters.quant.params import QuantConfig, quantize_params
from flax_adapters.step import optimizer_shardings, token_loss
from flax_adapters.sharding import MeshConfig
from train import data as data_lib
from train.config import DEFAULT_STEPS, ModelConfig, TrainConfig, resolve_steps
from train.loop import optimizer

GiB = 2 ** 30

# The shape fields of the config.json of the paper's base models as
# published on the hub (the hub ids of LLM-Adapters' commands, and today's
# Qwen3, Gemma 2, Phi-3 and Mixtral), for planning
# without a hub; token ids are left out (the plan needs none). "default" is
# the embedded SmolLM2-135M-Instruct, as its GGUF header gives it. The test
# tests/test_recipes.py checks each against an independent count
# (transformers' model on the meta device, and the GGUF file itself).
PUBLISHED_CONFIGS: dict[str, dict] = {
    "yahma/llama-7b-hf": {
        "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "rms_norm_eps": 1e-06, "vocab_size": 32000, "max_position_embeddings": 2048},
    "yahma/llama-13b-hf": {
        "model_type": "llama", "hidden_act": "silu", "hidden_size": 5120,
        "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
        "rms_norm_eps": 1e-06, "vocab_size": 32000, "max_position_embeddings": 2048},
    "bigscience/bloomz-7b1": {
        "model_type": "bloom", "hidden_size": 4096, "n_head": 32, "n_layer": 30,
        "layer_norm_epsilon": 1e-05, "apply_residual_connection_post_layernorm": False,
        "vocab_size": 250880},
    "EleutherAI/gpt-j-6b": {
        "model_type": "gptj", "activation_function": "gelu_new", "n_embd": 4096, "n_head": 16,
        "n_layer": 28, "n_positions": 2048, "rotary_dim": 64, "layer_norm_epsilon": 1e-05,
        "tie_word_embeddings": False, "vocab_size": 50400},
    "Qwen/Qwen3-8B": {
        "model_type": "qwen3", "hidden_act": "silu", "hidden_size": 4096, "head_dim": 128,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "vocab_size": 151936},
    "google/gemma-2-9b": {
        "model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584,
        "head_dim": 256, "intermediate_size": 14336, "num_hidden_layers": 42,
        "num_attention_heads": 16, "num_key_value_heads": 8, "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "max_position_embeddings": 8192,
        "vocab_size": 256000},
    "microsoft/Phi-3-mini-4k-instruct": {
        "model_type": "phi3", "hidden_act": "silu", "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "sliding_window": 2047, "tie_word_embeddings": False, "vocab_size": 32064},
    "mistralai/Mixtral-8x7B-v0.1": {
        "model_type": "mixtral", "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": False, "vocab_size": 32000},
    "default": {
        "model_type": "llama", "hidden_act": "silu", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
        "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True},
}

# Memory per device (GiB) of accelerators by the names users give or
# `jax.Device.device_kind` reports (lower case, spaces and "tpu"/"nvidia" removed).
DEVICE_MEMORY_GIB: dict[str, float] = {
    "v4": 32, "v5e": 16, "v5lite": 16, "v5litepod": 16, "v5p": 95, "v5": 95, "v6e": 32,
    "v6lite": 32, "a100-40gb": 40, "a100-80gb": 80, "h100": 80, "h100-80gb": 80, "l4": 24,
    "t4": 16,
}


def device_memory_gib(kind: str) -> float | None:
    """Memory of a device kind ('TPU v4', 'v5e', 'A100-80GB', 'NVIDIA H100 80GB HBM3'), or
    None when unknown."""
    k = re.sub(r"tpu|nvidia|\s|_", "", kind.lower())
    if k in DEVICE_MEMORY_GIB:
        return DEVICE_MEMORY_GIB[k]
    gpu, size = re.search(r"a100|h100", k), re.search(r"(40|80)gb", k)
    if gpu:
        return float(size.group(1)) if size else 40.0 if gpu.group() == "a100" else 80.0
    return None


class Machine(NamedTuple):
    """A machine every plan is also checked on: its devices, the mesh a run
    there takes (fsdp over a TPU host's chips: the frozen base is sharded, not
    copied), and the memory of each device."""
    name: str
    num_devices: int
    mesh: MeshConfig
    memory_gib: float


# TPU v5e: 16 GiB of HBM2 per chip, 8 chips on one v5e-8 host (Google Cloud's v5e
# page). 80 GB GPUs: an A100 80GB has 81920 MiB (80 GiB); an H100 80GB reports
# 81559 MiB (79.6 GiB) in nvidia-smi, so a verdict within 0.4 GiB of 80 is
# optimistic there. JAX on a GPU may pool less than all of it (75% by default
# in the versions whose XLA_PYTHON_CLIENT_MEM_FRACTION caps the pool; the
# default policy changed across versions): the verdict is against the memory.
REFERENCE_MACHINES: tuple[Machine, ...] = (
    Machine("TPU v5e-8 (8 x 16 GiB)", 8, MeshConfig(data=1, fsdp=8, tensor=1), 16.0),
    Machine("one 80 GB GPU", 1, MeshConfig(data=1, fsdp=1, tensor=1), 80.0),
)
# The bases each machine is checked with: bfloat16 storage, and NF4 (QLoRA)
# kernels over it; compute stays the recipe's.
REFERENCE_BASES: tuple[str, ...] = ("none", "nf4")


# ----------------------------------------------------------------------------- model


def hf_config(model: ModelConfig) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) for `model`, reading no weights."""
    if model.config_json:
        p = pathlib.Path(model.config_json).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"model.config_json {str(p)!r} does not exist; pass the path "
                                    "of the model's config.json")
        return json.loads(p.read_text()), str(p)
    if model.path in PUBLISHED_CONFIGS:
        where = "the embedded SmolLM2-135M-Instruct" if model.path == "default" else \
            "the published config.json (planner table)"
        return PUBLISHED_CONFIGS[model.path], where
    p = pathlib.Path(model.path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: no config.json; expected a Hugging Face model directory")
        return json.loads((p / "config.json").read_text()), str(p / "config.json")
    if p.is_file() and p.suffix == ".gguf":
        from flax_adapters.checkpoints.gguf import read_gguf_config
        return read_gguf_config(p), f"{p} (GGUF header)"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model.path):
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(model.path, "config.json")
        except Exception as e:  # noqa: BLE001 -- any hub failure means the same to the user
            raise FileNotFoundError(
                f"cannot read the config.json of {model.path!r} ({type(e).__name__}: the hub "
                f"may be unreachable); pass model.config_json=/path/to/config.json. Known "
                f"without a hub: {', '.join(k for k in PUBLISHED_CONFIGS if k != 'default')}"
            ) from None
        return json.loads(pathlib.Path(path).read_text()), f"{model.path} (hub config.json)"
    raise FileNotFoundError(f"model path {model.path!r} does not exist; pass a Hugging Face model "
                            "directory, a .gguf file or a hub id")


@functools.lru_cache(maxsize=16)
def base_shapes(model_cfg: Any) -> tuple[dict, dict]:
    """(abstract base params, their logical axes) of the full model.

    Traced once for a one-layer model and repeated for every layer: the
    decoder stack (models/decoder.py) builds L identical layers, and the
    embeddings and head do not depend on L, so this equals
    `abstract_params(model_cfg)` (tests/test_recipes.py checks it on the paper
    models) at a fraction of the tracing time of 30-40 layers."""
    one = dataclasses.replace(model_cfg, num_hidden_layers=1)

    def expand(t: dict) -> dict:
        out = {k: v for k, v in t.items() if k != "layers_0"}
        out.update({f"layers_{i}": t["layers_0"] for i in range(model_cfg.num_hidden_layers)})
        return out

    return expand(abstract_params(one)), expand(logical_axes(one))


def cast_shapes(shapes: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


# ----------------------------------------------------------------------- activations


@contextlib.contextmanager
def _quiet_targeting():
    """Silences the adapter-targeting log for injections that are not the run's own."""
    log = logging.getLogger("flax_adapters.adapters.targeting")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def residual_bytes(model_cfg: Any, adapter_cfg: Any, *, batch: int, seq_len: int,
                   compute_dtype: str = "float32", param_dtype: str = "float32",
                   remat: bool = False) -> int:
    """R: bytes of the activations `jax.vjp` saves for the backward pass of the
    training loss at (batch, seq_len), traced with abstract inputs only. The
    gradient is taken with respect to the trainable leaves, as the train
    step takes it; saved parameters, inputs and constants are not counted."""
    model_type = model_cfg.model_type
    base = cast_shapes(base_shapes(model_cfg)[0], _dtype(param_dtype))
    with _quiet_targeting():  # the cut models' sites are not the run's
        full = jax.eval_shape(
            lambda b: fa.inject(b, adapter_cfg, jax.random.key(0), model_type), base)
    frozen, trainable = fa.split(full, adapter_cfg, model_type)
    trainable = cast_shapes(trainable, jnp.float32)
    model = model_class(model_cfg)(model_cfg, dtype=_dtype(compute_dtype),
                                   settings=fa.settings_for(adapter_cfg, model_type),
                                   remat=remat)
    rows = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)

    def pullback(trainable, frozen, tokens, valid, loss_mask):
        def loss(t):
            return token_loss(model, tree.combine(frozen, t), tokens, valid, loss_mask,
                              jax.random.key(0), deterministic=False)[0]
        return jax.vjp(loss, trainable)[1]  # a pytree whose leaves are the residuals

    jaxpr = jax.make_jaxpr(pullback)(trainable, frozen, rows, mask, mask).jaxpr
    not_activations = set(jaxpr.invars) | set(jaxpr.constvars)
    seen, total = set(), 0
    for v in jaxpr.outvars:
        if isinstance(v, jax.extend.core.Literal) or v in not_activations or v in seen:
            continue
        seen.add(v)
        total += math.prod(v.aval.shape) * v.aval.dtype.itemsize
    return total


@functools.lru_cache(maxsize=64)  # a plan and its reference machines share micro-batches
def activation_bytes(model_cfg: Any, adapter_cfg: Any, *, batch: int, seq_len: int,
                     compute_dtype: str, param_dtype: str, remat: bool) -> int:
    """A of the module docstring."""
    def r(layers: int, with_remat: bool) -> int:
        cut = dataclasses.replace(model_cfg, num_hidden_layers=layers)
        return residual_bytes(cut, adapter_cfg, batch=batch, seq_len=seq_len,
                              compute_dtype=compute_dtype, param_dtype=param_dtype,
                              remat=with_remat)

    n = model_cfg.num_hidden_layers
    r1, r2 = r(1, False), r(2, False)
    rho, eta = r2 - r1, 2 * r1 - r2
    if not remat:
        return eta + n * rho + rho
    q1, q2 = r(1, True), r(2, True)
    return (2 * q1 - q2) + n * (q2 - q1) + 3 * rho

# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    model_source: str
    model_type: str
    total_params: int
    trainable_params: int
    num_devices: int
    mesh: dict           # {'data': n, 'fsdp': n, 'tensor': n}
    micro_per_device: int
    seq_len: int
    accumulation: int
    steps: str           # how many optimizer steps, and where the number comes from
    memory: dict         # {group: bytes per device}, in the order of the module docstring
    tensors: list        # rows of the sharding table
    device: str          # the device's name, or how its memory was given
    device_memory: int | None  # bytes per device, None when unknown
    notes: tuple = ()
    references: tuple = ()  # a Fit per reference machine and base

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory


@functools.lru_cache(maxsize=8)
def _quantized_shapes(model_cfg: Any, param_dtype: str, quant_cfg: QuantConfig) -> dict:
    base = cast_shapes(base_shapes(model_cfg)[0], _dtype(param_dtype))
    return jax.eval_shape(lambda b: quantize_params(b, quant_cfg), base)


def _per_device_bytes(shapes: Any, shardings: Any) -> int:
    return sum(math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize for x, sh in
               zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)))


def _tensor_rows(shapes: dict, names: dict, shardings: dict, role: str) -> list:
    """One row per distinct tensor, layers folded: ('layers_*/mlp/up_proj/kernel', count,
    shape, dtype, logical axes, PartitionSpec, per-device shape, role)."""
    rows: dict = {}
    axes_leaves = jax.tree_util.tree_leaves(names, is_leaf=lambda x: isinstance(x, tuple))
    leaves = zip(jax.tree_util.tree_flatten_with_path(shapes)[0], axes_leaves,
                 jax.tree_util.tree_leaves(shardings))
    for (path, x), ax, sh in leaves:
        # dict keys, and a quantized leaf's arrays by attribute (kernel/codes, ...)
        name = re.sub(r"^layers_\d+", "layers_*", "/".join(
            str(getattr(k, "key", getattr(k, "name", k))) for k in path))
        key = (name, x.shape, str(x.dtype), ax, str(sh.spec), role)
        count, per = rows.get(key, (0, sh.shard_shape(x.shape)))
        rows[key] = (count + 1, per)
    return [(name, count, shape, dtype, ax, spec, per, role)
            for (name, shape, dtype, ax, spec, role), (count, per) in rows.items()]


def _count_records(path: str, embedded_train_size: int) -> int | None:
    """Training records in data.path without tokenizing (None: cannot tell
    before the run: hub datasets, missing files)."""
    if path == data_lib.EMBEDDED_ARITH:
        return embedded_train_size
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        return None
    text = p.read_text(encoding="utf-8-sig")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:  # JSON lines
        records = None
    if isinstance(records, list):
        return len(records)
    return sum(1 for line in text.splitlines() if line.strip())  # JSON lines (one: a dict)


def _steps(cfg: TrainConfig) -> tuple[int, str]:
    """(steps to build the optimizer with, how the run will count them)."""
    if cfg.steps is not None:
        return cfg.steps, f"{cfg.steps:,} (steps)"
    if cfg.epochs is None:
        return DEFAULT_STEPS, f"{DEFAULT_STEPS} (the default: neither steps nor epochs given)"
    n = _count_records(cfg.data.path, cfg.data.embedded_train_size)
    if n is None:
        return 1, (f"{cfg.epochs:g} epochs x (training records // {cfg.batch_size}), counted "
                   f"when the run reads {cfg.data.path}")
    per_epoch = (n - max(cfg.data.val_set_size, 0)) // cfg.batch_size
    steps = resolve_steps(cfg, per_epoch).steps
    return steps, (f"{steps:,} = ceil({cfg.epochs:g} epochs x {per_epoch:,} steps) of "
                   f"({n:,} - {cfg.data.val_set_size} val) records // {cfg.batch_size}")


class AbstractSplit(NamedTuple):
    frozen: dict
    trainable: dict
    frozen_names: dict  # logical axes of each leaf
    trainable_names: dict
    frozen_sh: dict  # NamedShardings on the mesh
    trainable_sh: dict


def abstract_split(base: dict, base_axes: dict, adapter_cfg: Any, model_type: str,
                   mesh: Any) -> AbstractSplit:
    """`base` (shapes) with the adapter injected and split as `train.loop.build`
    splits it, the trainable leaves in float32 as the run keeps them, with
    their logical axes and shardings on `mesh`. Nothing is allocated."""
    full = jax.eval_shape(lambda b: fa.inject(b, adapter_cfg, jax.random.key(0), model_type),
                          base)
    is_trainable = fa.trainable(adapter_cfg, model_type)
    frozen, trainable = tree.split(full, is_trainable)
    trainable = cast_shapes(trainable, jnp.float32)
    frozen_names, trainable_names = tree.split(adapter_axes(full, base_axes), is_trainable)
    return AbstractSplit(frozen, trainable, frozen_names, trainable_names,
                         sharding.tree_shardings(frozen_names, frozen, mesh),
                         sharding.tree_shardings(trainable_names, trainable, mesh))


class Fit(NamedTuple):
    """The verdict of a recipe on a reference machine with one base."""
    machine: str
    base: str
    mesh: dict
    micro_batch_size: int | None  # as the run there would set it; None: none works
    micro_per_device: int | None
    total: int | None  # bytes per device
    device_memory: int
    fits: bool
    verdict: str


def reference_micro_batch(cfg: TrainConfig, batch_shards: int) -> int | None:
    """The micro_batch_size a run on `batch_shards` batch shards takes: the
    recipe's own when they divide it, else the smallest multiple of them above
    it that divides batch_size (fewer, larger micro-batches: the same loss);
    None when batch_size has no such divisor."""
    return next((m for m in range(cfg.micro_batch_size, cfg.batch_size + 1)
                 if m % batch_shards == 0 and cfg.batch_size % m == 0), None)


def reference_fits(cfg: TrainConfig, machines: tuple[Machine, ...] = REFERENCE_MACHINES,
                   bases: tuple[str, ...] = REFERENCE_BASES) -> tuple[Fit, ...]:
    """`cfg` re-planned on each machine (its mesh, the micro-batch it needs)
    with each base (bfloat16 storage; "nf4": NF4 kernels and embeddings)."""
    fits = []
    for machine in machines:
        shards = machine.mesh.data * machine.mesh.fsdp
        micro = reference_micro_batch(cfg, shards)
        for quantize in bases:
            base = "bfloat16" + ("" if quantize == "none" else f" + {quantize}")
            memory = int(machine.memory_gib * GiB)
            mesh = dataclasses.asdict(machine.mesh)
            if micro is None:
                fits.append(Fit(machine.name, base, mesh, None, None, None, memory, False,
                                f"cannot run: batch_size={cfg.batch_size} does not split "
                                f"into micro-batches of a multiple of {shards} rows"))
                continue
            model = dataclasses.replace(cfg.model, param_dtype="bfloat16", quantize=quantize)
            try:
                with _quiet_targeting():  # the same sites as the plan's own, logged once
                    p = make_plan(dataclasses.replace(cfg, model=model, mesh=machine.mesh,
                                                      micro_batch_size=micro),
                                  num_devices=machine.num_devices,
                                  device_memory_gb=machine.memory_gib)
            except ValueError as e:  # e.g. a dimension the mesh cannot shard
                fits.append(Fit(machine.name, base, mesh, micro, None, None, memory, False,
                                f"cannot plan: {e}"))
                continue
            share = p.total / memory
            verdict = f"fits ({100 * share:.0f}%)" if p.fits else \
                f"DOES NOT FIT ({100 * share:.0f}%)"
            fits.append(Fit(machine.name, base, mesh, micro, p.micro_per_device, p.total,
                            memory, bool(p.fits), verdict))
    return tuple(fits)


def make_plan(cfg: TrainConfig, *, num_devices: int, device_kind: str | None = None,
              device_memory_gb: float | None = None, references: bool = False) -> Plan:
    """The plan of `cfg` on `num_devices` devices. Device memory: `device_memory_gb`
    (GiB), else the known memory of `device_kind`, else unknown. `references`:
    also re-plan it on REFERENCE_MACHINES with REFERENCE_BASES (`reference_fits`;
    four more plans, ~0.7 s: `python -m train --dry_run` asks for them)."""
    hf, source = hf_config(cfg.model)
    model_cfg = config_from_hf(hf)
    model_type = model_cfg.model_type
    adapter_cfg = cfg.adapter.build()
    mesh = sharding.abstract_mesh(cfg.mesh, num_devices)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.micro_batch_size % batch_shards:
        raise ValueError(f"micro_batch_size={cfg.micro_batch_size} must be divisible by data x "
                         f"fsdp = {batch_shards} on this mesh; raise micro_batch_size or change "
                         "mesh.*")

    base, base_axes = base_shapes(model_cfg)
    base = cast_shapes(base, _dtype(cfg.model.param_dtype))
    # As the run loads it: quantized (codes, block scales: exact bytes), the
    # adapter's modules_to_save kept in float.
    quant_cfg = cfg.model.quant_config(getattr(adapter_cfg, "modules_to_save", ()))
    if quant_cfg is not None:
        quant_cfg = dataclasses.replace(quant_cfg, model_type=model_type)
        base = _quantized_shapes(model_cfg, cfg.model.param_dtype, quant_cfg)
    frozen, trainable, frozen_names, trainable_names, frozen_sh, trainable_sh = abstract_split(
        base, base_axes, adapter_cfg, model_type, mesh)

    steps, steps_text = _steps(cfg)
    opt = optimizer(dataclasses.replace(cfg, steps=steps))
    opt_state = jax.eval_shape(opt.init, trainable)
    opt_sh = optimizer_shardings(opt, trainable, trainable_sh, mesh)

    micro = cfg.micro_batch_size // batch_shards
    adapter = _per_device_bytes(trainable, trainable_sh)
    memory = {
        f"frozen base ({cfg.model.param_dtype}"
        + ("" if quant_cfg is None else f", {quant_cfg.kind} kernels and embeddings"
           if quant_cfg.embeddings else f", {quant_cfg.kind} kernels") + ")":
            _per_device_bytes(frozen, frozen_sh),
        "adapter (float32)": adapter,
        "optimizer state (AdamW: 2 float32 moments)": _per_device_bytes(opt_state, opt_sh),
        "gradients (float32: accumulator + micro-batch)": 2 * adapter,
        f"activations ({micro} x {cfg.data.cutoff_len} tokens, compute "
        f"{cfg.model.compute_dtype}, remat {'on' if cfg.model.remat else 'off'})":
            activation_bytes(model_cfg, adapter_cfg, batch=micro, seq_len=cfg.data.cutoff_len,
                             compute_dtype=cfg.model.compute_dtype,
                             param_dtype=cfg.model.param_dtype, remat=cfg.model.remat),
    }
    tensors = (_tensor_rows(frozen, frozen_names, frozen_sh, "frozen") +
               _tensor_rows(trainable, trainable_names, trainable_sh, "trainable"))

    if device_memory_gb is not None:
        device, device_memory = f"{device_memory_gb:g} GiB (--device_memory_gb)", \
            int(device_memory_gb * GiB)
    elif device_kind is not None:
        gib = device_memory_gib(device_kind)
        device = device_kind if gib is None else f"{device_kind} ({gib:g} GiB)"
        device_memory = None if gib is None else int(gib * GiB)
    else:
        device, device_memory = "unknown", None

    notes = []
    if cfg.model.remat and device_kind and device_kind.lower() == "cpu":
        notes.append("remat on the CPU backend saves memory only with XLA_FLAGS="
                     "--xla_cpu_enable_concurrency_optimized_scheduler=false (train/plan.py)")
    if mesh.shape["tensor"] > 1:
        notes.append("activations are not divided by the tensor axis: an upper bound")
    try:
        data_lib.check_source(cfg.data.path)
    except FileNotFoundError:
        notes.append(f"data.path {cfg.data.path!r} does not exist yet: the run will stop there")
    return Plan(model=cfg.model.path, model_source=source, model_type=model_type,
                total_params=tree.num_params(frozen) + tree.num_params(trainable),
                trainable_params=tree.num_params(trainable), num_devices=num_devices,
                mesh=dict(mesh.shape), micro_per_device=micro, seq_len=cfg.data.cutoff_len,
                accumulation=cfg.batch_size // cfg.micro_batch_size, steps=steps_text,
                memory=memory, tensors=tensors, device=device, device_memory=device_memory,
                notes=tuple(notes), references=reference_fits(cfg) if references else ())

# ----------------------------------------------------------------------------- output


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f}"


def _table(header: tuple, rows: list) -> list[str]:
    cells = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(cells[0]), line(tuple("-" * w for w in widths))] + [line(r) for r in cells[1:]]


def format_plan(p: Plan) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items())
    out = [
        f"model        {p.model} ({p.model_type}; shape from {p.model_source})",
        f"parameters   {p.total_params:,} total, {p.trainable_params:,} trainable "
        f"({100 * p.trainable_params / p.total_params:.4f}%)",
        f"mesh         {p.num_devices} devices: {mesh}",
        f"batch        {p.micro_per_device} rows x {p.seq_len} tokens per device per "
        f"micro-batch; {p.accumulation} micro-batches per step",
        f"steps        {p.steps}",
        "",
        "memory per device                                                     GiB",
    ]
    for name, n in p.memory.items():
        out.append(f"  {name:<68}{_gib(n)}")
    out.append(f"  {'total':<68}{_gib(p.total)}")
    if p.device_memory is None:
        out.append(f"  device memory: {p.device}; pass --device (e.g. v4, v5e, a100-80gb, h100) "
                   "or --device_memory_gb to check the fit")
    else:
        verdict = "fits" if p.fits else "DOES NOT FIT"
        out.append(f"  {'device memory: ' + p.device:<68}{_gib(p.device_memory)}   {verdict} "
                   f"({100 * p.total / p.device_memory:.0f}%)")
    if p.references:
        out += ["", "fit on reference machines (re-planned: the mesh there, the micro-batch it "
                "needs, each base)"]
        rows = [(f.machine, f.base, " x ".join(f"{k}={v}" for k, v in f.mesh.items()),
                 "-" if f.micro_batch_size is None else
                 f"{f.micro_batch_size} ({f.micro_per_device} per device)",
                 "-" if f.total is None else _gib(f.total).strip(),
                 _gib(f.device_memory).strip(), f.verdict) for f in p.references]
        out += ["  " + r for r in _table(("machine", "base", "mesh", "micro_batch_size",
                                          "GiB per device", "of GiB", "verdict"), rows)]
    out += ["", "sharding (logical axes -> mesh axes, flax_adapters/sharding.py RULES)"]
    rows = [(name, f"x{count}" if count > 1 else "", "x".join(map(str, shape)) or "()",
             dtype, "(" + ", ".join(str(a) for a in ax) + ")", spec,
             "x".join(map(str, per)) or "()", role)
            for name, count, shape, dtype, ax, spec, per, role in p.tensors]
    out += ["  " + r for r in _table(("tensor", "n", "shape", "dtype", "logical axes",
                                      "mesh spec", "per device", "role"), rows)]
    out.append("  optimizer moments: sharded like the trainable leaves; batch: "
               "PartitionSpec(None, ('data', 'fsdp'), None) over (accumulation, rows, tokens)")
    out += [f"note: {n}" for n in p.notes]
    return "\n".join(out)
