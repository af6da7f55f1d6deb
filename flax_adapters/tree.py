"""Generic functions over parameter trees (nested dicts of arrays): split a
tree into frozen and trainable parts, combine them back, reach a module by
its site name, count parameters.

    tree  = {'layers_0': {'self_attn': {'q_proj': {'kernel': W, 'lora_a': A, 'lora_b': B}}}}
    split(tree, lambda path: path[-1] in ('lora_a', 'lora_b'))
      -> Split(frozen={'layers_0': {'self_attn': {'q_proj': {'kernel': W}}}},
               trainable={'layers_0': {'self_attn': {'q_proj': {'lora_a': A, 'lora_b': B}}}})
    combine(*split(tree, is_trainable)) == tree

Which leaves are trainable is the caller's predicate: the adapter methods
declare their leaves (adapters/registry.py) and `flax_adapters.api.trainable`
turns a config into the predicate. A site is a module's path joined with
'/', e.g. 'layers_0/self_attn/q_proj'.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from flax_adapters.quant.array import is_quantized

Path = tuple[str, ...]


class Split(NamedTuple):
    frozen: dict
    trainable: dict


def _partition(tree: dict, keep: Callable[[Path], bool], prefix: Path = ()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _partition(v, keep, prefix + (k,))
            if sub:
                out[k] = sub
        elif keep(prefix + (k,)):
            out[k] = v
    return out


def split(tree: dict, trainable: Callable[[Path], bool]) -> Split:
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
    """The module of `tree` at `site` ('a/b/c')."""
    node = tree
    for k in site.split("/"):
        node = node[k]
    return node


def with_site(tree: dict, site: str, fn: Callable[[dict], dict]) -> dict:
    """A new tree whose module at `site` is `fn(module)`; other nodes shared."""
    head, _, rest = site.partition("/")
    return {**tree, head: fn(tree[head]) if not rest else with_site(tree[head], rest, fn)}


def with_leaf(tree: dict, path: Path, value: Any) -> dict:
    """A new tree with the leaf at `path` set to `value`."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return with_site(tree, "/".join(path[:-1]), lambda m: {**m, path[-1]: value})


def nest(site: str, leaves: dict) -> dict:
    """{'a': {'b': leaves}} for site 'a/b'."""
    for k in reversed(site.split("/")):
        leaves = {k: leaves}
    return leaves


def sites_with(tree: dict, leaf: str, prefix: str = "") -> list[str]:
    """The sites of the modules that hold a leaf named `leaf`, in tree order."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += [prefix + k] if leaf in v else sites_with(v, leaf, prefix + k + "/")
    return out


def leaves(tree: dict, prefix: Path = ()):
    """(path, value) of every leaf (a quantized array is one leaf)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def path_str(path) -> str:
    """A jax key path as 'a/b/c'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def num_params(tree: Any) -> int:
    """Parameters (a quantized array counts the values it stands for)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized))
