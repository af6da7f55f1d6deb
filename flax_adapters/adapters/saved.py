"""modules_to_save: base modules trained beside an adapter, as PEFT 0.21 does
it (`LoraConfig(modules_to_save=[...])`; peft/utils/other.py
`_set_trainable` and `ModulesToSaveWrapper`).

Selection is PEFT's: a module is selected when its name ends with one of
the given strings -- a plain string suffix, so "norm" selects the final
norm and every input_layernorm and post_attention_layernorm. Module names
are ours with '.' for '/' ('layers_0.input_layernorm', 'lm_head'), which
end like Hugging Face's ('model.layers.0.input_layernorm').

PEFT trains a copy of each selected module while the original stays in
the frozen base. Here the selected base leaves themselves are trainable:

    tree = {'lm_head': H, 'norm': {'scale': g}, 'layers_0': {... 'lora_a': A ...}}
    split(tree, trainable(('lm_head', 'norm')))
      -> frozen: everything else; trainable: {'lm_head': H, 'norm': {'scale': g}, ...lora...}

so no copy is made, and the untouched originals are the base checkpoint
itself (combine the trained part with a freshly loaded base to switch
adapters). The PEFT export writes the trained tensors under the module's
own name (peft_io.py), which PEFT loads into `modules_to_save.default`.
"""

from __future__ import annotations

from typing import Callable, Sequence

from flax_adapters.adapters.tree import BASE_LEAVES, is_adapter_leaf
from flax_adapters.quant.array import is_quantized


def module_name(path: Sequence[str]) -> str:
    """('layers_0', 'input_layernorm', 'scale') -> 'layers_0.input_layernorm';
    a top-level leaf is its own module: ('lm_head',) -> 'lm_head'."""
    return ".".join(path[:-1]) if len(path) > 1 else path[0]


def selects(names: Sequence[str], path: Sequence[str]) -> bool:
    """Whether base leaf `path` belongs to a module that `names` select."""
    if not names or path[-1] not in BASE_LEAVES:
        return False
    module = module_name(path)
    return any(module.endswith(n) for n in names)


def trainable(names: Sequence[str]) -> Callable[[tuple[str, ...]], bool]:
    """`split`'s predicate: adapter leaves, and the base leaves of `names`."""
    names = tuple(names)
    return lambda path: is_adapter_leaf(path) or selects(names, path)


def _modules(tree: dict, prefix: tuple[str, ...] = ()):
    """(path, value, the dict holding it) of every base leaf."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _modules(v, prefix + (k,))
        elif k in BASE_LEAVES:
            yield prefix + (k,), v, tree


def check(tree: dict, names: Sequence[str]) -> list[tuple[str, ...]]:
    """The base leaf paths `names` select in an adapted `tree`; an error if a
    name selects nothing, or a selected module is also adapted, quantized or
    a tied embedding."""
    leaves = list(_modules(tree))
    chosen = [(p, v, holder) for p, v, holder in leaves if selects(names, p)]
    for n in names:
        if not any(module_name(p).endswith(n) for p, _, _ in chosen):
            existing = sorted({module_name(p).split(".")[-1] for p, _, _ in leaves})
            raise ValueError(f"modules_to_save {n!r} matches no module that holds weights; "
                             f"the modules are named {existing}")
    for path, value, holder in chosen:
        name = module_name(path)
        if any(not isinstance(v, dict) and is_adapter_leaf((k,)) for k, v in holder.items()):
            raise ValueError(f"modules_to_save selects {name}, which the adapter also "
                             "modifies; a module is either adapted or saved, not both")
        if is_quantized(value):
            raise ValueError(f"modules_to_save selects {name}, which is quantized and so "
                             "cannot be trained; keep it in float (QuantConfig.skip, which "
                             "python -m train sets to modules_to_save)")
        if path == ("embed_tokens",) and "lm_head" not in tree:
            raise ValueError("modules_to_save selects embed_tokens, but this model ties it to "
                             "the output head; PEFT would train a copy used for the input only, "
                             "which a tied tree cannot hold")
    return [p for p, _, _ in chosen]
