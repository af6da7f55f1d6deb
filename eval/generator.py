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

import numpy as np

import flax_adapters as fa
from eval.beam import beam_search
from eval.prompts import encode_prompt
from flax_adapters.generate import eos_ids


@dataclasses.dataclass
class Generator:
    """`generate(prompt_ids, max_new_tokens)` over batches of `batch_size`;
    `num_beams` 1 decodes greedily, more runs beam search. `params` is the
    tree the model reads (materialized)."""

    model: Any
    params: Any
    tokenizer: Any
    num_beams: int = 1
    batch_size: int = 16

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
                out = fa.generate(self.model, self.params, batch, fa.GenerationConfig(
                    max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=pad))
            else:
                out = beam_search(self.model, self.params, batch, self.num_beams, max_new_tokens,
                                  eos, pad)
            for r, toks in zip(rows, out.tolist()):
                n = next((i + 1 for i, t in enumerate(toks) if t in eos), len(toks))
                counts[r] = n
                texts[r] = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
            if progress is not None:
                progress(len(rows))
        return texts, counts


def load_generator(model_path: str | None, adapter: str | None, dtype: str = "float32",
                   num_beams: int = 1, batch_size: int = 16) -> Generator:
    """The base model (default: the embedded SmolLM2-135M-Instruct), plus the
    adapter directory `adapter` in any format `fa.save_adapter` writes
    (PEFT, LLM-Adapters' BOTTLENECK, a fully fine-tuned model directory)."""
    pre = fa.load_pretrained(model_path or fa.default_model_path(), dtype)
    model_type = pre.config.model_type
    params, cfg = pre.params, None
    if adapter:  # before the tokenizer check, as before the redesign: a wrong adapter says so
        params, cfg = fa.load_adapter(adapter, pre.params, model_type)
    if pre.tokenizer is None:
        raise ValueError(f"{model_path}: the checkpoint has no tokenizer files; evaluation "
                         "needs one")
    model = fa.model_class(pre.config)(pre.config, settings=fa.settings_for(cfg, model_type))
    return Generator(model, fa.materialize(params), pre.tokenizer, num_beams, batch_size)


def encode_prompts(records: Sequence[dict], tokenizer: Any, template: str) -> list[list[int]]:
    """Token ids of each record's prompt, built and tokenized exactly as in
    training (`eval.prompts.encode_prompt`); a record's question may be
    under `instruction` or `question`."""
    return [encode_prompt({**rec, "instruction": rec.get("instruction", rec.get("question"))},
                          tokenizer, template) for rec in records]
