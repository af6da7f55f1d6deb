"""`run(cfg)`: the whole of `python -m train`.

config -> model + tokenizer -> adapter inject -> data -> sharded state ->
jitted train step -> metrics, progress bar, periodic validation, orbax
checkpoints -> PEFT export, loss curve, before/after held-out accuracy.
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
from tqdm.auto import tqdm

from flax_adapters import sharding
from flax_adapters.adapters import api, axes, tree
from flax_adapters.checkpoints import default_model_path, load_pretrained
from flax_adapters.checkpoints.atomic import write_text_atomically
from flax_adapters.generate import GenerationConfig, generate
from flax_adapters.models import logical_axes, model_class
from train import data as data_lib
from train import distributed
from train import preempt
from train.checkpoint import Checkpointer
from train.config import TrainConfig, resolve_steps, resume_mismatches, to_dict
from train.report import read_heldout, write_heldout, write_report
from train.step import TrainState, eval_step, make_optimizer, nonfinite_verdict, train_step

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


def build(cfg: TrainConfig, devices=None) -> Setup:
    data_lib.check_source(cfg.data.path)  # before a multi-GB model load, not after
    model_path = default_model_path() if cfg.model.path == "default" else cfg.model.path
    adapter_cfg = cfg.adapter.build()
    # Trained base modules (modules_to_save) stay in float when the base is quantized.
    quant_cfg = cfg.model.quant_config(getattr(adapter_cfg, "modules_to_save", ()))
    pre = load_pretrained(model_path, dtype=cfg.model.param_dtype, quantize=quant_cfg)
    if pre.tokenizer is None:
        raise TrainingError(f"{model_path} has no tokenizer files; training needs one")
    prepared = data_lib.prepare(cfg.data, pre.tokenizer, batch_size=cfg.batch_size,
                                seed=cfg.seed, share=data_lib.Share(
                                    jax.process_index(), jax.process_count(),
                                    distributed.gather))
    cfg = resolve_steps(cfg, prepared.info["steps_per_epoch"])  # the schedule needs steps
    model_type = pre.config.model_type
    key = jax.random.key(cfg.seed)
    full = api.inject(pre.params, adapter_cfg, jax.random.fold_in(key, 1), model_type)
    is_trainable = api.trainable(adapter_cfg, model_type)
    frozen, trainable = tree.split(full, is_trainable)
    if not trainable:
        raise TrainingError("the adapter added no trainable leaves; nothing would be trained")
    compute = jnp.bfloat16 if cfg.model.compute_dtype == "bfloat16" else jnp.float32
    model = model_class(pre.config)(pre.config, dtype=compute,
                                    settings=api.settings_for(adapter_cfg, model_type),
                                    remat=cfg.model.remat)

    mesh = sharding.make_mesh(cfg.mesh, devices)
    if cfg.micro_batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise TrainingError(f"micro_batch_size={cfg.micro_batch_size} must be divisible by "
                            f"data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']}")
    names = axes.adapter_axes(full, logical_axes(pre.config))
    frozen_names, trainable_names = tree.split(names, is_trainable)
    frozen_sh = sharding.tree_shardings(frozen_names, frozen, mesh)
    trainable_sh = sharding.tree_shardings(trainable_names, trainable, mesh)
    frozen = jax.device_put(frozen, frozen_sh)
    trainable = jax.device_put(jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32), trainable), trainable_sh)

    optimizer = _optimizer(cfg)
    opt_state = jax.jit(optimizer.init, out_shardings=_opt_shardings(
        optimizer, trainable, trainable_sh, mesh))(trainable)
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh)),
                       trainable, opt_state)
    state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
    return Setup(model, pre.tokenizer, adapter_cfg, model_type, mesh, frozen, state, state_sh,
                 frozen_sh, prepared, pre.hf_config)


def _opt_shardings(optimizer, trainable, trainable_sh, mesh):
    """Optimizer-state leaves that mirror a parameter (Adam's mu, nu) shard like
    it; scalars (step counts) are replicated."""
    by_path = {tuple(k.key for k in p): sh for p, sh in
               jax.tree_util.tree_flatten_with_path(trainable_sh)[0]}
    abstract = jax.eval_shape(optimizer.init, trainable)

    def pick(path, leaf):
        keys = tuple(getattr(k, "key", None) for k in path)
        for i in range(len(keys)):
            sh = by_path.get(keys[i:])
            if sh is not None and len(sh.spec) <= leaf.ndim:
                return sh
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract)


def _optimizer(cfg: TrainConfig):
    o = cfg.optim
    return make_optimizer(o.lr, cfg.steps, o.warmup_steps, o.schedule, o.weight_decay,
                          o.b1, o.b2, o.max_grad_norm)


def compile_steps(s: Setup, cfg: TrainConfig):
    """The jitted train and eval steps, with explicit shardings; the train
    state is donated (updated in place)."""
    batch_sh = jax.sharding.NamedSharding(
        s.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), None))
    key_sh = sharding.replicated(s.mesh)
    window = s.prepared.info["loss_window"] if s.prepared is not None else None
    step_fn = jax.jit(
        sharding.on_mesh(functools.partial(train_step, model=s.model, optimizer=_optimizer(cfg),
                                           loss_window=window), s.mesh),
        in_shardings=(s.state_shardings, s.frozen_shardings, batch_sh, key_sh),
        out_shardings=(s.state_shardings, sharding.replicated(s.mesh)),
        donate_argnums=(0,))
    eval_fn = jax.jit(sharding.on_mesh(functools.partial(eval_step, model=s.model,
                                                         loss_window=window), s.mesh),
                      in_shardings=(s.state_shardings.trainable, s.frozen_shardings, batch_sh),
                      out_shardings=sharding.replicated(s.mesh))
    return step_fn, eval_fn, batch_sh


def _to_global(batch: dict, accum: int, batch_sh) -> dict:
    """(B, t) host rows -> (accum, B / accum, t) global arrays on the mesh."""
    out = {}
    for k, v in batch.items():
        v = v.reshape(accum, v.shape[0] // accum, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sh, v)
    return out


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
        out = eval_fn(trainable, s.frozen, _to_global(batch, 1, batch_sh))
        total, count = total + float(out["loss_sum"]), count + float(out["tokens"])
    return total / max(count, 1.0)


def heldout_accuracy(s: Setup, cfg: TrainConfig, trainable, desc: str) -> dict:
    """Greedy generation on the held-out records, scored as LLM-Adapters scores
    math answers (last number, |pred - label| <= 1e-3)."""
    from eval.extract import extract_number, number_correct

    records = s.prepared.test[:cfg.eval_generate]
    if not records:
        return {"n": 0, "correct": 0, "accuracy": float("nan"), "examples": []}
    params = api.materialize(tree.combine(s.frozen, trainable))
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens)
    eos = s.tokenizer.eos_token_id
    model_eos = s.model.cfg.eos_token_id
    eos_ids = {eos} | (set(model_eos) if isinstance(model_eos, tuple) else {model_eos})
    gen_cfg = dataclasses.replace(gen_cfg, eos_token_ids=tuple(sorted(
        e for e in eos_ids if e is not None)))
    batch = 32  # two compiled-once decode batches for the default 64 items
    examples, correct = [], 0
    for start in tqdm(range(0, len(records), batch), desc=desc, unit="batch",
                      disable=not _is_primary()):
        chunk = records[start:start + batch]
        prompts = [data_lib.encode_prompt(r, s.tokenizer, cfg.data.template) for r in chunk]
        out = generate(s.model, params, prompts, gen_cfg)
        for r, row in zip(chunk, out.tolist()):
            cut = next((i for i, t in enumerate(row) if t in gen_cfg.eos_token_ids), len(row))
            text = s.tokenizer.decode(row[:cut], skip_special_tokens=True)
            pred = extract_number(text)
            ok = number_correct(pred, r["answer"])
            correct += ok
            examples.append({"question": r["instruction"], "generation": text,
                             "pred": None if math.isinf(pred) else pred,
                             "answer": r["answer"], "correct": bool(ok)})
    return {"n": len(records), "correct": correct, "accuracy": correct / len(records),
            "examples": examples}


def _check_output_dir(out: pathlib.Path, resume: bool, overwrite: bool) -> bool:
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


def _clear(out: pathlib.Path) -> None:
    """Renames, then deletes: if interrupted, the old run is whole under the
    other name rather than half-deleted in the new run's directory."""
    if _is_primary():
        trash = out.with_name(f".{out.name}.replaced-{time.time_ns()}")
        out.rename(trash)
        shutil.rmtree(trash)


def _check_resumable(cfg: TrainConfig, meta: dict) -> None:
    changed = resume_mismatches(meta.get("config", {}), to_dict(cfg))
    if changed:
        raise TrainingError(
            f"--resume: the checkpoints in {cfg.output_dir} were written under a different "
            f"config ({'; '.join(changed)}); resume with the config the run started with, "
            "or pass --overwrite or another output_dir to start a new run")


def _save(ckpt: Checkpointer, done: int, state: TrainState, cfg: TrainConfig) -> None:
    ckpt.save(done, state, {"step": done, "seed": cfg.seed, "data_position": done,
                            "config": to_dict(cfg)})


def run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
        devices=None) -> dict:
    """Trains as `cfg` says on `devices` (default: all); returns the summary."""
    out = pathlib.Path(cfg.output_dir)
    replace = _check_output_dir(out, resume, overwrite)
    s = build(cfg, devices)
    cfg = resolve_steps(cfg, s.prepared.info["steps_per_epoch"])  # as build resolved it
    if replace:
        _clear(out)
    distributed.barrier("output_dir cleared")  # before any process writes into it
    info = s.prepared.info
    log.info("data: %s", json.dumps(info))
    log.info("model: %s, %s", s.model_type, tree.trainable_report(
        tree.combine(s.frozen, s.state.trainable)))
    out.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_directory(out)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_checkpoints)
    accum = cfg.batch_size // cfg.micro_batch_size
    step_fn, eval_fn, batch_sh = compile_steps(s, cfg)
    key = jax.random.key(cfg.seed)

    state, start, last, before = s.state, 0, {}, None
    metrics_path = out / "metrics.jsonl"
    found = ckpt.restore_latest(state, functools.partial(_check_resumable, cfg)) \
        if resume else None
    if found:
        start, state, _ = found
        log.info("resumed from step %d (%s)", start, ckpt.directory / str(start))
        if _is_primary():
            last = _truncate_metrics(metrics_path, start)
        before = read_heldout(out, "before")
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from step 0", ckpt.directory)
        if _is_primary():
            metrics_path.unlink(missing_ok=True)

    if start == 0 and cfg.eval_generate:
        before = heldout_accuracy(s, cfg, state.trainable, "held-out accuracy before")
        write_heldout(out, "before", before)
        log.info("held-out accuracy before training: %d/%d = %.1f%%", before["correct"],
                 before["n"], 100 * before["accuracy"])

    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
               disable=not _is_primary(), dynamic_ncols=True)
    # tokens/s counts the steps after this process's first, whose time is mostly
    # tracing and XLA compilation (reported once as compile_s).
    tokens_seen, t0, rate = 0.0, time.perf_counter(), float("nan")
    done = saved = start
    rows = distributed.process_rows(batch_sh, accum, cfg.micro_batch_size)
    # `bar` in the with: an exception closes it before the CLI prints the error line.
    with preempt.Guard() as guard, \
            open(metrics_path if _is_primary() else os.devnull, "a") as mfile, bar:
        for step in range(start, cfg.steps):
            if guard.stop_requested():
                break
            batch = s.prepared.train.batch_at(step, rows)
            state, metrics = step_fn(state, s.frozen, _to_global(batch, accum, batch_sh), key)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            record = {"step": step + 1, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                      "skipped": int(metrics["nonfinite_total"])}
            if step == start:
                record["compile_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
            else:
                tokens_seen += metrics["tokens"]
                rate = record["tokens_per_s"] = tokens_seen / (time.perf_counter() - t0)
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps:
                record["val_loss"] = validation_loss(s, eval_fn, batch_sh, cfg, state.trainable)
            if _is_primary():
                mfile.write(json.dumps(record) + "\n")
                mfile.flush()
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
                          f"({int(metrics['nonfinite_in_a_row'])} in a row, "
                          f"{record['skipped']} in all)")
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{rate:.0f}",
                            **({"skipped": record["skipped"]} if record["skipped"] else {}))
            bar.update(1)
            if (cfg.log_every and done % cfg.log_every == 0 or "val_loss" in record) and \
                    _is_primary():
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in record.items()))
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 or done == cfg.steps:
                _save(ckpt, done, state, cfg)
                saved = done
            last = record
        if guard.stop_requested():
            if saved != done:
                _save(ckpt, done, state, cfg)
            ckpt.close()
            raise guard.preempted(f"saved step {done} in {ckpt.directory / str(done)}" if done
                                  else "no step had finished, so there was nothing to save")
    ckpt.close()

    after = heldout_accuracy(s, cfg, state.trainable, "held-out accuracy after") \
        if cfg.eval_generate else None
    final = tree.combine(s.frozen, distributed.host_copy(state.trainable, s.mesh))
    summary = write_report(out, cfg, s, final, before, after, last)
    distributed.barrier("report written")  # nobody exits while process 0 still writes
    return summary


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
