"""`python -m eval`: evaluate a model (optionally + adapter) on LLM-Adapters'
math and commonsense sets, or score existing generations. See eval/run.py.

    python -m eval --dataset gsm8k AQuA boolq --data_path ../shared/data/llm_adapters \\
        --output_dir out/eval --limit 100 [--adapter DIR] [--num_beams 4]
    python -m eval --dataset gsm8k --generations gpt35_logs/gsm8k_1.json --output_dir out/gpt35
"""

from __future__ import annotations

import argparse
import sys

from eval.tasks import TASKS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", "--datasets", nargs="+", required=True, dest="datasets",
                   help="dataset names, case-insensitive: " + ", ".join(t.name for t in TASKS.values()))
    p.add_argument("--data_path", "--data_dir", dest="data_path",
                   help="LLM-Adapters dataset directory (<Name>/test.json), a JSON/JSONL file "
                        "for one dataset, or a hub dataset id")
    p.add_argument("--generations", help="score this JSON/JSONL file of existing generations "
                                         "instead of generating")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", help="HF model directory or .gguf file (default: the embedded "
                                   "SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="adapter directory to apply to --model, as python -m train "
                                     "writes it: PEFT (LoRA, DoRA, IA3, prefix, prompt), "
                                     "LLM-Adapters BOTTLENECK (series, parallel), or a fully "
                                     "fine-tuned model directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage dtype of the base weights")
    p.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the activations (logits stay float32), as model.compute_dtype "
                        "in training")
    p.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"],
                   help="quantize the base weights as they are read, as model.quantize in "
                        "training")
    p.add_argument("--mesh", help="evaluate on a device mesh, e.g. data=8 or "
                                  "data=2,fsdp=2,tensor=2 (-1: the remaining devices): prompts "
                                  "data-parallel, the base sharded as in training, read straight "
                                  "into its shards (default: one device)")
    p.add_argument("--template", default="alpaca",
                   help="prompt template, as in training: alpaca, llm_adapters or chat")
    p.add_argument("--limit", type=int, help="evaluate the first N examples of each dataset")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int,
                   help="default: 256 for math, 32 for commonsense (LLM-Adapters)")
    p.add_argument("--num_beams", type=int, default=1,
                   help="1 = greedy; LLM-Adapters reports 4")
    p.add_argument("--letter_rule", default="robust", choices=["robust", "llm_adapters"],
                   help="extraction rule behind `accuracy` on AQuA/MathQA (both are reported)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flax_adapters.runtime import keep_freed_memory
    keep_freed_memory()  # before JAX allocates anything; see flax_adapters/runtime.py
    from eval.run import EvalConfig, markdown_table, run  # after parsing: --help stays fast
    try:  # a bad value (e.g. --mesh data=3 on 8 devices) is one error line, not a traceback
        cfg = EvalConfig(datasets=tuple(args.datasets), output_dir=args.output_dir,
                         data_path=args.data_path, generations=args.generations,
                         model=args.model, adapter=args.adapter, dtype=args.dtype,
                         template=args.template, limit=args.limit, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                         letter_rule=args.letter_rule, compute_dtype=args.compute_dtype,
                         quantize=args.quantize, mesh=args.mesh)
        summary = run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(summary["datasets"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
