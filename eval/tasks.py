"""The evaluation datasets: names, files, answer kinds, and loading.

Reference: LLM-Adapters (Hu et al. 2023) `evaluate.py` (math: numbers, AQuA
letters; 256 new tokens) and `commonsense_evaluate.py` (option tokens; 32 new
tokens). Data files use the LLM-Adapters layout, `<data dir>/<Name>/test.json`,
each a JSON list of {"instruction", "input", "output", "answer"}.

Names are matched case-insensitively ("gsm8k", "AQuA", "arc-easy"). The
data location always comes from the caller (`--data_path`): a directory in
the LLM-Adapters layout, one JSON/JSONL file (for a single dataset), or a
hub dataset id, tried only when the path does not exist locally.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

MATH_MAX_NEW_TOKENS = 256  # LLM-Adapters evaluate.py
COMMONSENSE_MAX_NEW_TOKENS = 32  # LLM-Adapters commonsense_evaluate.py


@dataclasses.dataclass(frozen=True)
class Task:
    """One dataset. `answer` is how its label is read from a generation:
    "number" (last number), "letter" (A-E) or "option" (first of `options`)."""

    name: str  # spelled as the LLM-Adapters dataset folder
    family: str  # "math" or "commonsense"
    answer: str
    options: tuple[str, ...] = ()

    @property
    def max_new_tokens(self) -> int:
        return MATH_MAX_NEW_TOKENS if self.family == "math" else COMMONSENSE_MAX_NEW_TOKENS

    @property
    def relative_path(self) -> str:
        return f"{self.name}/test.json"


def _options(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


_ANSWERS5 = _options("answer", 5)
TASKS: dict[str, Task] = {t.name.lower(): t for t in (
    Task("gsm8k", "math", "number"),
    Task("AQuA", "math", "letter"),
    Task("AddSub", "math", "number"),
    Task("MultiArith", "math", "number"),
    Task("SingleEq", "math", "number"),
    Task("SVAMP", "math", "number"),
    Task("mawps", "math", "number"),
    # MathQA's options are letters inside the instruction, like AQuA's.
    Task("mathqa", "math", "letter"),
    Task("boolq", "commonsense", "option", ("true", "false")),
    Task("piqa", "commonsense", "option", _options("solution", 2)),
    Task("social_i_qa", "commonsense", "option", _ANSWERS5),
    Task("hellaswag", "commonsense", "option", _options("ending", 4)),
    Task("winogrande", "commonsense", "option", _options("option", 2)),
    Task("ARC-Easy", "commonsense", "option", _ANSWERS5),
    Task("ARC-Challenge", "commonsense", "option", _ANSWERS5),
    Task("openbookqa", "commonsense", "option", _ANSWERS5),
)}


def get_task(name: str) -> Task:
    """The task called `name` (case-insensitive)."""
    task = TASKS.get(name.strip().lower())
    if task is None:
        known = ", ".join(t.name for t in TASKS.values())
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}")
    return task


def read_records(path: pathlib.Path) -> list[dict[str, Any]]:
    """Records of a JSON list file or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no} is neither part of a JSON list nor a "
                                 f"JSON object ({e.msg})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def check_records(records: list[Any], source: str, fields: tuple[tuple[str, ...], ...]) -> None:
    """Raises naming the first record that is not an object or lacks a field.

    `fields` lists alternatives per required field, e.g. (("instruction",
    "question"), ("answer",)).
    """
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{source}: record {i} is a {type(rec).__name__}, expected an "
                             f"object with fields {[f[0] for f in fields]}")
        for alternatives in fields:
            if not any(rec.get(f) is not None for f in alternatives):  # "" is a valid text
                raise ValueError(f"{source}: record {i} has no {' or '.join(map(repr, alternatives))}"
                                 f" (its fields: {sorted(rec)})")


def check_labels(task: Task, records: list[dict], source: str) -> None:
    """Raises naming the first record whose `answer` this task cannot score."""
    for i, rec in enumerate(records):
        label = rec["answer"]
        if task.answer == "number":
            try:
                float(label)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: record {i} has answer {label!r}, but {task.name} "
                                 "answers are numbers") from None
        elif task.answer == "letter" and label not in ("A", "B", "C", "D", "E"):
            raise ValueError(f"{source}: record {i} has answer {label!r}, but {task.name} answers "
                             "are letters A-E")
        elif task.answer == "option" and label not in task.options:
            raise ValueError(f"{source}: record {i} has answer {label!r}, but {task.name} answers "
                             f"are one of {task.options}")


def _from_hub(task: Task, hub_id: str) -> list[dict]:
    try:
        import datasets
        ds = datasets.load_dataset(hub_id, split="test")
    except Exception as e:  # noqa: BLE001 -- any hub failure means the same to the user
        raise FileNotFoundError(
            f"--data_path {hub_id!r} is not a local file or directory and could not be loaded "
            f"from the hub ({type(e).__name__}); pass the LLM-Adapters dataset directory") from None
    return [dict(r) for r in ds]


def load_task_records(task: Task, data_path: str | pathlib.Path,
                      limit: int | None = None) -> tuple[list[dict], str]:
    """(records, source) of `task`: the first `limit` test records, validated.

    `data_path` is an LLM-Adapters dataset directory (holding `<Name>/test.json`,
    the folder name matched case-insensitively), a single JSON/JSONL file, or
    a hub dataset id.
    """
    path = pathlib.Path(data_path).expanduser()
    if path.is_dir():
        folder = next((d for d in sorted(path.iterdir())
                       if d.is_dir() and d.name.lower() == task.name.lower()), None)
        file = (folder or path / task.name) / "test.json"
        if not file.exists():
            present = sorted(d.name for d in path.iterdir() if (d / "test.json").exists())
            raise FileNotFoundError(f"{task.name}: no {task.relative_path} under {path}; "
                                    f"datasets present there: {', '.join(present) or 'none'}")
        records, source = read_records(file), str(file)
    elif path.is_file():
        records, source = read_records(path), str(path)
    else:
        records, source = _from_hub(task, str(data_path)), str(data_path)
    if limit is not None:
        records = records[:limit]
    check_records(records, source, (("instruction", "question"), ("answer",)))
    check_labels(task, records, source)
    return records, source
