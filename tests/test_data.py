"""train/data.py and train/arith.py: templates, masking, truncation, buckets,
deterministic and resumable batches, per-process rows and tokenization,
loading and its errors.

The tokenizer is a real `tokenizers` WordLevel model built here (no hub, no
model file): whitespace/punctuation split, so token boundaries are exact and
the prompt's tokens are always a prefix of prompt+output's.
"""

import json
import pathlib
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eval import prompts
from train import arith, data

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    train, test = arith.make_split(300, 50, seed=0)
    corpus = [prompts.generate_prompt(r, t) for r in train + test
              for t in ("alpaca", "llm_adapters")]
    corpus += ["Below is an instruction that describes a task, paired with an input that "
               "provides further context. ### Input: user assistant"]
    specials = ["<unk>", "<pad>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = sorted({w for text in corpus for w, _ in
                    pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    vocab = {w: i for i, w in enumerate(specials + words)}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<pad>",
                                eos_token="</s>", additional_special_tokens=specials[3:])
    t.chat_template = CHATML
    return t


@pytest.fixture(scope="module")
def records():
    return arith.make_split(200, 20, seed=0)[0]


def rec(instruction="Add 2 and 3.", output="2 + 3 = 5. The answer is 5.", input=""):
    return {"instruction": instruction, "input": input, "output": output, "answer": "5"}

# ---------------------------------------------------------------------- templates


def test_alpaca_template_exact():
    assert prompts.prompt_for_eval(rec("Q?")) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nQ?\n\n### Response:\n")
    assert prompts.prompt_for_eval(rec("Q?", input="ctx")) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nQ?\n\n### Input:\nctx\n\n### Response:\n")


def test_llm_adapters_template_verbatim():
    # finetune.py's f-string: 16 spaces of source indentation on every line after
    # the first, blank lines of 16 spaces, 1 (input) / 2 (no input) trailing spaces.
    pad = "                "
    assert prompts.generate_prompt(rec("Q?", "A."), "llm_adapters") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.  \n\n"
        + pad + "### Instruction:\n" + pad + "Q?\n" + pad + "\n"
        + pad + "### Response:\n" + pad + "A.")
    assert prompts.generate_prompt(rec("Q?", "A.", input="ctx"), "llm_adapters") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request. \n\n"
        + pad + "### Instruction:\n" + pad + "Q?\n" + pad + "\n"
        + pad + "### Input:\n" + pad + "ctx\n" + pad + "\n"
        + pad + "### Response:\n" + pad + "A.")


@pytest.mark.parametrize("template", prompts.TEMPLATES)
def test_training_text_is_eval_prompt_plus_output(tok, template):
    r = rec(input="ctx")
    prompt = prompts.prompt_for_eval(r, template, tok)
    assert prompts.generate_prompt(r, template, tok) == prompt + r["output"]
    assert r["output"] not in prompt


def test_chat_template(tok):
    prompt = prompts.prompt_for_eval(rec("Q?", input="ctx"), "chat", tok)
    assert prompt == "<|im_start|>user\nQ?\n\nctx<|im_end|>\n<|im_start|>assistant\n"
    assert not prompts.add_special_tokens("chat") and prompts.add_special_tokens("alpaca")
    with pytest.raises(ValueError, match="chat template"):
        prompts.prompt_for_eval(rec(), "chat", None)
    with pytest.raises(ValueError, match="unknown prompt template"):
        prompts.prompt_for_eval(rec(), "vicuna")

# ---------------------------------------------------------------------- tokenize


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_prompt_masking(tok, records, train_on_inputs):
    out = data.tokenize(records[:8], tok, cutoff_len=256, train_on_inputs=train_on_inputs)
    assert out.prefix_mismatches == 0 and out.truncated == 0
    batch = data.collate(out.examples, 128, tok.pad_token_id, n_rows=10)
    for r, (record, ex) in enumerate(zip(records, out.examples)):
        n = len(ex.tokens)
        n_prompt = len(prompts.encode_prompt(record, tok))
        targets = np.flatnonzero(batch["loss_mask"][r]) + 1  # the tokens predicted
        first = n_prompt if not train_on_inputs else 1
        np.testing.assert_array_equal(targets, np.arange(first, n))
        assert ex.prompt_len == (0 if train_on_inputs else n_prompt)
        assert tok.decode(ex.tokens[n_prompt:]) == tok.decode(
            tok(record["output"])["input_ids"]) + " </s>"
        assert batch["valid"][r].sum() == n and not batch["valid"][r, n:].any()
        assert (batch["tokens"][r, n:] == tok.pad_token_id).all()
        assert ex.tokens[-1] == tok.eos_token_id
    assert not batch["valid"][8:].any() and not batch["loss_mask"][8:].any()
    assert batch["tokens"].dtype == np.int32 and batch["valid"].dtype == bool


def test_truncation_at_cutoff_len(tok, records):
    full = data.tokenize(records[:4], tok, cutoff_len=256)
    cut = data.tokenize(records[:4], tok, cutoff_len=20, train_on_inputs=False)
    assert cut.truncated == 4 and full.truncated == 0
    for a, b in zip(full.examples, cut.examples):
        assert len(b.tokens) == 20 and b.tokens[-1] != tok.eos_token_id  # no EOS when cut
        np.testing.assert_array_equal(b.tokens, a.tokens[:20])
    # the prompt alone is longer than 20 tokens: nothing left to learn
    assert cut.no_target == 4
    assert not data.collate(cut.examples, 32, 0)["loss_mask"].any()
    # room for exactly the text but not EOS: no EOS, as finetune.py
    n = len(full.examples[0].tokens) - 1
    exact = data.tokenize(records[:1], tok, cutoff_len=n).examples[0]
    np.testing.assert_array_equal(exact.tokens, full.examples[0].tokens[:-1])

# ---------------------------------------------------------------------- batches


def make_batches(tok, records, seed=0, batch_size=8, **kw):
    ex = data.tokenize(records, tok, cutoff_len=64, train_on_inputs=False).examples
    return data.TrainBatches(ex, batch_size, seed=seed, buckets=data.bucket_sizes(64, 16),
                             pad_id=tok.pad_token_id, **kw)


def test_bucket_sizes():
    assert data.bucket_sizes(256) == (32, 64, 128, 256)
    assert data.bucket_sizes(200) == (32, 64, 128, 200)
    assert data.bucket_for(33, (32, 64)) == 64 and data.bucket_for(32, (32, 64)) == 32
    with pytest.raises(ValueError, match="largest bucket"):
        data.bucket_for(65, (32, 64))


def varied_lengths(records, seed=0):
    """The records cut at random word counts: lengths from ~27 tokens (the bare
    template) to past the cutoff."""
    rng = np.random.default_rng(seed)
    cut = lambda text: " ".join(text.split()[:rng.integers(1, len(text.split()) + 1)])  # noqa
    out = [{**r, "instruction": cut(r["instruction"]), "output": cut(r["output"])}
           for r in records]
    return out + [{**r, "instruction": r["instruction"] * 3} for r in records[:20]]


def test_batches_use_only_the_bucket_sizes(tok, records):
    b = make_batches(tok, varied_lengths(records), batch_size=1)
    widths = {b.batch_at(s)["tokens"].shape[1] for s in range(2 * b.steps_per_epoch)}
    assert widths == {32, 64}  # of (16, 32, 64): 16 is below the bare template's length
    b8 = make_batches(tok, varied_lengths(records), batch_size=8)
    assert {b8.batch_at(s)["tokens"].shape for s in range(b8.steps_per_epoch)} == {(8, 64)}
    assert max(b.lengths) == 64  # truncated at cutoff_len


def test_shuffling_is_deterministic_and_covers_each_epoch(tok, records):
    a, b, c = make_batches(tok, records), make_batches(tok, records), \
        make_batches(tok, records, seed=1)
    spe = a.steps_per_epoch
    assert spe == len(records) // 8
    for s in range(2 * spe + 3):
        for k, v in a.batch_at(s).items():
            np.testing.assert_array_equal(v, b.batch_at(s)[k])
    epoch0 = np.concatenate([a.indices_at(s) for s in range(spe)])
    assert len(set(epoch0)) == len(epoch0) == spe * 8  # no repeats within an epoch
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))  # reshuffled per epoch
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))  # seed matters


def test_resume_gives_the_uninterrupted_sequence(tok, records):
    uninterrupted = make_batches(tok, records).iterate()
    expected = [next(uninterrupted) for _ in range(40)]  # crosses epoch boundaries (25/epoch)
    first = make_batches(tok, records).iterate()
    got = [next(first) for _ in range(13)]
    resumed = make_batches(tok, records).iterate(start_step=13)  # a fresh process
    got += [next(resumed) for _ in range(27)]
    for e, g in zip(expected, got, strict=True):
        for k in e:
            np.testing.assert_array_equal(e[k], g[k])


def test_group_by_length_cuts_padding(tok, records):
    varied = varied_lengths(records)
    plain, grouped = make_batches(tok, varied), make_batches(tok, varied, group_by_length=True)

    def padding(b):  # to each batch's longest example, whatever the bucket
        lengths = [b.lengths[b.indices_at(s)] for s in range(b.steps_per_epoch)]
        return sum((x.max() - x).sum() for x in lengths)

    assert padding(grouped) < padding(plain) / 4
    order = grouped.epoch_order(0).ravel()
    assert len(set(order)) == len(order)
    first_batches = [grouped.indices_at(s) for s in range(3)]
    assert make_batches(tok, varied, group_by_length=True).indices_at(2).tolist() == \
        first_batches[2].tolist()


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_rows_reassemble_the_global_batch(tok, records, process_count):
    b = make_batches(tok, varied_lengths(records))
    per = 8 // process_count
    for step in (0, 7, 30):
        full = b.batch_at(step)
        parts = [b.batch_at(step, range(i * per, (i + 1) * per)) for i in range(process_count)]
        for k in full:  # same rows, same order, same padded width on every process
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
        # the rows of one process under accumulation (2 micro-batches of 4, fsdp 2)
        for k, v in b.batch_at(step, [0, 1, 4, 5]).items():
            np.testing.assert_array_equal(v, full[k][[0, 1, 4, 5]])


def test_eval_batches_see_every_example_once(tok, records):
    ex = data.tokenize(records[:21], tok, cutoff_len=64, train_on_inputs=False).examples
    batches = list(data.eval_batches(ex, 8, buckets=(32, 64), pad_id=tok.pad_token_id))
    assert [b["tokens"].shape[0] for b in batches] == [8, 8, 8]
    assert sum(b["valid"].any(1).sum() for b in batches) == 21
    assert sum(b["loss_mask"].sum() for b in batches) == sum(
        len(e.tokens) - e.prompt_len for e in ex)
    halves = [list(data.eval_batches(ex, 8, buckets=(32, 64), pad_id=tok.pad_token_id,
                                     rows=range(i * 4, i * 4 + 4))) for i in range(2)]
    for whole, a, b in zip(batches, *halves, strict=True):
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k])


class CountingTokenizer:
    """The real tokenizer, counting the texts it is asked to encode."""

    def __init__(self, tok):
        self.tok, self.texts = tok, 0

    def __call__(self, texts, **kw):
        self.texts += len(texts)
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def prepare_on_processes(tok, cfg, count, batch_size=8):
    """`data.prepare` run by `count` simulated processes (threads), whose
    `gather` is a real all-gather: each blocks until every one has posted."""
    import threading

    posted, barrier = {}, threading.Barrier(count)

    def gather_for(i):
        def gather(local):
            barrier.wait()
            posted[i] = local
            barrier.wait()
            out = np.stack([posted[j] for j in range(count)])
            barrier.wait()
            return out
        return gather

    toks = [CountingTokenizer(tok) for _ in range(count)]
    results = [None] * count

    def one(i):
        results[i] = data.prepare(cfg, toks[i], batch_size=batch_size, seed=0,
                                  share=data.Share(i, count, gather_for(i)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, toks


@pytest.mark.parametrize("count", [2, 3])
def test_each_process_tokenizes_only_its_share(tok, count):
    """Same batches, validation batches and counts as one process, while each
    process tokenizes about 1/count of the records (plus its rows of the
    batches it serves)."""
    from train.config import DataConfig

    # Prompts are 42-53 tokens: cutoff 46 truncates every example and leaves
    # some with no target, so the counts and the dropping are exercised.
    cfg = DataConfig(path="embedded:arith", cutoff_len=46, train_on_inputs=False,
                     val_set_size=16, embedded_train_size=200, embedded_test_size=12)
    alone = data.prepare(cfg, tok, batch_size=6, seed=0)
    assert alone.info["truncated"] > 0 and alone.info["no_target"] > 0
    shared, toks = prepare_on_processes(tok, cfg, count, batch_size=6)
    n_records = alone.info["train"] + alone.info["val"]
    for i, (p, t) in enumerate(zip(shared, toks)):
        assert p.info == alone.info
        # prompt and prompt+output per record of its share, nothing else yet
        assert t.texts == 2 * (len(range(i, alone.info["train"], count)) +
                               len(range(i, alone.info["val"], count)))
        assert t.texts <= 2 * n_records / count + 4
        rows = range(i * 6 // count, (i + 1) * 6 // count)
        for step in (0, 5, 40):
            for k, v in alone.train.batch_at(step).items():
                np.testing.assert_array_equal(p.train.batch_at(step, rows)[k], v[list(rows)])
        kw = dict(buckets=alone.info["buckets"], pad_id=tok.pad_token_id)
        for whole, part in zip(data.eval_batches(alone.val, 6, **kw),
                               data.eval_batches(p.val, 6, rows=rows, **kw), strict=True):
            for k in whole:
                np.testing.assert_array_equal(part[k], whole[k][list(rows)])


def test_too_few_examples_for_a_batch(tok, records):
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_batches(tok, records[:5])

# ---------------------------------------------------------------------- arith


def _steps(record):
    return [(int(a), op, int(b), int(c)) for a, op, b, c in
            re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", record["output"])]


def test_arith_is_deterministic_and_disjoint():
    train, test = arith.make_split(1000, 100, seed=3)
    assert (train, test) == arith.make_split(1000, 100, seed=3)
    assert train != arith.make_split(1000, 100, seed=4)[0]
    keys_train = {arith.normalize(r["instruction"]) for r in train}
    keys_test = {arith.normalize(r["instruction"]) for r in test}
    assert len(keys_train) == 1000 and len(keys_test) == 100
    assert not keys_train & keys_test
    # the test split does not depend on n_train; train(n) is a prefix of train(n + k)
    small_train, same_test = arith.make_split(10, 100, seed=3)
    assert same_test == test and small_train == train[:10]


def test_arith_answers_are_correct():
    train, test = arith.make_split(1000, 100, seed=0)
    for r in train + test:
        assert set(r) == {"instruction", "input", "output", "answer"} and r["input"] == ""
        # Recompute from the question: its numbers in order, each step's sign
        # read from the sentence that introduces the number: "more" adds, so
        # does a second number in the first sentence ("A has a and B has b");
        # anything else ("gives", "loses", "fewer") subtracts.
        sentences = re.split(r"(?<=[.?]) ", r["instruction"])
        numbers = [(int(n), i) for i, s in enumerate(sentences) for n in re.findall(r"\d+", s)]
        steps = _steps(r)
        assert 1 <= len(steps) == len(numbers) - 1 <= 2, r
        value = numbers[0][0]
        for (n, i), (x, op, y, z) in zip(numbers[1:], steps):
            expected_op = "+" if "more" in sentences[i] or i == 0 else "-"
            assert (x, op, y) == (value, expected_op, n), r
            value = value + n if op == "+" else value - n
            assert z == value and 0 <= value < 20, r
        assert r["answer"] == str(value)
        assert r["output"].endswith(f" The answer is {value}.")
        assert all(n < 10 for n, _ in numbers)


def test_arith_is_varied():
    train, _ = arith.make_split(2000, 0, seed=0)
    assert len({tuple(w for w in re.findall(r"[A-Za-z]+", r["instruction"])
                      if w[0].islower()) for r in train}) > 100
    assert len({r["answer"] for r in train}) >= 18

# ---------------------------------------------------------------------- loading


def test_load_real_llm_adapters_file():
    path = SHARED_DATA / "llm_adapters" / "gsm8k" / "test.json"
    if not path.exists():
        pytest.skip(f"{path} absent (the shared reference data is not beside the checkout)")
    records, test = data.load_records(str(path))
    assert len(records) == 1319 and test == []
    assert records[0]["answer"] == "576.0" and records[0]["input"] == ""
    assert records[0]["output"].endswith("The answer is 576.")
    assert records == json.loads(path.read_text())  # datasets read it faithfully
    train, val, held_out = data.load_splits(str(path), val_set_size=100)
    assert len(train) == 1219 and val == held_out and len(val) == 100


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_records(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": }]')
    with pytest.raises(ValueError, match=r"invalid JSON .*line 2"):
        data.load_records(str(bad))
    no_output = tmp_path / "no_output.json"
    no_output.write_text(json.dumps([{"instruction": "a", "input": "", "answer": "1"}]))
    with pytest.raises(ValueError, match=r"record 0 has no string 'output'.*answer, "
                                         r"input, instruction"):
        data.load_records(str(no_output))
    partly = tmp_path / "partly.json"
    partly.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"output": "c"}]))
    with pytest.raises(ValueError, match="record 1 has no string 'instruction'"):
        data.load_records(str(partly))
    with pytest.raises(ValueError, match="unknown embedded data source"):
        data.load_records("embedded:nope")
    with pytest.raises(ValueError, match="hub"):  # tests run with HF_HUB_OFFLINE=1
        data.load_records("someone/no-such-dataset")


def test_local_json_without_input_field(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]))
    records, _ = data.load_records(str(f))
    assert records[3] == {"instruction": "q3", "input": "", "output": "a3"}


def test_json_with_a_byte_order_mark_and_one_line_jsonl(tmp_path):
    from train.plan import _count_records
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    bom = tmp_path / "bom.json"  # as Windows editors save UTF-8
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert data.load_records(str(bom))[0] == rows
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({**rows[0], "answer": "x"}) + "\n")
    assert len(data.load_records(str(one))[0]) == 1
    assert (_count_records(str(bom), 0), _count_records(str(one), 0)) == (3, 1)


def test_validation_split_is_seeded_and_disjoint():
    records = arith.make_split(300, 0)[0]
    train, val = data.split_validation(records, 30)
    assert (train, val) == data.split_validation(records, 30)
    assert len(train) == 270 and len(val) == 30
    key = lambda r: r["instruction"]  # noqa: E731
    assert sorted(map(key, train + val)) == sorted(map(key, records))
    assert data.split_validation(records, 0) == (records, [])
    with pytest.raises(ValueError, match="nothing to train on"):
        data.split_validation(records, 300)


def test_prepare_embedded_arith(tok):
    from train.config import DataConfig

    cfg = DataConfig(path="embedded:arith", cutoff_len=128, train_on_inputs=False,
                     val_set_size=16, embedded_train_size=200, embedded_test_size=12)
    p = data.prepare(cfg, tok, batch_size=8, seed=0)
    assert p.info["train"] == 184 and len(p.val) == 16 and len(p.test) == 12
    assert p.info["prefix_mismatches"] == 0 and p.info["truncated"] == 0
    batch = p.train.batch_at(0)
    assert batch["tokens"].shape[0] == 8 and batch["tokens"].shape[1] in p.info["buckets"]
    test_keys = {arith.normalize(r["instruction"]) for r in p.test}
    assert not test_keys & {arith.normalize(r["instruction"])
                            for r in arith.make_split(200, 12, data.EMBEDDED_SEED)[0]}
