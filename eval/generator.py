"""A model ready to answer prompts, for `python -m eval` and for
`python -m train`'s held-out accuracy: the Flax module, its parameter tree
(a base, or base + adapter in any format `save_adapter` writes) and the
tokenizer; greedy decoding by the jitted KV-cache decoder
(`flax_adapters.generate`) or beam search (eval/beam.py).

Prompts are built and tokenized as in training (eval/prompts.py), sorted by
length and decoded in batches; shapes are bucketed, so a whole dataset
compiles a handful of times. Sorting does not change results: rows of a
batch never interact.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import flax_adapters as fa
from eval.beam import beam_search
from eval.prompts import encode_prompt
from flax_adapters import sharding
from flax_adapters.adapters.axes import adapter_axes
from flax_adapters.generate import eos_ids
from flax_adapters.models.registry import logical_axes


@dataclasses.dataclass
class Generator:
    """`generate(prompt_ids, max_new_tokens)` over batches of `batch_size`;
    `num_beams` 1 decodes greedily, more runs beam search. `params` is the
    tree the model reads (materialized). With `mesh`, `params` lie on it as
    in training and the decode is traced on it, so the models' `constrain`
    shards each batch of prompts over (data, fsdp) (sharding.RULES 'batch';
    a batch bucket those axes do not divide is replicated instead)."""

    model: Any
    params: Any
    tokenizer: Any
    num_beams: int = 1
    batch_size: int = 16
    mesh: Any = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return eos_ids(self.model.cfg, self.tokenizer)

    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                 progress: Callable[[int], Any] | None = None) -> tuple[list[str], list[int]]:
        """(texts, new-token counts) for tokenized prompts, in their order.

        The count includes the EOS token when one was generated.
        """
        ids = [list(t) for t in prompt_ids]
        eos = self.eos_ids
        pad = self.model.cfg.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        order = np.argsort([len(t) for t in ids], kind="stable")  # similar lengths share a batch
        texts: list[str] = [""] * len(ids)
        counts: list[int] = [0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = [ids[r] for r in rows]
            if self.num_beams == 1:
                out = self._on_mesh(fa.generate)(self.model, self.params, batch,
                                                 fa.GenerationConfig(max_new_tokens=max_new_tokens,
                                                                     eos_token_ids=eos,
                                                                     pad_token_id=pad))
            else:
                out = self._on_mesh(beam_search)(self.model, self.params, batch, self.num_beams,
                                                 max_new_tokens, eos, pad)
            for r, toks in zip(rows, out.tolist()):
                n = next((i + 1 for i, t in enumerate(toks) if t in eos), len(toks))
                counts[r] = n
                texts[r] = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
            if progress is not None:
                progress(len(rows))
        return texts, counts

    def _on_mesh(self, fn: Callable) -> Callable:
        return fn if self.mesh is None else sharding.on_mesh(fn, self.mesh)


def load_generator(model_path: str | None, adapter: str | None, dtype: str = "float32",
                   num_beams: int = 1, batch_size: int = 16, compute_dtype: str = "float32",
                   quantize: str = "none", mesh: Any = None) -> Generator:
    """The base model (default: the embedded SmolLM2-135M-Instruct), plus the
    adapter directory `adapter` in any format `fa.save_adapter` writes
    (PEFT, LLM-Adapters' BOTTLENECK, a fully fine-tuned model directory).

    `dtype` stores the base, `quantize` ("none", "nf4", "int8") quantizes it
    as it is read, `compute_dtype` is the model's activation dtype (logits
    stay float32), as in training. With `mesh` (a jax.sharding.Mesh) the
    base is read straight into its training sharding and the adapter's
    leaves are laid out beside it (adapters/axes.py)."""
    pre = fa.load_pretrained(model_path or fa.default_model_path(), dtype, quantize, mesh=mesh)
    model_type = pre.config.model_type
    params, cfg = pre.params, None
    if adapter:  # before the tokenizer check, as before the redesign: a wrong adapter says so
        params, cfg = fa.load_adapter(adapter, pre.params, model_type)
    if pre.tokenizer is None:
        raise ValueError(f"{model_path}: the checkpoint has no tokenizer files; evaluation "
                         "needs one")
    compute = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
    model = fa.model_class(pre.config)(pre.config, settings=fa.settings_for(cfg, model_type),
                                       dtype=compute)
    if mesh is not None:  # the base leaves are there already: device_put leaves them be
        params = jax.device_put(params, sharding.tree_shardings(
            adapter_axes(params, logical_axes(pre.config)), params, mesh))
    return Generator(model, fa.materialize(params), pre.tokenizer, num_beams, batch_size, mesh)


def encode_prompts(records: Sequence[dict], tokenizer: Any, template: str) -> list[list[int]]:
    """Token ids of each record's prompt, built and tokenized exactly as in
    training (`eval.prompts.encode_prompt`); a record's question may be
    under `instruction` or `question`."""
    return [encode_prompt({**rec, "instruction": rec.get("instruction", rec.get("question"))},
                          tokenizer, template) for rec in records]
