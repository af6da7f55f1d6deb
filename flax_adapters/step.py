"""The train step: one module-level pure function, jitted once by the caller
(`python -m train`'s loop, the README tour, a notebook).

It differentiates the trainable (adapter) tree only, so gradients and
optimizer state are adapter-sized by construction; the frozen base is an
argument (never captured: a closure would bake it into the executable as a
constant). Gradient accumulation is a `lax.scan` over micro-batches, and
the loss is the mean over all counted tokens of the global batch, so the
result does not depend on how the batch is cut into micro-batches.
Randomness per step is `fold_in(key, step)`. It returns metrics and never logs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flax_adapters import sharding
from flax_adapters.api import materialize
from flax_adapters.tree import combine

Batch = dict[str, jax.Array]  # tokens int32, valid bool, loss_mask bool: (accum, micro, t)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    trainable: dict
    opt_state: Any


def make_optimizer(lr: float, steps: int, warmup_steps: int, schedule: str, weight_decay: float,
                   b1: float, b2: float, max_grad_norm: float) -> optax.GradientTransformation:
    """AdamW with warmup then linear/cosine/constant decay and norm clipping.
    Non-finite gradients skip the update (counted in the state, so the counts
    survive a resume) instead of poisoning the adapter. optax would apply the
    update anyway after `max_consecutive_errors`; the loop's policy
    (`nonfinite_verdict`) stops long before, so that limit is never reached."""
    warmup = min(warmup_steps, max(steps - 1, 0))
    if schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, 2))
    else:
        end = 0.0 if schedule == "linear" else lr
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)),
             optax.linear_schedule(lr, end, max(steps - warmup, 1))], [warmup])
    chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    chain.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=2**31 - 1)


def optimizer_shardings(optimizer: optax.GradientTransformation, trainable: dict,
                        trainable_shardings: dict, mesh) -> Any:
    """Shardings of `optimizer.init(trainable)`: leaves that mirror a parameter
    (Adam's mu, nu) shard like it; scalars (step counts) are replicated."""
    by_path = {tuple(k.key for k in p): sh for p, sh in
               jax.tree_util.tree_flatten_with_path(trainable_shardings)[0]}
    abstract = jax.eval_shape(optimizer.init, trainable)

    def pick(path, leaf):
        keys = tuple(getattr(k, "key", None) for k in path)
        for i in range(len(keys)):
            sh = by_path.get(keys[i:])
            if sh is not None and len(sh.spec) <= leaf.ndim:
                return sh
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract)


def token_loss(model, params: dict, tokens_bt, valid_bt, loss_mask_bt, key, deterministic,
               loss_window: int | None = None):
    """(sum of next-token cross-entropies over counted positions, their count).

    Position i predicts tokens[i + 1]; it counts where loss_mask[i]. The labels
    are shifted, not the (b, t, v) logits: slicing the logits would copy the
    largest array of the step (and pad its gradient back) for nothing.

    `loss_window` (static): an upper bound on the counted positions per row,
    which the data makes contiguous (the answer follows its prompt). The logits
    are then computed on that window only, starting at each row's first counted
    position: with prompt tokens masked out that is most of the vocab-wide head
    and its activations saved. The window is clipped at the last position, which
    never counts, so no counted position is ever dropped.
    """
    t = tokens_bt.shape[1]
    labels_bt = jnp.concatenate([tokens_bt[:, 1:], tokens_bt[:, -1:]], axis=1)
    # The last position has no next token (its label above is a placeholder).
    loss_mask_bt = loss_mask_bt & (jnp.arange(t) < t - 1)
    at_ba = None
    if loss_window is not None and loss_window < t:
        start_b = jnp.argmax(loss_mask_bt, axis=1)
        at_ba = jnp.minimum(start_b[:, None] + jnp.arange(loss_window), t - 1)
        labels_bt = jnp.take_along_axis(labels_bt, at_ba, axis=1)
        loss_mask_bt = jnp.take_along_axis(loss_mask_bt, at_ba, axis=1)
    # materialize: methods with a reparameterisation (prefix projection) compute
    # their leaves from the trainable encoder here, inside the differentiated code.
    logits_btv, _ = model.apply({"params": materialize(params)}, tokens_bt, valid_bt,
                                deterministic=deterministic, rngs={"dropout": key},
                                logits_at_ba=at_ba)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_btv, labels_bt)
    mask = loss_mask_bt.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def train_step(state: TrainState, frozen: dict, batch: Batch, key: jax.Array, *, model,
               optimizer: optax.GradientTransformation,
               loss_window: int | None = None) -> tuple[TrainState, dict]:
    step_key = jax.random.fold_in(key, state.step)

    def micro(grads_and_sums, xs):
        grads, loss_sum, count = grads_and_sums
        i, tokens, valid, loss_mask = xs

        def loss_of(trainable):
            return token_loss(model, combine(frozen, trainable), tokens, valid, loss_mask,
                              jax.random.fold_in(step_key, i), deterministic=False,
                              loss_window=loss_window)

        (s, n), g = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
        grads = jax.tree_util.tree_map(jnp.add, grads, g)
        return (grads, loss_sum + s, count + n), None

    accum = batch["tokens"].shape[0]
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
    (grads, loss_sum, count), _ = jax.lax.scan(
        micro, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
        (jnp.arange(accum), batch["tokens"], batch["valid"], batch["loss_mask"]))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / count, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    # apply_if_finite judges the gradients only; a non-finite loss (or a norm
    # that overflows) must not update either.
    grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.nan), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss_sum / count, "grad_norm": grad_norm,
               "loss_tokens": count, "tokens": jnp.sum(batch["valid"]), "finite": finite,
               "nonfinite_in_a_row": opt_state.notfinite_count,
               "nonfinite_total": opt_state.total_notfinite}
    return TrainState(state.step + 1, trainable, opt_state), metrics


def nonfinite_verdict(metrics: dict, step: int, policy: str, max_consecutive: int) -> str | None:
    """Why the run must stop after `step` (1-based) under `policy` ("skip" or
    "stop", optim.nonfinite), or None. The update of a non-finite step was
    already skipped by the optimizer; this decides whether to go on."""
    if metrics["finite"]:
        return None
    if policy == "stop":
        return f"non-finite loss or gradient at step {step} (optim.nonfinite=stop)"
    if metrics["nonfinite_in_a_row"] >= max_consecutive:
        return (f"{int(metrics['nonfinite_in_a_row'])} steps in a row with a non-finite loss "
                f"or gradient, up to step {step} (optim.nonfinite=skip stops after "
                f"optim.max_consecutive_nonfinite={max_consecutive})")
    return None


def eval_step(trainable: dict, frozen: dict, batch: Batch, *, model,
              loss_window: int | None = None) -> dict:
    """Summed loss and token count of a batch shaped like the train batch."""
    def one(carry, xs):
        tokens, valid, loss_mask = xs
        s, n = token_loss(model, combine(frozen, trainable), tokens, valid, loss_mask,
                          jax.random.key(0), deterministic=True, loss_window=loss_window)
        return (carry[0] + s, carry[1] + n), None

    (s, n), _ = jax.lax.scan(one, (jnp.zeros(()), jnp.zeros(())),
                             (batch["tokens"], batch["valid"], batch["loss_mask"]))
    return {"loss_sum": s, "tokens": n}
