"""Logical sharding axes for adapter leaves, derived from the base kernel
they attach to (DESIGN.md, "Sharding").

The base tree's axes come from the model (`nn.get_partition_spec` of the
abstract init, e.g. q_proj's kernel is ('embed', 'heads')). An adapter leaf
takes the axis of the kernel dimension it shares and replicates the rest:

    kernel         W (in, out)   ('embed', 'heads')
    lora_a         A (in, r)     ('embed', None)     rank replicated
    lora_b         B (r, out)    (None, 'heads')
    (a quantized kernel: its packed codes and absmax take the kernel's axes, quant/array.py)
    lora_magnitude m (out,)      ('heads',)
    ia3            l (1, out)    (None, 'heads')     or (in, 1): ('embed', None)

Experts' stacked kernels (E, in, out) ('expert', 'embed', 'mlp') give their
LoRA leaves the expert axis first, then the same rule: A (E, in, r)
('expert', 'embed', None), B (E, r, out) ('expert', None, 'mlp').

So A is sharded like the kernel's rows and B like its columns: x @ A needs
the same all-reduce as x @ W, and (x A) @ B lands already sharded like x @ W.
An adapter leaf with no rule here is replicated (always correct; a method
whose leaves are large adds a rule).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from flax_adapters.adapters.registry import is_adapter_path
from flax_adapters.quant import array as qarray

Axes = tuple  # logical axis names, one per dimension (None: replicated)


def _ia3(shape: tuple[int, ...], k: Axes) -> Axes:
    return (k[0], None) if shape[1] == 1 else (None, k[1])


# leaf name -> (leaf shape, the kernel's axes (in, out)) -> the leaf's axes
RULES: dict[str, Callable[[tuple[int, ...], Axes], Axes]] = {
    "lora_a": lambda shape, k: (k[0], None),
    "lora_b": lambda shape, k: (None, k[1]),
    "lora_magnitude": lambda shape, k: (k[1],),
    "ia3": _ia3,
}


def adapter_axes(tree: dict, base_axes: dict) -> dict:
    """A tree like `tree` (an adapted tree, or just its trainable part) whose
    leaves are tuples of logical axis names: base leaves as in `base_axes`
    (leaves are tuples or PartitionSpecs, as `nn.get_partition_spec` gives;
    a top-level 'params' is looked through), adapter leaves by `RULES`."""
    if "params" in base_axes and "params" not in tree:
        base_axes = base_axes["params"]
    return _walk(tree, base_axes, ())


def _walk(tree: dict, base_axes: dict, where: tuple[str, ...]) -> dict:
    out = {}
    for name, value in tree.items():
        path = where + (name,)
        if isinstance(value, dict):
            out[name] = _walk(value, base_axes.get(name, {}), path)
        elif not is_adapter_path(path):
            if name not in base_axes:
                raise KeyError(f"{'/'.join(path)}: no axes in base_axes; pass the axes of the "
                               "same model's base tree")
            out[name] = qarray.axes(value, tuple(base_axes[name]))
        elif name in RULES and "kernel" in base_axes:
            out[name] = RULES[name](tuple(np.shape(value)), tuple(base_axes["kernel"]))
        elif name in RULES and "kernels" in base_axes:  # one leaf per expert, stacked
            expert, *kernel = tuple(base_axes["kernels"])
            out[name] = (expert, *RULES[name](tuple(np.shape(value))[1:], tuple(kernel)))
        else:
            out[name] = (None,) * len(np.shape(value))
    return out
