"""Generic tree functions: split a tree into frozen and trainable parts,
combine them back, count parameters, and walk the sites of a tree.

    tree  = {'layers_0': {'self_attn': {'q_proj': {'kernel': W, 'lora_a': A, 'lora_b': B}}}}
    split(tree) -> Split(frozen={'layers_0': {'self_attn': {'q_proj': {'kernel': W}}}},
                         trainable={'layers_0': {'self_attn': {'q_proj': {'lora_a': A,
                                                                          'lora_b': B}}}})
    combine(*split(tree)) == tree

Base leaves have a fixed set of names (the model's `kernel`, `bias`,
`scale`, `embed_tokens`, `lm_head`, OPT's `embed_positions`, GPT-J's
`lm_head_bias`); every other leaf is an adapter leaf and
trainable by default.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from flax_adapters.quant.array import is_quantized

BASE_LEAVES = frozenset({"kernel", "bias", "scale", "embed_tokens", "lm_head",
                         "embed_positions", "lm_head_bias"})


class Split(NamedTuple):
    frozen: dict
    trainable: dict


def is_adapter_leaf(path: tuple[str, ...]) -> bool:
    return path[-1] not in BASE_LEAVES


def _partition(tree: dict, keep: Callable[[tuple[str, ...]], bool], prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _partition(v, keep, prefix + (k,))
            if sub:
                out[k] = sub
        elif keep(prefix + (k,)):
            out[k] = v
    return out


def split(tree: dict, trainable: Callable[[tuple[str, ...]], bool] = is_adapter_leaf) -> Split:
    """(frozen, trainable): disjoint sub-trees; `trainable(path)` picks leaves."""
    return Split(_partition(tree, lambda p: not trainable(p)), _partition(tree, trainable))


def combine(frozen: dict, trainable: dict) -> dict:
    """The inverse of `split`: a new tree with the leaves of both."""
    out = dict(frozen)
    for k, v in trainable.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = combine(out[k], v)
        elif k in out:
            raise ValueError(f"leaf {k!r} is in both the frozen and the trainable tree")
        else:
            out[k] = v
    return out


def get(tree: dict, site: str) -> dict:
    node = tree
    for k in site.split("/"):
        node = node[k]
    return node


def with_site(tree: dict, site: str, fn: Callable[[dict], dict]) -> dict:
    """A new tree whose module at `site` is `fn(module)`; other nodes shared."""
    head, _, rest = site.partition("/")
    return {**tree, head: fn(tree[head]) if not rest else with_site(tree[head], rest, fn)}


def num_params(tree: Any) -> int:
    """Parameters (a quantized array counts the values it stands for)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized))


def trainable_report(tree: dict) -> str:
    """Like PEFT's print_trainable_parameters."""
    frozen, trainable = split(tree)
    n_train, n_all = num_params(trainable), num_params(frozen) + num_params(trainable)
    return (f"trainable params: {n_train:,} || all params: {n_all:,} || "
            f"trainable%: {100 * n_train / max(n_all, 1):.4f}")
