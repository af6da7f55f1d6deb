"""Evaluation throughput: our jitted decoder vs a transformers `generate` loop.

    python -m eval.bench --data_path ../shared/data/llm_adapters --dataset gsm8k \\
        --limit 32 --batch_size 16 --max_new_tokens 128

Both sides get the same prompts (built by `eval.run.encode_prompts`), sorted
by length into the same batches, greedy decoding, the same EOS ids and the
same `max_new_tokens`; both count generated tokens up to and including EOS.
Our timings are warm: a batch whose call compiled is run again and its
compiling call is reported apart (`compiling_calls_seconds`); a full
evaluation compiles once per (prompt bucket, batch bucket).
transformers runs in PyTorch (CPU, float32) on the same GGUF model through its
GGUF loader, left-padded with an attention mask, one `generate` call per
batch. A benchmark, not library code: it needs the test extras (torch).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _batches(prompt_ids, batch_size):
    order = np.argsort([len(t) for t in prompt_ids], kind="stable")
    return [[prompt_ids[r] for r in order[s:s + batch_size]]
            for s in range(0, len(order), batch_size)]


def _count(rows, eos):
    return sum(next((i + 1 for i, t in enumerate(r) if t in eos), len(r)) for r in rows)


def bench_ours(generator, batches, max_new_tokens):
    """Per-batch seconds after compilation, tokens, and the seconds of the
    calls that compiled (a batch that compiles is timed again, warm)."""
    from flax_adapters.generate import GenerationConfig, generate, num_compilations
    eos = generator.eos_ids
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos,
                           pad_token_id=eos[0])
    times, tokens, compile_calls = [], 0, []
    for batch in batches:
        while True:
            before = num_compilations()
            start = time.perf_counter()
            out = generate(generator.model, generator.params, batch, cfg)
            seconds = time.perf_counter() - start
            if num_compilations() == before:
                break
            compile_calls.append(seconds)
        times.append(seconds)
        tokens += _count(out.tolist(), set(eos))
    return times, tokens, compile_calls


def bench_transformers(gguf_path, batches, max_new_tokens, eos):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32).eval()
    times, tokens = [], 0
    for batch in batches:
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), eos[0], dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, toks in enumerate(batch):
            ids[r, width - len(toks):], mask[r, width - len(toks):] = torch.tensor(toks), 1
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens,
                                 eos_token_id=list(eos), pad_token_id=eos[0])
        times.append(time.perf_counter() - start)
        tokens += _count(out[:, width:].tolist(), set(eos))
    return times, tokens, []


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

    from eval.run import encode_prompts, load_generator
    from eval.tasks import get_task, load_task_records
    from flax_adapters.checkpoints.load import default_model_path

    task = get_task(args.dataset)
    records, _ = load_task_records(task, args.data_path, args.limit)
    generator = load_generator(None, None, batch_size=args.batch_size)
    batches = _batches(encode_prompts(records, generator.tokenizer, args.template),
                       args.batch_size)
    report = {"dataset": task.name, "examples": len(records), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens}
    for name, (times, tokens, compile_calls) in (
            ("ours", bench_ours(generator, batches, args.max_new_tokens)),
            ("transformers", bench_transformers(default_model_path(), batches,
                                                args.max_new_tokens, generator.eos_ids))):
        total = sum(times)
        report[name] = {"seconds": round(total, 2), "new_tokens": tokens,
                        "compiling_calls_seconds": [round(t, 2) for t in compile_calls], "examples_per_s": round(len(records) / total, 3),
                        "new_tokens_per_s": round(tokens / total, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
