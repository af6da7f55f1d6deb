"""The evaluation loop and scoring, and the files it writes.

Reference: LLM-Adapters (Hu et al. 2023) `evaluate.py` / `commonsense_evaluate.py`,
which generate one prompt at a time (batch 1, no KV cache reuse across
examples) with 4 beams and score as in `eval/extract.py`. Here prompts are
built and tokenized as in training (eval/prompts.py) and decoded in batches
by eval/generator.py (greedy, or beam search with `num_beams > 1`).

Scoring-only mode reads existing generations (JSON or JSONL records with
`question`/`instruction`, `generation`/`output_pred`/`output`/`chain-of-thought`
and `answer`; the LLM-Adapters GPT-3.5 logs and LLM-Adapters' own
`experiment/*.json` files as they are) and scores them the same way. In those
experiment files `output` is the dataset's reference answer, copied from the
test record, and `output_pred` the model's generation, so `output_pred` is
read first.

Writes to `output_dir`: `<dataset>.jsonl` (one line per example: index,
question, generation, pred, label, correct), `summary.json` ({"datasets":
{name: {n, correct, accuracy, ...}}, "config": ...}), `results.md`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from eval import extract
from eval.generator import Generator, encode_prompts, load_generator
from eval.tasks import Task, check_labels, check_records, get_task, load_task_records, read_records
from flax_adapters import sharding


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One `python -m eval` run (see `eval/__main__.py` for the flags)."""

    datasets: tuple[str, ...]
    output_dir: str
    data_path: str | None = None
    generations: str | None = None  # scoring-only mode: a file of existing generations
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    adapter: str | None = None  # an adapter directory, any format fa.save_adapter writes
    dtype: str = "float32"
    template: str = "alpaca"
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: per task, 256 math / 32 commonsense
    num_beams: int = 1
    letter_rule: str = "robust"  # the rule behind `accuracy` on letter tasks (AQuA)
    compute_dtype: str = "float32"  # the model's activations (logits stay float32)
    quantize: str = "none"  # the base as it is read: none, nf4 or int8
    mesh: str | None = None  # "data=2,fsdp=2,tensor=2" (-1: the rest); None: one device

    def __post_init__(self):
        if not self.datasets:
            raise ValueError("no dataset given; pass --dataset NAME [NAME ...]")
        if self.generations and len(self.datasets) != 1:
            raise ValueError("--generations scores one dataset; pass exactly one --dataset")
        if not self.generations and not self.data_path:
            raise ValueError("pass --data_path (the LLM-Adapters dataset directory, a JSON file "
                             "or a hub dataset id), or --generations FILE to score generations")
        for name, value, low in (("limit", self.limit, 1), ("batch_size", self.batch_size, 1),
                                 ("max_new_tokens", self.max_new_tokens, 1),
                                 ("num_beams", self.num_beams, 1)):
            if value is not None and value < low:
                raise ValueError(f"--{name} must be >= {low}, got {value}")
        if self.letter_rule not in extract.LETTER_RULES:
            raise ValueError(f"--letter_rule must be one of {extract.LETTER_RULES}, "
                             f"got {self.letter_rule!r}")
        for name, value, choices in (("dtype", self.dtype, DTYPES),
                                     ("compute_dtype", self.compute_dtype, DTYPES),
                                     ("quantize", self.quantize, QUANTIZE)):
            if value not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.mesh is not None:
            mesh_config(self.mesh)  # a malformed spec fails before any loading


DTYPES = ("float32", "bfloat16")
QUANTIZE = ("none", "nf4", "int8")


def mesh_config(spec: str) -> sharding.MeshConfig:
    """`--mesh data=2,fsdp=2,tensor=2` (train's mesh.data / mesh.fsdp /
    mesh.tensor) as a sharding.MeshConfig. An axis left out is 1, except
    data when no axis is -1: it takes the remaining devices, as in train."""
    sizes: dict[str, int] = {}
    for part in filter(None, spec.replace(" ", ",").split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in sharding.MESH_AXES or key in sizes:
            raise ValueError(f"--mesh {spec!r}: expected comma-separated AXIS=SIZE with each "
                             f"axis one of {', '.join(sharding.MESH_AXES)} at most once, e.g. "
                             "--mesh data=2,fsdp=2,tensor=2")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {spec!r}: {key}={value!r} is not an integer") from None
        if sizes[key] < 1 and sizes[key] != -1:
            raise ValueError(f"--mesh {spec!r}: {key}={value} must be a device count >= 1, or "
                             "-1 for the remaining devices")
    if not sizes:
        raise ValueError(f"--mesh {spec!r}: name at least one axis, e.g. --mesh data=8")
    return sharding.MeshConfig(**{"data": -1 if -1 not in sizes.values() else 1, "fsdp": 1,
                                  "tensor": 1, **sizes})


# ----------------------------------------------------------------------------- scoring

def score_example(task: Task, generation: str, label: Any) -> dict[str, Any]:
    """The extracted answer(s) and correctness of one generation.

    {"pred", "correct"}; letter tasks hold one pair per rule:
    {"pred": {"robust": "D", "llm_adapters": "A"}, "correct": {...}}.
    """
    text = extract.response_text(generation)
    if task.answer == "number":
        pred = extract.extract_number(text)
        return {"pred": pred if math.isfinite(pred) else None,
                "correct": extract.number_correct(pred, label)}
    if task.answer == "option":
        pred = extract.extract_option(text, task.options)
        return {"pred": pred, "correct": pred == label}
    preds = {rule: extract.extract_letter(text, rule) for rule in extract.LETTER_RULES}
    return {"pred": preds, "correct": {rule: p == label for rule, p in preds.items()}}


def summarize(task: Task, rows: Sequence[dict], letter_rule: str = "robust") -> dict[str, Any]:
    """{"n", "correct", "accuracy"} (accuracy a fraction in [0, 1]); letter tasks
    add "rule" and "by_rule": {rule: {"correct", "accuracy"}}."""
    n = len(rows)
    if task.answer != "letter":
        correct = sum(bool(r["correct"]) for r in rows)
        return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0}
    by_rule = {}
    for rule in extract.LETTER_RULES:
        c = sum(bool(r["correct"][rule]) for r in rows)
        by_rule[rule] = {"correct": c, "accuracy": c / n if n else 0.0}
    return {"n": n, **by_rule[letter_rule], "rule": letter_rule, "by_rule": by_rule}


# LLM-Adapters' experiment files hold the test record (whose `output` is the
# reference answer) plus `output_pred`, the generation: `output_pred` first.
GENERATION_FIELDS = ("generation", "output_pred", "output", "chain-of-thought")
QUESTION_FIELDS = ("question", "instruction")


def _first(rec: dict, fields: Sequence[str]) -> Any:
    return next(rec[f] for f in fields if rec.get(f) is not None)


def score_generations_file(task: Task, path: str | pathlib.Path,
                           limit: int | None = None) -> list[dict]:
    """Per-example rows for a file of existing generations (scoring-only mode)."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--generations {str(path)!r} is not a file")
    records = read_records(path)[:limit]
    check_records(records, str(path), (QUESTION_FIELDS, GENERATION_FIELDS, ("answer",)))
    check_labels(task, records, str(path))
    return [{"index": i, "question": _first(rec, QUESTION_FIELDS),
             "generation": _first(rec, GENERATION_FIELDS), "label": rec["answer"],
             **score_example(task, _first(rec, GENERATION_FIELDS), rec["answer"])}
            for i, rec in enumerate(records)]


# ----------------------------------------------------------------------------- generation

def evaluate_task(generator: Generator, task: Task, records: Sequence[dict], template: str = "alpaca",
                  max_new_tokens: int | None = None, desc: str | None = None,
                  show_progress: bool = True) -> tuple[list[dict], dict]:
    """(per-example rows, timing) of `generator` on `records` of `task`.

    timing: {"seconds", "examples_per_s", "new_tokens", "new_tokens_per_s"};
    the seconds include compilation.
    """
    prompt_ids = encode_prompts(records, generator.tokenizer, template)
    n_new = max_new_tokens or task.max_new_tokens
    start = time.perf_counter()
    with tqdm(total=len(prompt_ids), desc=desc or task.name, unit="ex",
              disable=not show_progress) as bar:
        texts, counts = generator.generate(prompt_ids, n_new, progress=bar.update)
    seconds = time.perf_counter() - start
    rows = [{"index": i, "question": rec.get("instruction", rec.get("question")),
             "generation": text, "label": rec["answer"], "new_tokens": count,
             **score_example(task, text, rec["answer"])}
            for i, (rec, text, count) in enumerate(zip(records, texts, counts))]
    timing = {"seconds": seconds, "examples_per_s": len(rows) / seconds,
              "new_tokens": sum(counts), "new_tokens_per_s": sum(counts) / seconds}
    return rows, timing


# ----------------------------------------------------------------------------- outputs

def _percent(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown_table(results: dict[str, dict]) -> str:
    """Accuracy (%) per dataset; letter tasks get a row per extraction rule."""
    lines = ["| dataset | n | accuracy (%) |", "|---|---:|---:|"]
    for name, r in results.items():
        if "by_rule" in r:
            for rule, v in r["by_rule"].items():
                lines.append(f"| {name} ({rule} rule) | {r['n']} | {_percent(v['accuracy'])} |")
        else:
            lines.append(f"| {name} | {r['n']} | {_percent(r['accuracy'])} |")
    scored = [r["accuracy"] for r in results.values()]
    if len(scored) > 1:
        lines.append(f"| average | | {_percent(sum(scored) / len(scored))} |")
    return "\n".join(lines) + "\n"


def write_outputs(output_dir: str | pathlib.Path, rows_by_task: dict[str, list[dict]],
                  summary: dict) -> None:
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in rows_by_task.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(summary["datasets"]))


def run(cfg: EvalConfig) -> dict:
    """Evaluates (or, with `cfg.generations`, scores) every dataset of `cfg`,
    writes the outputs and returns the summary."""
    tasks = [get_task(name) for name in cfg.datasets]  # unknown names fail before any loading
    rows_by_task: dict[str, list[dict]] = {}
    results: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    if cfg.generations:
        task = tasks[0]
        rows_by_task[task.name] = score_generations_file(task, cfg.generations, cfg.limit)
    else:
        loaded = [(t, load_task_records(t, cfg.data_path, cfg.limit)) for t in tasks]
        mesh = None if cfg.mesh is None else sharding.make_mesh(mesh_config(cfg.mesh))
        generator = load_generator(cfg.model, cfg.adapter, cfg.dtype, cfg.num_beams,
                                   cfg.batch_size, cfg.compute_dtype, cfg.quantize, mesh)
        for i, (task, (records, _)) in enumerate(loaded):
            rows, timing = evaluate_task(generator, task, records, cfg.template,
                                         cfg.max_new_tokens, f"{task.name} [{i + 1}/{len(loaded)}]")
            rows_by_task[task.name], timings[task.name] = rows, timing
    for name, rows in rows_by_task.items():
        results[name] = summarize(get_task(name), rows, cfg.letter_rule)
        if name in timings:
            results[name]["throughput"] = timings[name]
    summary = {"datasets": results, "config": dataclasses.asdict(cfg)}
    write_outputs(cfg.output_dir, rows_by_task, summary)
    return summary
