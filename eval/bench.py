"""Evaluation throughput: our jitted decoder vs a transformers `generate` loop.

    python -m eval.bench --data_path ../shared/data/llm_adapters --dataset gsm8k \\
        --limit 32 --batch_size 16 --max_new_tokens 128

Both sides get the same prompts (built by `eval.generator.encode_prompts`), sorted
by length into the same batches, greedy decoding, the same EOS ids and the
same `max_new_tokens`; both count generated tokens up to and including EOS.
Both sides run batch by batch, interleaved (ours, then transformers, on the
same batch), so the load of a shared machine hits both alike; the printed
ratio is of the summed seconds. Our timings are warm: a batch whose call
compiled is run again and its compiling call is reported apart
(`compiling_calls_seconds`); a full evaluation compiles once per (prompt
bucket, batch bucket). `identical_generations` counts rows whose tokens (up
to EOS) are the same on both sides.
transformers runs in PyTorch (CPU, float32) on the same GGUF model through its
GGUF loader, left-padded with an attention mask, one `generate` call per
batch. A benchmark, not library code: it needs the test extras (torch).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from tqdm.auto import tqdm


def _batches(prompt_ids, batch_size):
    order = np.argsort([len(t) for t in prompt_ids], kind="stable")
    return [[prompt_ids[r] for r in order[s:s + batch_size]]
            for s in range(0, len(order), batch_size)]


def _cut(row, eos):
    """A generated row up to and including its first EOS."""
    return row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]


def _count(rows, eos):
    return sum(len(_cut(r, eos)) for r in rows)


class Ours:
    """One batch through our jitted decoder, timed warm: a call that compiled
    is run again and its seconds are kept apart (`compile_calls`)."""

    def __init__(self, generator, max_new_tokens):
        from flax_adapters.generate import GenerationConfig
        self.generator, self.compile_calls = generator, []
        eos = generator.eos_ids
        self.cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos,
                                    pad_token_id=eos[0])

    def __call__(self, batch) -> tuple[float, list[list[int]]]:
        from flax_adapters.generate import generate, num_compilations
        while True:
            before = num_compilations()
            start = time.perf_counter()
            out = generate(self.generator.model, self.generator.params, batch, self.cfg)
            seconds = time.perf_counter() - start
            if num_compilations() == before:
                return seconds, out.tolist()
            self.compile_calls.append(seconds)


class Transformers:
    """One batch through transformers' `generate` (PyTorch, CPU, float32) on the
    same GGUF through its GGUF loader, left-padded with an attention mask."""

    def __init__(self, gguf_path, max_new_tokens, eos):
        import torch
        import transformers
        self.torch, self.max_new_tokens, self.eos = torch, max_new_tokens, eos
        self.compile_calls = []
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()

    def __call__(self, batch) -> tuple[float, list[list[int]]]:
        torch = self.torch
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), self.eos[0], dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, toks in enumerate(batch):
            ids[r, width - len(toks):], mask[r, width - len(toks):] = torch.tensor(toks), 1
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      num_beams=1, max_new_tokens=self.max_new_tokens,
                                      eos_token_id=list(self.eos), pad_token_id=self.eos[0])
        return time.perf_counter() - start, out[:, width:].tolist()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True)
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--template", default="alpaca")
    args = p.parse_args(argv)

    from eval.generator import encode_prompts, load_generator
    from eval.tasks import get_task, load_task_records
    from flax_adapters.checkpoints.load import default_model_path

    task = get_task(args.dataset)
    records, _ = load_task_records(task, args.data_path, args.limit)
    generator = load_generator(None, None, batch_size=args.batch_size)
    batches = _batches(encode_prompts(records, generator.tokenizer, args.template),
                       args.batch_size)
    report = {"dataset": task.name, "examples": len(records), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "load_average_start": os.getloadavg()[0]}
    sides = {"ours": Ours(generator, args.max_new_tokens),
             "transformers": Transformers(default_model_path(), args.max_new_tokens,
                                          generator.eos_ids)}
    eos = set(generator.eos_ids)
    times = {name: [] for name in sides}
    tokens = dict.fromkeys(sides, 0)
    same = 0
    # Interleaved batch by batch, so that the load of a shared machine hits both alike.
    for batch in tqdm(batches, desc="batches (ours, then transformers)"):
        outs = {}
        for name, side in sides.items():
            seconds, outs[name] = side(batch)
            times[name].append(seconds)
            tokens[name] += _count(outs[name], eos)
        same += sum(_cut(a, eos) == _cut(b, eos) for a, b in zip(outs["ours"], outs["transformers"]))
    for name, side in sides.items():
        total = sum(times[name])
        report[name] = {"seconds": round(total, 2), "new_tokens": tokens[name],
                        "compiling_calls_seconds": [round(t, 2) for t in side.compile_calls],
                        "examples_per_s": round(len(records) / total, 3),
                        "new_tokens_per_s": round(tokens[name] / total, 1)}
    report["identical_generations"] = f"{same}/{len(records)}"
    report["load_average_end"] = os.getloadavg()[0]
    ours, theirs = report["ours"], report["transformers"]
    print(json.dumps(report, indent=2))
    print(f"\n| | examples/s | new tokens/s |\n|---|---|---|\n"
          f"| ours | {ours['examples_per_s']} | {ours['new_tokens_per_s']} |\n"
          f"| transformers | {theirs['examples_per_s']} | {theirs['new_tokens_per_s']} |\n"
          f"| ratio | {ours['examples_per_s'] / theirs['examples_per_s']:.2f}x | "
          f"{ours['new_tokens_per_s'] / theirs['new_tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
