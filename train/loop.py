"""`run(cfg)`: the whole of `python -m train`, as a table of contents.

the output directory's resume / overwrite policy (`check_output_dir`) ->
config -> model + tokenizer -> adapter inject -> data -> sharded state
(`build`, `place`) -> jitted train and eval steps (`compile_steps`) -> what
a resume continues from (`resume_point`) -> the step loop
with metrics, progress bar, periodic validation, checkpoints and
preemption (`train_steps`) -> the adapter export, loss curve, before/after
held-out accuracy and report (`finish`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import shutil
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

import flax_adapters as fa
from eval.generator import Generator
from eval.run import evaluate_task
from flax_adapters import sharding
from flax_adapters.adapters.axes import adapter_axes
from flax_adapters.checkpoints.atomic import write_text_atomically
from flax_adapters.models.registry import logical_axes
from flax_adapters.step import (TrainState, eval_step, make_optimizer, nonfinite_verdict,
                                optimizer_shardings, train_step)
from train import arith, distributed, preempt
from train import data as data_lib
from train.checkpoint import Checkpointer
from train.config import TrainConfig, resolve_steps, resume_mismatches, to_dict
from train.report import read_heldout, write_heldout, write_report

log = logging.getLogger("train")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


@dataclasses.dataclass
class Setup:
    """Everything built once before the first step."""

    model: nn.Module
    tokenizer: Any
    adapter_cfg: Any
    model_type: str
    mesh: Any
    frozen: dict
    state: TrainState
    state_shardings: Any
    frozen_shardings: Any
    prepared: data_lib.Prepared
    hf_config: dict | None = None  # the base's config.json (full fine-tuning exports a model)


def _is_primary() -> bool:
    return jax.process_index() == 0


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The AdamW of `cfg.optim` over `cfg.steps` steps."""
    o = cfg.optim
    return make_optimizer(o.lr, cfg.steps, o.warmup_steps, o.schedule, o.weight_decay,
                          o.b1, o.b2, o.max_grad_norm)


# ----------------------------------------------------------------------------- build

def build(cfg: TrainConfig, devices=None) -> Setup:
    data_lib.check_source(cfg.data.path)  # before a multi-GB model load, not after
    model_path = fa.default_model_path() if cfg.model.path == "default" else cfg.model.path
    adapter_cfg = cfg.adapter.build()
    # Trained base modules (modules_to_save) stay in float when the base is quantized.
    quant_cfg = cfg.model.quant_config(getattr(adapter_cfg, "modules_to_save", ()))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    # Straight into the frozen shardings: no device ever holds a whole weight
    # that its sharding splits (checkpoints/hf.py, quant/sharded.py).
    pre = fa.load_pretrained(model_path, dtype=cfg.model.param_dtype, quantize=quant_cfg,
                             mesh=mesh)
    if pre.tokenizer is None:
        raise TrainingError(f"{model_path} has no tokenizer files; training needs one")
    prepared = data_lib.prepare(cfg.data, pre.tokenizer, batch_size=cfg.batch_size,
                                seed=cfg.seed, share=data_lib.Share(
                                    jax.process_index(), jax.process_count(),
                                    distributed.gather))
    cfg = resolve_steps(cfg, prepared.info["steps_per_epoch"])  # the schedule needs steps
    compute = jnp.bfloat16 if cfg.model.compute_dtype == "bfloat16" else jnp.float32
    adapted = fa.adapt(pre, adapter_cfg, jax.random.fold_in(jax.random.key(cfg.seed), 1),
                       dtype=compute, remat=cfg.model.remat)
    return Setup(adapted.model, pre.tokenizer, adapter_cfg, adapted.model_type,
                 *place(adapted, cfg, devices, mesh), prepared, pre.hf_config)


def place(adapted: fa.Adapted, cfg: TrainConfig, devices=None, mesh=None) -> tuple:
    """(mesh, frozen, state, state shardings, frozen shardings): the adapted
    tree split, laid out on `mesh` (default: the mesh of `cfg.mesh`), and the
    optimizer state. Base leaves already loaded into their shardings on
    `mesh` stay where they are (device_put to the same sharding is a no-op)."""
    frozen, trainable = adapted.split()
    if not trainable:
        raise TrainingError("the adapter added no trainable leaves; nothing would be trained")
    mesh = sharding.make_mesh(cfg.mesh, devices) if mesh is None else mesh
    if cfg.micro_batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise TrainingError(f"micro_batch_size={cfg.micro_batch_size} must be divisible by "
                            f"data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']}")
    axes = adapter_axes(adapted.params, logical_axes(adapted.config))
    frozen_names, trainable_names = fa.split(axes, adapted.cfg, adapted.model_type)
    frozen_sh = sharding.tree_shardings(frozen_names, frozen, mesh)
    trainable_sh = sharding.tree_shardings(trainable_names, trainable, mesh)
    frozen = jax.device_put(frozen, frozen_sh)
    trainable = jax.device_put(jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32), trainable), trainable_sh)
    opt = optimizer(cfg)
    opt_state = jax.jit(opt.init, out_shardings=optimizer_shardings(
        opt, trainable, trainable_sh, mesh))(trainable)
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh)),
                       trainable, opt_state)
    state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
    return mesh, frozen, state, state_sh, frozen_sh


def compile_steps(s: Setup, cfg: TrainConfig):
    """The jitted train and eval steps, with explicit shardings; the train
    state is donated (updated in place)."""
    batch_sh = jax.sharding.NamedSharding(
        s.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), None))
    key_sh = sharding.replicated(s.mesh)
    window = s.prepared.info["loss_window"] if s.prepared is not None else None
    step_fn = jax.jit(
        sharding.on_mesh(functools.partial(train_step, model=s.model, optimizer=optimizer(cfg),
                                           loss_window=window), s.mesh),
        in_shardings=(s.state_shardings, s.frozen_shardings, batch_sh, key_sh),
        out_shardings=(s.state_shardings, sharding.replicated(s.mesh)),
        donate_argnums=(0,))
    eval_fn = jax.jit(sharding.on_mesh(functools.partial(eval_step, model=s.model,
                                                         loss_window=window), s.mesh),
                      in_shardings=(s.state_shardings.trainable, s.frozen_shardings, batch_sh),
                      out_shardings=sharding.replicated(s.mesh))
    return step_fn, eval_fn, batch_sh


# ----------------------------------------------------------------------------- evaluation

def validation_loss(s: Setup, eval_fn, batch_sh, cfg: TrainConfig, trainable) -> float:
    if not s.prepared.val:
        return float("nan")
    total, count = 0.0, 0.0
    buckets = s.prepared.info["buckets"]
    pad = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None \
        else s.tokenizer.eos_token_id
    rows = distributed.process_rows(batch_sh, 1, cfg.micro_batch_size)
    for batch in data_lib.eval_batches(s.prepared.val, cfg.micro_batch_size, buckets=buckets,
                                       pad_id=pad, rows=rows):
        out = eval_fn(trainable, s.frozen, sharding.global_batch(batch, 1, batch_sh))
        total, count = total + float(out["loss_sum"]), count + float(out["tokens"])
    return total / max(count, 1.0)


def heldout_accuracy(s: Setup, cfg: TrainConfig, trainable, desc: str) -> dict:
    """Greedy generation on the held-out records by eval's generator, scored as
    LLM-Adapters scores math answers (last number, |pred - label| <= 1e-3)."""
    records = s.prepared.test[:cfg.eval_generate]
    if not records:
        return {"n": 0, "correct": 0, "accuracy": float("nan"), "examples": []}
    params = fa.materialize(fa.combine(s.frozen, trainable))
    # Batch 32: the default 64 items decode in two batches of one compiled shape.
    generator = Generator(s.model, params, s.tokenizer, batch_size=32)
    rows, _ = evaluate_task(generator, arith.TASK, records, cfg.data.template,
                            cfg.max_new_tokens, desc, show_progress=_is_primary())
    examples = [{"question": r["question"], "generation": r["generation"], "pred": r["pred"],
                 "answer": r["label"], "correct": bool(r["correct"])} for r in rows]
    correct = sum(ex["correct"] for ex in examples)
    return {"n": len(records), "correct": correct, "accuracy": correct / len(records),
            "examples": examples}


# ----------------------------------------------------------------------------- output directory

def check_output_dir(out: pathlib.Path, resume: bool, overwrite: bool) -> bool:
    """Whether `out` holds a run that --overwrite will replace. Nothing is
    deleted here: `run` clears it only once the new run has been built (config,
    model, data all good), so a mistyped command never costs the old run."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output_dir {out} is a file; choose a directory")
    existing = out.exists() and any(out.iterdir())
    distributed.barrier("output_dir looked at")  # by all, before process 0 deletes or writes
    if existing and not (resume or overwrite):
        raise TrainingError(f"output_dir {out} already holds a run; pass --resume to continue "
                            "it, --overwrite to replace it, or choose another output_dir")
    return existing and overwrite and not resume


def clear_output_dir(out: pathlib.Path) -> None:
    """Renames, then deletes: if interrupted, the old run is whole under the
    other name rather than half-deleted in the new run's directory."""
    if _is_primary():
        trash = out.with_name(f".{out.name}.replaced-{time.time_ns()}")
        out.rename(trash)
        shutil.rmtree(trash)


@dataclasses.dataclass
class Start:
    """Where the step loop begins: a fresh run or a restored checkpoint."""

    state: TrainState
    step: int = 0
    last: dict = dataclasses.field(default_factory=dict)  # the last metrics line kept
    before: dict | None = None  # held-out accuracy before training, once known


def _check_resumable(cfg: TrainConfig, meta: dict) -> None:
    changed = resume_mismatches(meta.get("config", {}), to_dict(cfg))
    if changed:
        raise TrainingError(
            f"--resume: the checkpoints in {cfg.output_dir} were written under a different "
            f"config ({'; '.join(changed)}); resume with the config the run started with, "
            "or pass --overwrite or another output_dir to start a new run")


def resume_point(s: Setup, cfg: TrainConfig, ckpt: Checkpointer, out: pathlib.Path,
                 resume: bool) -> Start:
    """The newest usable checkpoint with --resume (metrics past it dropped),
    else step 0 (an old metrics file removed)."""
    metrics_path = out / "metrics.jsonl"
    found = ckpt.restore_latest(s.state, functools.partial(_check_resumable, cfg)) \
        if resume else None
    if found:
        step, state, _ = found
        log.info("resumed from step %d (%s)", step, ckpt.directory / str(step))
        last = _truncate_metrics(metrics_path, step) if _is_primary() else {}
        return Start(state, step, last, read_heldout(out, "before"))
    if resume:
        log.info("--resume: no checkpoint in %s, starting from step 0", ckpt.directory)
        if _is_primary():
            metrics_path.unlink(missing_ok=True)
    return Start(s.state)


def _truncate_metrics(path: pathlib.Path, step: int) -> dict:
    """Drops metric lines past the restored step (they will be recomputed) and
    a line torn by a kill; returns the last line kept ({} if none)."""
    if not path.exists():
        return {}
    rows = []
    for ln in path.read_text().splitlines():
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            log.warning("%s: dropping a torn line (the run was killed while writing it)", path)
    rows = [r for r in rows if isinstance(r, dict) and r.get("step", step + 1) <= step]
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows[-1] if rows else {}


# ----------------------------------------------------------------------------- the step loop

class Meter:
    """Throughput of the steps after this process's first, whose time is
    mostly tracing and XLA compilation (reported once as compile_s)."""

    def __init__(self):
        self.t0, self.tokens, self.first, self.rate = time.perf_counter(), 0.0, True, math.nan

    def add(self, record: dict, tokens: float) -> None:
        if self.first:
            record["compile_s"] = time.perf_counter() - self.t0
            self.t0, self.first = time.perf_counter(), False
        else:
            self.tokens += tokens
            self.rate = record["tokens_per_s"] = self.tokens / (time.perf_counter() - self.t0)


def _save(ckpt: Checkpointer, done: int, state: TrainState, cfg: TrainConfig) -> None:
    ckpt.save(done, state, {"step": done, "seed": cfg.seed, "data_position": done,
                            "config": to_dict(cfg)})


def _stop_if_nonfinite(metrics: dict, done: int, cfg: TrainConfig, ckpt: Checkpointer,
                       bar, skipped: int) -> None:
    """The NaN/Inf policy after step `done`: raise to stop, or note a skip."""
    stop = nonfinite_verdict(metrics, done, cfg.optim.nonfinite,
                             cfg.optim.max_consecutive_nonfinite)
    if stop:
        kept = ckpt.latest_step()
        raise TrainingError(
            f"{stop}; no non-finite update was applied and training stopped. Last good "
            f"checkpoint: {'none' if kept is None else ckpt.directory / str(kept)}. "
            "Lower optim.lr or check the data")
    if not metrics["finite"]:
        bar.write(f"step {done}: non-finite loss or gradient; update skipped "
                  f"({int(metrics['nonfinite_in_a_row'])} in a row, {skipped} in all)")


def _every(n: int, done: int, cfg: TrainConfig) -> bool:
    """Whether a cadence of `n` steps (0: only at the end) falls on step `done`."""
    return bool(n) and done % n == 0 or done == cfg.steps


def train_steps(s: Setup, cfg: TrainConfig, start: Start, steps, ckpt: Checkpointer,
                guard: preempt.Guard, metrics_file) -> tuple[TrainState, int, dict]:
    """Steps start.step .. cfg.steps (or until a signal): each one's metrics
    line, progress bar, validation and checkpoint cadence. Returns (state,
    steps done, last metrics line); a signal leaves a checkpoint of the last
    finished step and raises `Preempted`."""
    step_fn, eval_fn, batch_sh = steps
    key = jax.random.key(cfg.seed)
    accum = cfg.batch_size // cfg.micro_batch_size
    rows = distributed.process_rows(batch_sh, accum, cfg.micro_batch_size)
    state, done, saved, last = start.state, start.step, start.step, start.last
    meter = Meter()
    bar = tqdm(total=cfg.steps, initial=start.step, desc="train", unit="step",
               disable=not _is_primary(), dynamic_ncols=True)
    with bar:  # an exception closes it before the CLI prints the error line
        for step in range(start.step, cfg.steps):
            if guard.stop_requested():
                break
            batch = sharding.global_batch(s.prepared.train.batch_at(step, rows), accum, batch_sh)
            state, metrics = step_fn(state, s.frozen, batch, key)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            done = step + 1
            record = {"step": done, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                      "skipped": int(metrics["nonfinite_total"])}
            meter.add(record, metrics["tokens"])
            if _every(cfg.eval_every, done, cfg):
                record["val_loss"] = validation_loss(s, eval_fn, batch_sh, cfg, state.trainable)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            _stop_if_nonfinite(metrics, done, cfg, ckpt, bar, record["skipped"])
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{meter.rate:.0f}",
                            **({"skipped": record["skipped"]} if record["skipped"] else {}))
            bar.update(1)
            if (cfg.log_every and done % cfg.log_every == 0 or "val_loss" in record) and \
                    _is_primary():
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in record.items()))
            if _every(cfg.checkpoint_every, done, cfg):
                _save(ckpt, done, state, cfg)
                saved = done
            last = record
    if guard.stop_requested():
        if saved != done:
            _save(ckpt, done, state, cfg)
        ckpt.close()
        raise guard.preempted(f"saved step {done} in {ckpt.directory / str(done)}" if done
                              else "no step had finished, so there was nothing to save")
    return state, done, last


# ----------------------------------------------------------------------------- run

def run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
        devices=None) -> dict:
    """Trains as `cfg` says on `devices` (default: all); returns the summary."""
    out = pathlib.Path(cfg.output_dir)
    replace = check_output_dir(out, resume, overwrite)
    s = build(cfg, devices)
    cfg = resolve_steps(cfg, s.prepared.info["steps_per_epoch"])  # as build resolved it
    if replace:
        clear_output_dir(out)
    distributed.barrier("output_dir cleared")  # before any process writes into it
    log.info("data: %s", json.dumps(s.prepared.info))
    log.info("model: %s, %s", s.model_type, fa.trainable_report(
        fa.combine(s.frozen, s.state.trainable), s.adapter_cfg, s.model_type))
    out.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_directory(out)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_checkpoints)
    steps = compile_steps(s, cfg)
    start = resume_point(s, cfg, ckpt, out, resume)
    if start.step == 0 and cfg.eval_generate:
        start.before = heldout_accuracy(s, cfg, start.state.trainable, "held-out accuracy before")
        write_heldout(out, "before", start.before)
        log.info("held-out accuracy before training: %d/%d = %.1f%%", start.before["correct"],
                 start.before["n"], 100 * start.before["accuracy"])
    with preempt.Guard() as guard, \
            open(out / "metrics.jsonl" if _is_primary() else os.devnull, "a") as metrics_file:
        state, _, last = train_steps(s, cfg, start, steps, ckpt, guard, metrics_file)
    ckpt.close()
    return finish(s, cfg, out, state, start.before, last)


def finish(s: Setup, cfg: TrainConfig, out: pathlib.Path, state: TrainState,
           before: dict | None, last: dict) -> dict:
    """Held-out accuracy after training, the export and the report."""
    after = heldout_accuracy(s, cfg, state.trainable, "held-out accuracy after") \
        if cfg.eval_generate else None
    final = fa.combine(s.frozen, distributed.host_copy(state.trainable, s.mesh))
    summary = write_report(out, cfg, s, final, before, after, last)
    distributed.barrier("report written")  # nobody exits while process 0 still writes
    return summary
