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
from flax_adapters.generate import GenerationConfig, generate
from flax_adapters.models import logical_axes, model_class
from train import data as data_lib
from train.checkpoint import Checkpointer
from train.config import TrainConfig, resolve_steps, to_dict
from train.report import write_report
from train.step import TrainState, eval_step, make_optimizer, train_step

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


def _is_primary() -> bool:
    return jax.process_index() == 0


def build(cfg: TrainConfig, devices=None) -> Setup:
    data_lib.check_source(cfg.data.path)  # before a multi-GB model load, not after
    model_path = default_model_path() if cfg.model.path == "default" else cfg.model.path
    pre = load_pretrained(model_path, dtype=cfg.model.param_dtype)
    if pre.tokenizer is None:
        raise TrainingError(f"{model_path} has no tokenizer files; training needs one")
    prepared = data_lib.prepare(cfg.data, pre.tokenizer, batch_size=cfg.batch_size,
                                seed=cfg.seed)
    cfg = resolve_steps(cfg, prepared.info["steps_per_epoch"])  # the schedule needs steps
    adapter_cfg = cfg.adapter.build()
    model_type = pre.config.model_type
    key = jax.random.key(cfg.seed)
    full = api.inject(pre.params, adapter_cfg, jax.random.fold_in(key, 1), model_type)
    frozen, trainable = tree.split(full)
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
    frozen_names, trainable_names = tree.split(names, _leaf_is_trainable(full))
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
                 frozen_sh, prepared)


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


def _leaf_is_trainable(full: dict):
    trainable_paths = {p for p, _ in _flat(tree.split(full).trainable)}
    return lambda path: tuple(path) in trainable_paths


def _flat(t: dict, prefix=()):
    for k, v in t.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


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
    step_fn = jax.jit(
        functools.partial(train_step, model=s.model, optimizer=_optimizer(cfg)),
        in_shardings=(s.state_shardings, s.frozen_shardings, batch_sh, key_sh),
        out_shardings=(s.state_shardings, sharding.replicated(s.mesh)),
        donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(eval_step, model=s.model),
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
    for batch in data_lib.eval_batches(s.prepared.val, cfg.micro_batch_size, buckets=buckets,
                                       pad_id=pad, process_index=jax.process_index(),
                                       process_count=jax.process_count()):
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


def _check_output_dir(out: pathlib.Path, resume: bool, overwrite: bool) -> None:
    existing = out.exists() and any(out.iterdir())
    if existing and not (resume or overwrite):
        raise TrainingError(f"output_dir {out} already holds a run; pass --resume to continue "
                            "it, --overwrite to replace it, or choose another output_dir")
    if existing and overwrite and not resume and _is_primary():
        shutil.rmtree(out)


def run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
        devices=None) -> dict:
    """Trains as `cfg` says on `devices` (default: all); returns the summary."""
    out = pathlib.Path(cfg.output_dir)
    _check_output_dir(out, resume, overwrite)
    s = build(cfg, devices)
    cfg = resolve_steps(cfg, s.prepared.info["steps_per_epoch"])  # as build resolved it
    info = s.prepared.info
    log.info("data: %s", json.dumps(info))
    log.info("model: %s, %s", s.model_type, tree.trainable_report(
        tree.combine(s.frozen, s.state.trainable)))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_checkpoints)
    accum = cfg.batch_size // cfg.micro_batch_size
    step_fn, eval_fn, batch_sh = compile_steps(s, cfg)
    key = jax.random.key(cfg.seed)

    state, start = s.state, 0
    metrics_path = out / "metrics.jsonl"
    if resume and ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        state, meta = ckpt.restore(start, state)
        log.info("resumed from step %d (%s)", start, ckpt.directory / str(start))
        _truncate_metrics(metrics_path, start)
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from step 0", ckpt.directory)
        metrics_path.unlink(missing_ok=True)

    before = None
    if start == 0 and cfg.eval_generate:
        before = heldout_accuracy(s, cfg, state.trainable, "held-out accuracy before")
        log.info("held-out accuracy before training: %d/%d = %.1f%%", before["correct"],
                 before["n"], 100 * before["accuracy"])

    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
               disable=not _is_primary(), dynamic_ncols=True)
    tokens_seen, t0 = 0.0, time.perf_counter()
    last = {}
    with open(metrics_path, "a") as mfile:
        for step in range(start, cfg.steps):
            batch = s.prepared.train.batch_at(step, jax.process_index(), jax.process_count())
            state, metrics = step_fn(state, s.frozen, _to_global(batch, accum, batch_sh), key)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not metrics["finite"]:
                kept = ckpt.latest_step()
                raise TrainingError(
                    f"non-finite loss or gradient at step {step + 1}; the update was skipped "
                    f"and training stopped. Last good checkpoint: "
                    f"{'none' if kept is None else ckpt.directory / str(kept)}. Lower optim.lr "
                    "or check the data")
            tokens_seen += metrics["tokens"]
            rate = tokens_seen / (time.perf_counter() - t0)
            record = {"step": step + 1, "loss": metrics["loss"],
                      "grad_norm": metrics["grad_norm"], "tokens_per_s": rate}
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps:
                record["val_loss"] = validation_loss(s, eval_fn, batch_sh, cfg, state.trainable)
            if _is_primary():
                mfile.write(json.dumps(record) + "\n")
                mfile.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if cfg.log_every and done % cfg.log_every == 0 or "val_loss" in record:
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in record.items()))
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 or done == cfg.steps:
                ckpt.save(done, state, {"step": done, "seed": cfg.seed,
                                        "data_position": done, "config": to_dict(cfg)})
            last = record
    bar.close()
    ckpt.close()

    after = heldout_accuracy(s, cfg, state.trainable, "held-out accuracy after") \
        if cfg.eval_generate else None
    final = tree.combine(s.frozen, state.trainable)
    summary = write_report(out, cfg, s, final, before, after, last)
    return summary


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drops metric lines past the restored step (they will be recomputed)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines()
             if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
