"""modules_to_save: base modules trained beside an adapter, as PEFT 0.21 does
it (`LoraConfig(modules_to_save=[...])`; peft/utils/other.py
`_set_trainable` and `ModulesToSaveWrapper`).

Selection is PEFT's: a module is selected when its Hugging Face name (of
the model's family: 'model.layers.0.input_layernorm' in LLaMA,
'transformer.ln_f' in GPT-J) ends with one of the given strings -- a plain
string suffix, so on LLaMA "norm" selects the final norm and every
input_layernorm and post_attention_layernorm. The names are PEFT's, so an
adapter_config.json means the same modules here and in PEFT.

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


def module_name(path: Sequence[str], model_type: str = "llama") -> str:
    """The Hugging Face name of the module holding base leaf `path`:
    ('layers_0', 'input_layernorm', 'scale') -> 'model.layers.0.input_layernorm';
    GPT-J's ('lm_head_bias',) -> 'lm_head' (the bias of the head module)."""
    # Imported here: checkpoints.hf imports quant, which imports this module.
    from flax_adapters.checkpoints.hf import path_to_hf_name
    return path_to_hf_name(tuple(path), model_type).rpartition(".")[0]


def selects(names: Sequence[str], path: Sequence[str], model_type: str = "llama") -> bool:
    """Whether base leaf `path` belongs to a module that `names` select."""
    if not names or path[-1] not in BASE_LEAVES:
        return False
    module = module_name(path, model_type)
    return any(module.endswith(n) for n in names)


def trainable(names: Sequence[str], model_type: str = "llama"
              ) -> Callable[[tuple[str, ...]], bool]:
    """`split`'s predicate: adapter leaves, and the base leaves of `names`."""
    names = tuple(names)
    return lambda path: is_adapter_leaf(path) or selects(names, path, model_type)


def _modules(tree: dict, prefix: tuple[str, ...] = ()):
    """(path, value, the dict holding it) of every base leaf."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _modules(v, prefix + (k,))
        elif k in BASE_LEAVES:
            yield prefix + (k,), v, tree


def check(tree: dict, names: Sequence[str], model_type: str = "llama"
          ) -> list[tuple[str, ...]]:
    """The base leaf paths `names` select in an adapted `tree`; an error if a
    name selects nothing, or a selected module is also adapted, quantized or
    a tied embedding."""
    leaves = [(p, v, holder, module_name(p, model_type)) for p, v, holder in _modules(tree)]
    chosen = [leaf for leaf in leaves if any(leaf[3].endswith(n) for n in names)]
    for n in names:
        if not any(m.endswith(n) for *_, m in chosen):
            existing = sorted({m.split(".")[-1] for *_, m in leaves})
            raise ValueError(f"modules_to_save {n!r} matches no module that holds weights; "
                             f"the modules are named {existing}")
    for path, value, holder, name in chosen:
        if any(not isinstance(v, dict) and is_adapter_leaf((k,)) for k, v in holder.items()):
            raise ValueError(f"modules_to_save selects {name}, which the adapter also "
                             "modifies; a module is either adapted or saved, not both")
        if is_quantized(value):
            raise ValueError(f"modules_to_save selects {name}, which is quantized and so "
                             "cannot be trained; keep it in float (QuantConfig.skip, which "
                             "python -m train sets to modules_to_save)")
        if path == ("embed_tokens",) and "lm_head" not in tree:
            raise ValueError(f"modules_to_save selects {name}, but this model ties it to "
                             "the output head; PEFT would train a copy used for the input only, "
                             "which a tied tree cannot hold")
    return [p for p, *_ in chosen]
