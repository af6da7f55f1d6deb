"""The data side of `python -m train`: records -> prompts -> tokens -> batches.

Follows LLM-Adapters' finetune.py (AGI-Edgerunners/LLM-Adapters), which took it
from tloen/alpaca-lora:
  * records are `{"instruction", "input", "output"[, "answer"]}`, read with
    `datasets.load_dataset("json", data_files=...)` or by hub name (we parse
    local files with Python's json instead: see `_load_json`);
  * `generate_prompt` puts them in the Alpaca template; the prompt is
    tokenized with the output as ONE string, truncated to `cutoff_len`
    (default 256), and EOS is appended unless the text was truncated;
  * with `train_on_inputs=False` the first `user_prompt_len` tokens, counted by
    tokenizing the prompt alone, are excluded from the loss;
  * the validation split is `train_test_split(test_size=val_set_size,
    shuffle=True, seed=42)`.

Where we differ, and why:
  * Templates. "llm_adapters" is finetune.py's f-string verbatim, with the 16
    spaces of source indentation and the trailing spaces inside it (use it to
    match adapters trained by LLM-Adapters). "alpaca", the default, is the
    template those strings were copied from (alpaca-lora's templates/alpaca.json).
    Its response starts on a fresh line, so the prompt's tokens are a prefix of
    the prompt+output tokens under both BPE and SentencePiece. With the verbatim
    strings they are not: the prompt ends in 16 spaces, and a byte-level BPE
    tokenizes them as a single token when the prompt stands alone (generation)
    but as 15 spaces + " Word" inside prompt+output (training), so the model is
    evaluated on a prompt ending it never saw in training (measured with
    SmolLM2's tokenizer: every embedded:arith example mismatches).
    `Tokenized.prefix_mismatches` counts such examples. "chat" uses the
    tokenizer's chat template (user = instruction [+ input], assistant = output).
  * Padding is on the right with an explicit `valid` mask (LLM-Adapters pads
    on the left with id 0), and lengths are padded up to a small fixed set of
    buckets, so the jitted step compiles once per bucket instead of once per
    length.
  * The train order is a pure function of (seed, step): `TrainBatches.batch_at`.
    Resuming needs only the step number, which the checkpoint already holds.
  * Several processes (multi-host): each tokenizes only its share of the
    records and loads only the rows of each global batch that its devices
    hold; the global batch, its order and its padding are the same for every
    process count (`SharedExamples`, `TrainBatches.batch_at(step, rows)`).

Batch layout (numpy, right padded, t = a bucket size):
    tokens    (b, t) int32  token ids; padding = pad id
    valid     (b, t) bool   True on real tokens
    loss_mask (b, t) bool   loss_mask[r, i] is True iff the prediction made AT
                            position i (of token i + 1) counts in the loss:
                            token i + 1 is real and is a target (not prompt,
                            when train_on_inputs=False). The last real position
                            and all padding are False.
The train step computes `xent(logits[:, :-1], tokens[:, 1:])` weighted by
`loss_mask[:, :-1]`: LLM-Adapters' `labels != -100` shifted left by one.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from eval.prompts import add_special_tokens, prompt_for_eval
from train import arith

if TYPE_CHECKING:
    from train.config import DataConfig

Record = dict[str, Any]
Batch = dict[str, np.ndarray]

EMBEDDED_ARITH = "embedded:arith"
EMBEDDED_SEED = 0  # fixed, so every run (whatever its seed) is scored on the same test items
VAL_SPLIT_SEED = 42  # LLM-Adapters' train_test_split seed: same split for every run seed
GROUP_BY_LENGTH_MEGABATCH = 50  # batches per length-sorted group, as HF's LengthGroupedSampler

# ------------------------------------------------------------------------- tokenize


class Example(NamedTuple):
    tokens: np.ndarray  # (n,) int32, n <= cutoff_len
    prompt_len: int     # leading tokens that are not loss targets (0: train_on_inputs)


class Tokenized(NamedTuple):
    examples: Sequence[Example]
    truncated: int           # examples that reached cutoff_len without EOS (cut off)
    no_target: int           # examples whose every token is masked (prompt >= cutoff_len)
    prefix_mismatches: int   # prompt tokens not a prefix of prompt+output tokens


def tokenize(records: Sequence[Record], tokenizer: Any, *, template: str = "alpaca",
             cutoff_len: int = 256, train_on_inputs: bool = True) -> Tokenized:
    """LLM-Adapters' `generate_and_tokenize_prompt` over all records (batched calls)."""
    each = _tokenize_each(records, tokenizer, template=template, cutoff_len=cutoff_len,
                          train_on_inputs=train_on_inputs)
    return Tokenized([e for e, _, _ in each], sum(t for _, t, _ in each),
                     sum(e.prompt_len >= len(e.tokens) for e, _, _ in each),
                     sum(m for _, _, m in each))


def _tokenize_each(records: Sequence[Record], tokenizer: Any, *, template: str,
                   cutoff_len: int, train_on_inputs: bool) -> list[tuple[Example, bool, bool]]:
    """(example, truncated, prompt tokens not a prefix) per record."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token")
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be >= 2, got {cutoff_len}")
    if not records:
        return []
    special = add_special_tokens(template)
    prompts = [prompt_for_eval(r, template, tokenizer) for r in records]
    fulls = [p + r["output"] for p, r in zip(prompts, records)]

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=cutoff_len,
                         add_special_tokens=special)["input_ids"]

    out = []
    for ids, p_ids in zip(encode(fulls), encode(prompts)):
        ids = list(ids)
        # As finetune.py: EOS only if there is room; a truncated text gets none.
        truncated = False
        if ids[-1] != eos and len(ids) < cutoff_len:
            ids.append(eos)
        else:
            truncated = ids[-1] != eos
        prompt_len = 0 if train_on_inputs else min(len(p_ids), len(ids))
        out.append((Example(np.asarray(ids, np.int32), prompt_len), truncated,
                    ids[:len(p_ids)] != list(p_ids)))
    return out

# ------------------------------------------------------------------------- processes


def _gather_alone(local: np.ndarray) -> np.ndarray:
    return local[None]


class Share(NamedTuple):
    """This process's part of the data work, and how to swap results.

    `gather` takes the same-shape array (k, ...) on every process and returns
    all of them stacked in process order, (count, k, ...); with one process it
    is `local[None]` (train/distributed.py gives the multi-process one)."""

    index: int = 0
    count: int = 1
    gather: Callable[[np.ndarray], np.ndarray] = _gather_alone


class SharedExamples(Sequence[Example]):
    """The tokenized examples of `records`, tokenized by all processes together.

    Each process tokenizes its share, records[index::count], up front; the
    processes then swap the lengths (a few ints per example), so every one
    knows every example's length and prompt length, which the batch order,
    the buckets and the dropping of target-less examples depend on, while
    holding tokens only for its share. An example outside it is tokenized
    when one of this process's batch rows needs it (`take`)."""

    def __init__(self, records: Sequence[Record], lengths: np.ndarray, prompt_lens: np.ndarray,
                 local: dict[int, Example], tokenize_kw: dict, tokenizer: Any):
        self.records, self.lengths, self.prompt_lens = records, lengths, prompt_lens
        self._local, self._kw, self._tokenizer = local, tokenize_kw, tokenizer

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        return self.take([i])[0]

    def take(self, indices: Sequence[int]) -> list[Example]:
        missing = [int(i) for i in indices if int(i) not in self._local]
        made = dict(zip(missing, (e for e, _, _ in _tokenize_each(
            [self.records[i] for i in missing], self._tokenizer, **self._kw))))
        return [self._local[int(i)] if int(i) in self._local else made[int(i)] for i in indices]

    def subset(self, keep: np.ndarray) -> "SharedExamples":
        """Examples `keep` (indices, in order), renumbered from 0."""
        local = {new: self._local[old] for new, old in enumerate(keep.tolist())
                 if old in self._local}
        return SharedExamples([self.records[i] for i in keep], self.lengths[keep],
                              self.prompt_lens[keep], local, self._kw, self._tokenizer)


def tokenize_shared(records: Sequence[Record], tokenizer: Any, share: Share = Share(), *,
                    template: str = "alpaca", cutoff_len: int = 256,
                    train_on_inputs: bool = True) -> Tokenized:
    """`tokenize`, done by the processes together (see `SharedExamples`); the
    counts are those of all records. Every process must call it with the same
    records (one `gather` per call)."""
    kw = dict(template=template, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)
    mine = range(share.index, len(records), share.count)
    each = _tokenize_each([records[i] for i in mine], tokenizer, **kw)
    k = -(-len(records) // share.count)  # the same row count on every process
    stats = np.full((k, 4), -1, np.int64)  # length, prompt_len, truncated, mismatch
    for j, (ex, truncated, mismatch) in enumerate(each):
        stats[j] = len(ex.tokens), ex.prompt_len, truncated, mismatch
    every = share.gather(stats) if records else np.zeros((share.count, 0, 4), np.int64)
    # Process p tokenized records p, p + count, ...: row j of process p is
    # record j * count + p, so interleaving the processes restores record order.
    every = np.swapaxes(every, 0, 1).reshape(-1, 4)[:len(records)]
    lengths, prompt_lens = every[:, 0], every[:, 1]
    examples = SharedExamples(records, lengths, prompt_lens,
                              {i: e for i, (e, _, _) in zip(mine, each)}, kw, tokenizer)
    return Tokenized(examples, int(every[:, 2].sum()), int((prompt_lens >= lengths).sum()),
                     int(every[:, 3].sum()))


def _take(examples: Sequence[Example], indices: Sequence[int]) -> list[Example]:
    if isinstance(examples, SharedExamples):
        return examples.take(indices)
    return [examples[i] for i in indices]


def _lengths(examples: Sequence[Example]) -> np.ndarray:
    if isinstance(examples, SharedExamples):
        return examples.lengths
    return np.array([len(e.tokens) for e in examples], np.int64)

# ------------------------------------------------------------------------- batches


def bucket_sizes(cutoff_len: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from `smallest` below `cutoff_len`, then `cutoff_len`.

    (32, 64, 128, 256) for the default: at most 2x padding, and only four
    shapes for the jitted step to compile."""
    sizes, s = [], smallest
    while s < cutoff_len:
        sizes.append(s)
        s *= 2
    return (*sizes, cutoff_len)


def loss_window(lengths: np.ndarray, prompt_lens: np.ndarray, multiple: int = 8) -> int:
    """An upper bound on the counted (loss) positions of any row, given the
    examples' token and prompt lengths: the train step computes logits only
    for a window this long (see `flax_adapters.step.token_loss`). Rounded up to
    `multiple` so that near-equal datasets share a compiled step."""
    spans = np.asarray(lengths) - np.maximum(np.asarray(prompt_lens), 1)
    span = int(spans.max()) if spans.size else 1
    return -(-max(span, 1) // multiple) * multiple


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"sequence of {length} tokens is longer than the largest bucket "
                     f"{max(buckets)}; the buckets must reach cutoff_len")


def collate(examples: Sequence[Example], seq_len: int, pad_id: int,
            n_rows: int | None = None) -> Batch:
    """Right-padded batch of `examples`; rows past len(examples) (up to n_rows)
    are all padding with valid and loss_mask False (they add nothing to a loss)."""
    n_rows = len(examples) if n_rows is None else n_rows
    tokens = np.full((n_rows, seq_len), pad_id, np.int32)
    valid = np.zeros((n_rows, seq_len), bool)
    loss_mask = np.zeros((n_rows, seq_len), bool)
    for r, ex in enumerate(examples):
        n = len(ex.tokens)
        tokens[r, :n] = ex.tokens
        valid[r, :n] = True
        # position i predicts token i + 1; it counts if that token is a target
        loss_mask[r, max(ex.prompt_len, 1) - 1:n - 1] = True
    return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask}


class TrainBatches:
    """Training batches as a pure function of (seed, step).

    Epoch e is a permutation drawn from `np.random.default_rng([seed, e])`, cut
    into `len(examples) // batch_size` full batches (the remainder is dropped;
    a new permutation drops different examples each epoch). Each batch is
    padded to the smallest bucket that holds its longest example, the same for
    every process. With `group_by_length`, examples are sorted by length
    within groups of 50 batches (HF's LengthGroupedSampler, which LLM-Adapters'
    `group_by_length` flag turns on) and the batch order is then shuffled, so
    batches need less padding without a saw-tooth loss curve.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, *, seed: int,
                 buckets: Sequence[int], pad_id: int, group_by_length: bool = False):
        if batch_size < 1 or len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples cannot fill one batch of "
                             f"{batch_size}; lower batch_size or add data")
        self.examples = examples if isinstance(examples, SharedExamples) else list(examples)
        self.lengths = _lengths(self.examples)
        if self.lengths.max() > max(buckets):
            raise ValueError(f"an example has {self.lengths.max()} tokens, more than the "
                             f"largest bucket {max(buckets)}")
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.buckets = tuple(sorted(buckets))
        self.group_by_length = group_by_length
        self.steps_per_epoch = len(self.examples) // batch_size
        self._cache: tuple[int, np.ndarray] | None = None  # (epoch, its order)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, batch_size) example indices of `epoch`."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.examples))
        if self.group_by_length:
            size = GROUP_BY_LENGTH_MEGABATCH * self.batch_size
            perm = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")]
                                   for g in np.split(perm, range(size, len(perm), size))])
        order = perm[:self.steps_per_epoch * self.batch_size].reshape(
            self.steps_per_epoch, self.batch_size)
        if self.group_by_length:
            order = order[rng.permutation(self.steps_per_epoch)]
        self._cache = (epoch, order)
        return order

    def indices_at(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[i]

    def batch_at(self, step: int, rows: Sequence[int] | None = None) -> Batch:
        """The batch of `step` (0-based), or only its rows `rows` (indices into
        it: a process's share, train/distributed.py `process_rows`). The padded
        width is that of the whole batch, the same on every process."""
        idx = self.indices_at(step)
        seq_len = bucket_for(int(self.lengths[idx].max()), self.buckets)
        chosen = idx if rows is None else idx[np.asarray(rows)]
        return collate(_take(self.examples, chosen), seq_len, self.pad_id)

    def iterate(self, start_step: int = 0, rows: Sequence[int] | None = None) -> Iterator[Batch]:
        """Endless batches from `start_step`: resuming at step s gives exactly
        the batches an uninterrupted run gives from s on."""
        step = start_step
        while True:
            yield self.batch_at(step, rows)
            step += 1


def eval_batches(examples: Sequence[Example], batch_size: int, *, buckets: Sequence[int],
                 pad_id: int, rows: Sequence[int] | None = None) -> Iterator[Batch]:
    """Every example once, in batches of exactly `batch_size` rows (the last one
    padded with empty rows), or only rows `rows` (sorted) of each. Sorted by
    length to cut padding: the order of a summed loss does not matter."""
    lengths = _lengths(examples)
    order = np.argsort(lengths, kind="stable")
    rows = np.arange(batch_size) if rows is None else np.asarray(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seq_len = bucket_for(int(lengths[chunk].max()), buckets)
        # rows past the chunk's end are the empty padding rows
        mine = [chunk[r] for r in rows if r < len(chunk)]
        yield collate(_take(examples, mine), seq_len, pad_id, n_rows=len(rows))

# ------------------------------------------------------------------------- loading


def _check_records(records: list[Record], where: str) -> list[Record]:
    if not records:
        raise ValueError(f"{where}: contains no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: record {i} is {type(r).__name__}, not an object with "
                             f"instruction/input/output")
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str):
                fields = ", ".join(sorted(k for k, v in r.items() if v is not None))
                raise ValueError(f"{where}: record {i} has no string {key!r} (its fields: "
                                 f"{fields}); expected LLM-Adapters records "
                                 f"{{instruction, input, output[, answer]}}")
        if r.get("input") is not None and not isinstance(r["input"], str):
            raise ValueError(f"{where}: record {i} has an 'input' of type "
                             f"{type(r['input']).__name__}; it must be a string (or absent)")
    return [{**r, "input": r.get("input") or ""} for r in records]


def _load_json(path: pathlib.Path) -> list[Record]:
    """A JSON list of records, or JSON lines (one record per line).

    Parsed with Python's json rather than `load_dataset("json")` as
    LLM-Adapters does: the records are the same, but pyarrow's JSON reader
    (under datasets) segfaults on deeply nested input (measured: 100,000
    brackets), taking the whole run down with no message."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; {_SET_DATA_PATH}" if not path.exists() else
                                f"data path {path} is not a file; pass an LLM-Adapters .json")
    line = 0  # of the JSON line being parsed; 0 for a whole-file document
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not data
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = []
            for line, content in enumerate(text.splitlines(), 1):
                if content.strip():
                    records.append(json.loads(content))
    except json.JSONDecodeError as bad:
        raise ValueError(f"{path}: invalid JSON ({bad.msg} at line {line or bad.lineno}, "
                         f"column {bad.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to be a list of records") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: not a JSON list of records (got {type(records).__name__})")
    return _check_records(records, str(path))


def _load_hub(name: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 -- any hub failure means the same to the user
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"data path {name!r} is not a local file and could not be loaded as "
                         f"a hub dataset ({type(e).__name__}: {first}); the hub may be "
                         f"unreachable: pass a local LLM-Adapters .json file or "
                         f"{EMBEDDED_ARITH!r}") from None
    return _check_records(ds.to_list(), name)


_SET_DATA_PATH = (f"set data.path to an LLM-Adapters JSON file (e.g. math_10k.json or "
                  f"commonsense_170k.json from the LLM-Adapters repository's ft-training_set/), "
                  f"a hub dataset name, or {EMBEDDED_ARITH!r}")


def check_source(path: str) -> None:
    """Fails early, with the fix in the message, when `path` names a local
    JSON file that is not there (hub names and embedded sources pass)."""
    p = pathlib.Path(path).expanduser()
    if not path.startswith("embedded:") and p.suffix in (".json", ".jsonl") and not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist; {_SET_DATA_PATH}")


def load_records(path: str, *, embedded_train_size: int = 2000,
                 embedded_test_size: int = 64) -> tuple[list[Record], list[Record]]:
    """(records to train on, held-out test records).

    `path` is `embedded:arith`, a local LLM-Adapters JSON file (a list of
    records, or JSON lines), or a hub dataset name (its "train" split). Only
    the embedded source has its own test split; for files it is empty."""
    if path.startswith("embedded:"):
        if path != EMBEDDED_ARITH:
            raise ValueError(f"unknown embedded data source {path!r}; the one there is is "
                             f"{EMBEDDED_ARITH!r}")
        return arith.make_split(embedded_train_size, embedded_test_size, EMBEDDED_SEED)
    p = pathlib.Path(path).expanduser()
    if p.exists() or p.suffix in (".json", ".jsonl"):
        return _load_json(p), []
    return _load_hub(path), []


def split_validation(records: list[Record], val_set_size: int,
                     seed: int = VAL_SPLIT_SEED) -> tuple[list[Record], list[Record]]:
    """(train, val) as LLM-Adapters: `train_test_split(test_size=val_set_size,
    shuffle=True, seed=42)` of the datasets library, so the same seed gives
    LLM-Adapters' own split of the same file."""
    if val_set_size <= 0:
        return list(records), []
    if val_set_size >= len(records):
        raise ValueError(f"val_set_size={val_set_size} leaves nothing to train on "
                         f"({len(records)} records)")
    import datasets

    # Split row numbers, not the records: the permutation depends only on the
    # count and the seed, and pyarrow would refuse records whose fields mix
    # types (an `answer` that is "3" in one record and 3 in the next).
    parts = datasets.Dataset.from_dict({"i": list(range(len(records)))}).train_test_split(
        test_size=val_set_size, shuffle=True, seed=seed, keep_in_memory=True)
    return [records[i] for i in parts["train"]["i"]], [records[i] for i in parts["test"]["i"]]


class Splits(NamedTuple):
    train: list[Record]
    val: list[Record]   # held out from train for the validation loss
    test: list[Record]  # held out for generation accuracy: embedded test split, else val


def load_splits(path: str, *, val_set_size: int, embedded_train_size: int = 2000,
                embedded_test_size: int = 64) -> Splits:
    records, test = load_records(path, embedded_train_size=embedded_train_size,
                                 embedded_test_size=embedded_test_size)
    try:
        train, val = split_validation(records, val_set_size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return Splits(train, val, test or val)


class Prepared(NamedTuple):
    train: TrainBatches
    val: Sequence[Example]  # for eval_batches
    test: list[Record]   # for prompt_for_eval + the `answer` field
    info: dict           # counts worth logging


def prepare(cfg: "DataConfig", tokenizer: Any, *, batch_size: int, seed: int,
            share: Share = Share()) -> Prepared:
    """Everything `python -m train` needs from its `data` config section.
    With several processes, each tokenizes only its `share` (see
    `SharedExamples`); the batches are the same for every process count."""
    splits = load_splits(cfg.path, val_set_size=cfg.val_set_size,
                         embedded_train_size=cfg.embedded_train_size,
                         embedded_test_size=cfg.embedded_test_size)
    kw = dict(template=cfg.template, cutoff_len=cfg.cutoff_len,
              train_on_inputs=cfg.train_on_inputs)
    train = tokenize_shared(splits.train, tokenizer, share, **kw)
    val = tokenize_shared(splits.val, tokenizer, share, **kw)
    # An example whose prompt fills cutoff_len has no target token: it would add
    # nothing to the loss, so it is dropped, counted and reported.
    ex = train.examples
    kept = np.flatnonzero(ex.prompt_lens < ex.lengths)
    if not len(kept):
        raise ValueError(f"all {len(ex)} training examples are cut off before "
                         f"their answer by cutoff_len={cfg.cutoff_len} (the prompt alone fills "
                         "it); raise data.cutoff_len or set data.train_on_inputs=true")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    buckets = bucket_sizes(cfg.cutoff_len)
    batches = TrainBatches(ex.subset(kept), batch_size, seed=seed, buckets=buckets,
                           pad_id=pad_id)
    # The held-out accuracy scores numbers (LLM-Adapters' math rule): records
    # without a numeric `answer` (commonsense labels, none at all) are not scored.
    test = [r for r in splits.test if _is_number(r.get("answer"))]
    info = {"train": len(splits.train), "val": len(splits.val), "test": len(test),
            "test_unscored": len(splits.test) - len(test),
            "buckets": buckets, "steps_per_epoch": batches.steps_per_epoch,
            "loss_window": loss_window(
                np.concatenate([ex.lengths, val.examples.lengths]),
                np.concatenate([ex.prompt_lens, val.examples.prompt_lens])),
            "truncated": train.truncated + val.truncated,
            "no_target": train.no_target + val.no_target,
            "prefix_mismatches": train.prefix_mismatches + val.prefix_mismatches}
    return Prepared(batches, val.examples, test, info)


def _is_number(answer: Any) -> bool:
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return False
    try:
        return math.isfinite(float(answer))
    except ValueError:
        return False
