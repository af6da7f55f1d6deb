"""The loss of the train step: the windowed head (logits only where targets
can be) gives the loss and gradients of the full head, and the window bound
computed from the data holds for every example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_adapters.models import LlamaConfig, LlamaForCausalLM
from train import data
from flax_adapters.step import make_optimizer, token_loss

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def batch_of(examples, t):
    return {k: jnp.asarray(v) for k, v in data.collate(examples, t, pad_id=0).items()}


@pytest.fixture(scope="module")
def tiny():
    model = LlamaForCausalLM(CFG)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return model, params


def examples(seed=0):
    """Rows of varied length whose targets start anywhere, up to the last position
    (prompt_len 0 = every token is a target, as with train_on_inputs=True)."""
    rng = np.random.default_rng(seed)
    out = []
    for n, prompt_len in [(24, 20), (9, 3), (24, 0), (2, 1), (17, 16), (5, 5)]:
        out.append(data.Example(rng.integers(1, CFG.vocab_size, n).astype(np.int32), prompt_len))
    return out


def window_of(ex, multiple):
    return data.loss_window(np.array([len(e.tokens) for e in ex]),
                            np.array([e.prompt_len for e in ex]), multiple)


def test_window_bound_covers_every_row():
    ex = examples()
    b = data.collate(ex, 24, pad_id=0)["loss_mask"]
    assert window_of(ex, 1) == b.sum(axis=1).max() == 23  # prompt_len 0: 23 counted positions
    assert window_of(ex[:2], 8) == 8  # spans 4 and 6, rounded up


@pytest.mark.parametrize("window", [1, 8, 23])
def test_windowed_loss_equals_the_full_head(tiny, window):
    model, params = tiny
    ex = [e for e in examples() if len(e.tokens) - max(e.prompt_len, 1) <= window]
    b = batch_of(ex, 24)

    def loss(p, w):
        s, n = token_loss(model, p, b["tokens"], b["valid"], b["loss_mask"],
                          jax.random.key(0), True, loss_window=w)
        return s / n, n

    (full, n_full), g_full = jax.value_and_grad(loss, has_aux=True)(params, None)
    (win, n_win), g_win = jax.value_and_grad(loss, has_aux=True)(params, window)
    assert n_win == n_full == b["loss_mask"].sum()
    # float32: only the summation order differs (a few ulps of a ~4.6 loss)
    np.testing.assert_allclose(win, full, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6), g_win,
                           g_full)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_no_warmup_means_the_first_step_trains(schedule):
    # warmup_steps=0: step 0 runs at the full learning rate (a 1-step run trains).
    opt = make_optimizer(0.1, steps=1, warmup_steps=0, schedule=schedule, weight_decay=0.0,
                         b1=0.9, b2=0.999, max_grad_norm=1.0)
    params = {"w": jnp.ones(3)}
    updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1, rtol=1e-4)  # Adam: lr * sign
