"""`python -m eval`: answer extraction checked against LLM-Adapters' own rules
(restated below from its sources), the GPT-3.5 log reproduction and its
mutation controls (wrong scorers must fail it), scoring-only mode, bad inputs,
and an end-to-end SmolLM2 run on a few items of each set whose real
generations are also scored by the restated rules.

Tests that read ../shared/data (beside the checkout) skip when it is absent.
"""

import json
import math
import pathlib
import re
import subprocess
import sys

import pytest

from eval import extract
from eval.__main__ import main
from eval.prompts import prompt_for_eval
from eval.run import EvalConfig, run, score_example, score_generations_file, summarize
from eval.tasks import TASKS, get_task, load_task_records

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "llm_adapters"
LOGS = DATA / "gpt35_logs"
needs_data = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"reference data not found at {DATA} (../shared/data)")


# ----------------------------------------------------------------------------- reference rules
# The scoring rules of LLM-Adapters (github.com/AGI-Edgerunners/LLM-Adapters),
# restated from its sources so that eval/ is checked against them, not
# against itself: evaluate.py at commit 32e03afa69eb56c4eb2207d7c41e8492cf4bf54c
# (math) and commomsense_evaluate.py (sic) at commit
# e0efdc0e8bb43875201e24528d3ee0fe2595876d (commonsense).

def ref_response(decoded_prompt_and_generation):
    """Both scripts: the decoded prompt + generation, `.split("### Response:")[1].strip()`."""
    return decoded_prompt_and_generation.split("### Response:")[1].strip()


def ref_extract_answer_number(sentence):
    """evaluate.py `extract_answer_number`: delete every comma, find all
    `-?\\d+\\.?\\d*`, the last one as a float; float("inf") when there is none."""
    found = re.findall(r"-?\d+\.?\d*", sentence.replace(",", ""))
    return float(found[-1]) if found else float("inf")


def ref_number_correct(label, predict):
    """evaluate.py `main`: `abs(float(label) - predict) <= miss` with `miss = 0.001`."""
    return abs(float(label) - predict) <= 0.001


def ref_extract_answer_letter(sentence):
    """evaluate.py `extract_answer_letter` (AQuA): the first match of
    `A|B|C|D|E` in the stripped sentence, "" when there is none."""
    found = re.findall(r"A|B|C|D|E", sentence.strip())
    return found[0] if found else ""


REF_COMMONSENSE_PATTERNS = {  # commomsense_evaluate.py `extract_answer`, per dataset
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}


def ref_extract_answer(dataset, sentence):
    """commomsense_evaluate.py `extract_answer`: the first match of the
    dataset's pattern in the stripped sentence, "" when there is none."""
    found = re.findall(REF_COMMONSENSE_PATTERNS[dataset], sentence.strip())
    return found[0] if found else ""


def ref_kojima_few_shot_cot_letter(pred):
    """The rule that produced the `pred` of the GPT-3.5 AQuA log (see
    test_aqua_letter_rules_on_the_gpt35_log): `answer_cleansing` of Kojima et
    al.'s zero_shot_cot (github.com/kojima-takeshi188/zero_shot_cot, utils.py,
    commit 090c20f065c2936113fc113369a4e1e0d4e0a087) with method
    "few_shot_cot" and dataset "aqua": split on "The answer is"; all matches
    of `A|B|C|D|E` in the last piece; the first of them when the trigger
    occurred, else the last; "" when there is none."""
    pieces = pred.split("The answer is")
    found = re.findall(r"A|B|C|D|E", pieces[-1])
    if not found:
        return ""
    return found[0] if len(pieces) > 1 else found[-1]


# ----------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", 42.0),
    ("It drops to -7 degrees, so the answer is -7", -7.0),
    ("She pays $1,234.50 in total.", 1234.5),
    ("3 apples and 0.25 kg, total 12", 12.0),  # the LAST number
    ("10 - 3 = 7.", 7.0),  # "7." is read as 7
    ("1,000,000 people", 1000000.0),
    ("no digits here", math.inf),
    ("", math.inf),
    ("from 5 to-3", -3.0),  # a hyphen before a digit is a minus sign, as in LLM-Adapters
])
def test_extract_number(text, expected):
    assert extract.extract_number(text) == expected


def test_number_correct_tolerance():
    assert extract.number_correct(576.0, "576.0")
    assert extract.number_correct(1.8333, "1.8333333333333335")  # within 0.001
    assert not extract.number_correct(1.83, "1.8333333333333335")
    assert not extract.number_correct(math.inf, "3")  # no number is never correct
    assert extract.number_correct(-2.0, -2)


@pytest.mark.parametrize("text, options, expected", [
    ("the correct answer is false", ("true", "false"), "false"),
    ("true or false? I say false", ("true", "false"), "true"),  # the FIRST one mentioned
    ("True.", ("true", "false"), ""),  # case-sensitive, as LLM-Adapters
    ("solution2 is better than solution1", ("solution1", "solution2"), "solution2"),
    ("answer3", TASKS["social_i_qa"].options, "answer3"),
    ("I pick ending4", TASKS["hellaswag"].options, "ending4"),
    ("option1/option2: option2", ("option1", "option2"), "option1"),
    ("nothing", ("option1", "option2"), ""),
])
def test_extract_option(text, options, expected):
    assert extract.extract_option(text, options) == expected


# Hand-picked generations: (dataset, generation, what LLM-Adapters extracts).
COMMONSENSE_EDGE_CASES = [
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "true or false? false", "true"),  # mentioned twice: the first
    ("boolq", "True.", ""),  # capitalised: no answer
    ("boolq", "False, since it is not true", "true"),
    ("boolq", "the claim is untrue", "true"),  # a substring counts
    ("boolq", "yes", ""),
    ("boolq", "", ""),
    ("piqa", "the correct answer is solution2.", "solution2"),
    ("piqa", "Solution1", ""),
    ("piqa", "solution2 is better than solution1", "solution2"),
    ("piqa", "solution12", "solution1"),  # a prefix counts
    ("piqa", "Not sure.\n\n### Instruction:\nAnd now?\n\n### Response:\nsolution2", ""),  # cut
    ("social_i_qa", "answer5", "answer5"),  # the data has 3 options, the pattern 5
    ("social_i_qa", "Answer2: Go home and see Riley", ""),
    ("social_i_qa", "  \n answer3 \n", "answer3"),
    ("ARC-Easy", "answer4.\n\nThe correct answer is answer4.", "answer4"),
    ("ARC-Challenge", "answer1 or answer2", "answer1"),
    ("openbookqa", "the correct answer is answer3", "answer3"),
    ("hellaswag", "ending4, not ending1", "ending4"),
    ("hellaswag", "ending5", ""),
    ("winogrande", "option2 (Maria), not option1", "option2"),
    ("winogrande", "The correct answer is: Maria.", ""),
    ("winogrande", "Option1", ""),
]
EDGE_PROMPT = prompt_for_eval({"instruction": "Which one?", "input": ""})


def _commonsense_departures(cases):
    """(dataset, generation, ours, LLM-Adapters') wherever our extraction, as
    scored (`score_example`), differs from LLM-Adapters' `extract_answer` on
    the decoded prompt + generation."""
    out = []
    for dataset, generation in cases:
        task = get_task(dataset)
        ours = score_example(task, generation, task.options[0])["pred"]
        theirs = ref_extract_answer(task.name, ref_response(EDGE_PROMPT + generation))
        if ours != theirs:
            out.append((dataset, generation, ours, theirs))
    return out


def test_commonsense_extraction_is_llm_adapters_on_edge_cases():
    assert {get_task(name).name for name in REF_COMMONSENSE_PATTERNS} == {
        t.name for t in TASKS.values() if t.family == "commonsense"}
    for name, pattern in REF_COMMONSENSE_PATTERNS.items():  # the same options, in order
        assert "|".join(get_task(name).options) == pattern
    for dataset, generation, expected in COMMONSENSE_EDGE_CASES:  # the restatement itself
        assert ref_extract_answer(dataset, ref_response(EDGE_PROMPT + generation)) == expected
    assert _commonsense_departures([c[:2] for c in COMMONSENSE_EDGE_CASES]) == []


def _last_option(text, options):
    found = re.findall("|".join(map(re.escape, options)), text)
    return found[-1] if found else ""


def _option_ignoring_case(text, options):
    found = re.findall("|".join(map(re.escape, options)), text, re.IGNORECASE)
    return found[0].lower() if found else ""


@pytest.mark.parametrize("attribute, wrong", [
    ("extract_option", _last_option),
    ("extract_option", _option_ignoring_case),
    ("response_text", str.strip),  # a second "### Response:" not cut
])
def test_wrong_commonsense_extractors_depart_from_llm_adapters(monkeypatch, attribute, wrong):
    """Mutation control: the edge cases above tell these wrong rules apart."""
    monkeypatch.setattr(extract, attribute, wrong)
    assert _commonsense_departures([c[:2] for c in COMMONSENSE_EDGE_CASES]) != []


@pytest.mark.parametrize("text, llm_adapters, robust", [
    ("Rationale: A car goes 5 km. The answer is (D).", "A", "D"),
    ("the answer is B", "B", "B"),
    ("(A) is wrong, (C) is right", "A", "C"),  # no stated answer: the last "(X)"
    ("Each option fails; answer choice is: (E)", "E", "E"),
    ("the answer is a number, (B)", "B", "B"),  # "a" is an article, not a choice
    ("no choice at all", "", ""),
    ("", "", ""),
])
def test_extract_letter_rules(text, llm_adapters, robust):
    assert extract.extract_letter(text, "llm_adapters") == llm_adapters
    assert extract.extract_letter(text, "robust") == robust


def test_extract_letter_unknown_rule():
    with pytest.raises(ValueError, match="robust"):
        extract.extract_letter("(A)", "first")


def test_response_text_cuts_a_second_response():
    # LLM-Adapters keeps output.split("### Response:")[1]: what follows a
    # response the model writes itself is dropped.
    text = " The answer is 4.\n\n### Instruction:\nWhat is 9?\n\n### Response:\n9"
    assert extract.response_text(text).endswith("is 4.\n\n### Instruction:\nWhat is 9?")
    assert extract.extract_number(extract.response_text(text)) == 9.0  # from the new question
    assert score_example(get_task("gsm8k"), text, "4")["correct"] is False


def test_summary_counts_and_letter_rules():
    task = get_task("aqua")
    rows = [score_example(task, g, label) for g, label in
            [("A car... the answer is (D)", "D"), ("(B)", "B"), ("Each is (C)", "A")]]
    s = summarize(task, rows)
    assert (s["n"], s["correct"], s["rule"]) == (3, 2, "robust")
    assert s["by_rule"]["llm_adapters"]["correct"] == 1 and s["accuracy"] == pytest.approx(2 / 3)
    assert summarize(task, rows, "llm_adapters")["correct"] == 1


def test_task_names_are_case_insensitive():
    assert get_task("GSM8K").name == "gsm8k"
    assert get_task("arc-easy").name == "ARC-Easy"
    assert get_task(" aqua ").answer == "letter"
    assert get_task("BoolQ").options == ("true", "false")


# ----------------------------------------------------------------------------- GPT-3.5 logs

NUMERIC_LOGS = {"gsm8k": 58.5, "AddSub": 93.7, "MultiArith": 93.3, "SingleEq": 95.3}


def _log(name):
    return json.loads((LOGS / f"{name.lower()}_1.json").read_text())


@needs_data
@pytest.mark.parametrize("name", list(NUMERIC_LOGS))
def test_numeric_extractor_reproduces_logged_pred(name):
    records = _log(name)
    for i, rec in enumerate(records):
        pred = extract.extract_number(rec["chain-of-thought"])
        logged = math.inf if rec["pred"] is None else rec["pred"]  # None: no number in the text
        assert pred == logged, f"{name} record {i}: extracted {pred}, logged {rec['pred']}"


@needs_data
@pytest.mark.parametrize("name", list(NUMERIC_LOGS))
def test_scoring_only_mode_on_numeric_logs(tmp_path, name):
    summary = run(EvalConfig(datasets=(name,), generations=str(LOGS / f"{name.lower()}_1.json"),
                             output_dir=str(tmp_path)))
    result = summary["datasets"][get_task(name).name]
    assert round(100 * result["accuracy"], 1) == NUMERIC_LOGS[name]
    assert result["n"] == len(_log(name))
    rows = (tmp_path / f"{get_task(name).name}.jsonl").read_text().splitlines()
    assert len(rows) == result["n"] and set(json.loads(rows[0])) >= {
        "question", "generation", "pred", "label", "correct"}
    assert "| " + get_task(name).name + " |" in (tmp_path / "results.md").read_text()


AQUA_LOGGED_ACCURACY = 48.4
AQUA_NO_STATED_ANSWER = 80  # the one log record whose generation states no answer


@needs_data
def test_aqua_letter_rules_on_the_gpt35_log(tmp_path):
    """On the 254 real GPT-3.5 AQuA generations: our "llm_adapters" rule is
    LLM-Adapters' `extract_answer_letter` item by item; the logged `pred`s
    are not that rule's but Kojima et al.'s few-shot-CoT `answer_cleansing`
    (item by item); our "robust" rule agrees with them on every item but one."""
    records = _log("aqua")
    assert len(records) == 254
    rows = score_generations_file(get_task("aqua"), LOGS / "aqua_1.json")
    ours = [r["pred"] for r in rows]
    generations = [r["chain-of-thought"] for r in records]
    for i, (text, pred) in enumerate(zip(generations, ours)):
        assert pred["llm_adapters"] == ref_extract_answer_letter(text), f"record {i}"
    logged = ["" if r["pred"] is None else r["pred"] for r in records]  # None: no letter found
    assert [ref_kojima_few_shot_cot_letter(t) for t in generations] == logged
    assert sum(p["llm_adapters"] == q for p, q in zip(ours, logged)) == 206  # of 254
    assert [i for i, (p, q) in enumerate(zip(ours, logged)) if p["robust"] != q] == [
        AQUA_NO_STATED_ANSWER]
    # That generation never says "The answer is"; Kojima's rule then takes the
    # last capital anywhere, here the A of the name "Arjun".
    text = generations[AQUA_NO_STATED_ANSWER]
    assert "The answer is" not in text and "Arjun" in text
    assert (logged[AQUA_NO_STATED_ANSWER], ours[AQUA_NO_STATED_ANSWER]["robust"]) == ("A", "")
    assert records[AQUA_NO_STATED_ANSWER]["answer"] != "A"  # so both score it wrong

    logged_accuracy = sum(q == r["answer"] for q, r in zip(logged, records)) / len(records)
    assert round(100 * logged_accuracy, 1) == AQUA_LOGGED_ACCURACY
    summary = run(EvalConfig(datasets=("AQuA",), generations=str(LOGS / "aqua_1.json"),
                             output_dir=str(tmp_path)))
    result = summary["datasets"]["AQuA"]
    assert round(100 * result["by_rule"]["llm_adapters"]["accuracy"], 1) == 42.9
    assert result["by_rule"]["robust"]["accuracy"] == logged_accuracy
    assert result["accuracy"] == logged_accuracy and result["rule"] == "robust"


def _log_reproduction_errors(out_dir):
    """What scoring-only mode gets wrong on the five GPT-3.5 logs: rows whose
    `pred` is not the logged one (AQuA: the robust rule, but for the record
    shown above), and counts or accuracies that differ from those of the
    logged preds under LLM-Adapters' correctness rule. [] when all agree."""
    errors = []
    for name in (*NUMERIC_LOGS, "AQuA"):
        task, records = get_task(name), _log(name)
        summary = run(EvalConfig(datasets=(name,), generations=str(LOGS / f"{name.lower()}_1.json"),
                                 output_dir=str(out_dir / name)))
        result = summary["datasets"][task.name]
        rows = [json.loads(line) for line in
                (out_dir / name / f"{task.name}.jsonl").read_text().splitlines()]
        if task.answer == "number":
            preds, logged = [r["pred"] for r in rows], [r["pred"] for r in records]
            correct = sum(r["pred"] is not None and ref_number_correct(r["answer"], r["pred"])
                          for r in records)
            published = NUMERIC_LOGS[name]
        else:
            preds = [r["pred"]["robust"] for r in rows]
            logged = ["" if r["pred"] is None else r["pred"] for r in records]
            correct = sum(q == r["answer"] for q, r in zip(logged, records))
            published = AQUA_LOGGED_ACCURACY
        differ = [i for i, (p, q) in enumerate(zip(preds, logged))
                  if p != q and not (name == "AQuA" and i == AQUA_NO_STATED_ANSWER)]
        if len(rows) != len(records) or differ:
            errors.append(f"{name}: {len(rows)} rows for {len(records)} records; {len(differ)} "
                          f"preds differ from the logged ones (records {differ[:5]})")
        if (result["n"], result["correct"]) != (len(records), correct):
            errors.append(f"{name}: {result['correct']}/{result['n']} correct, the logged preds "
                          f"give {correct}/{len(records)}")
        if round(100 * result["accuracy"], 1) != published:
            errors.append(f"{name}: accuracy {100 * result['accuracy']:.1f}, logged {published}")
    return errors


@needs_data
def test_scoring_reproduces_every_logged_pred_and_accuracy(tmp_path):
    assert _log_reproduction_errors(tmp_path) == []


def _first_number(text):
    found = extract.NUMBER.findall(text.replace(",", ""))
    return float(found[0]) if found else math.inf


def _last_number_keeping_commas(text):
    found = extract.NUMBER.findall(text)
    return float(found[-1]) if found else math.inf


def _first_capital_for_every_rule(text, rule="robust"):
    found = re.findall("A|B|C|D|E", text)
    return found[0] if found else ""


@needs_data
@pytest.mark.parametrize("attribute, wrong", [
    ("extract_number", _first_number),
    ("extract_number", _last_number_keeping_commas),
    ("NUMBER_TOLERANCE", 0.0),  # exact equality
    ("NUMBER_TOLERANCE", 0.5),
    ("extract_letter", _first_capital_for_every_rule),
], ids=["first-number", "commas-kept", "no-tolerance", "tolerance-0.5", "first-capital"])
def test_wrong_scorers_fail_the_log_reproduction(tmp_path, monkeypatch, attribute, wrong):
    """Mutation control: with one part of the scorer replaced by a plausible
    wrong variant, the reproduction of the logged preds/accuracies fails.
    (Not every wrong rule can fail here: every GPT-3.5 AQuA generation that
    states an answer writes "The answer is (X).", so a robust rule reduced to
    the last "(X)" reproduces the log; test_extract_letter_rules tells it apart.)"""
    monkeypatch.setattr(extract, attribute, wrong)
    assert _log_reproduction_errors(tmp_path) != []


def test_scoring_only_mode_jsonl_with_generation_field(tmp_path):
    gen = tmp_path / "gens.jsonl"
    gen.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "q1", "generation": "the correct answer is option2", "answer": "option2"},
        {"question": "q2", "output": "option1", "answer": "option2"}]) + "\n")
    assert main(["--dataset", "WinoGrande", "--generations", str(gen), "--output_dir",
                 str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["datasets"]["winogrande"] == {"n": 2, "correct": 1, "accuracy": 0.5}


def test_scoring_only_mode_reads_llm_adapters_experiment_files(tmp_path):
    """LLM-Adapters' evaluate scripts write experiment/<model>-<adapter>-<dataset>.json:
    each test record (whose `output` is the REFERENCE answer) plus the
    generation `output_pred`, `pred` and `flag`. The generation is scored,
    not the reference: reading `output` would score every item correct."""
    gen = tmp_path / "LLaMA-7B-LoRA-ARC-Easy.json"
    gen.write_text(json.dumps([
        {"instruction": "q1", "input": "", "output": "the correct answer is answer1",
         "answer": "answer1", "output_pred": "the correct answer is answer2", "pred": "answer2",
         "flag": False},
        {"instruction": "q2", "input": "", "output": "the correct answer is answer3",
         "answer": "answer3", "output_pred": "answer3", "pred": "answer3", "flag": True}]))
    rows = score_generations_file(get_task("arc-easy"), gen)
    assert [(r["generation"], r["pred"], r["correct"]) for r in rows] == [
        ("the correct answer is answer2", "answer2", False), ("answer3", "answer3", True)]
    summary = run(EvalConfig(datasets=("ARC-Easy",), generations=str(gen),
                             output_dir=str(tmp_path / "out")))
    assert summary["datasets"]["ARC-Easy"] == {"n": 2, "correct": 1, "accuracy": 0.5}


# ----------------------------------------------------------------------------- bad inputs

def test_unknown_dataset_lists_known_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'.*gsm8k.*boolq.*openbookqa"):
        get_task("gsm9k")
    assert main(["--dataset", "gsm9k", "--data_path", str(tmp_path), "--output_dir",
                 str(tmp_path / "o")]) == 2
    assert "known datasets" in capsys.readouterr().err


def test_malformed_data_file_names_the_record(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"instruction": "1+1?", "answer": "2"},
                                {"instruction": "2+2?", "output": "4"}]))
    with pytest.raises(ValueError, match=r"record 1 has no 'answer'"):
        load_task_records(get_task("gsm8k"), path)
    path.write_text(json.dumps([{"instruction": "1+1?", "answer": "two"}]))
    with pytest.raises(ValueError, match=r"record 0 has answer 'two'.*numbers"):
        load_task_records(get_task("gsm8k"), path)
    path.write_text('[{"instruction": "1+1?", "answer": "2"},')
    with pytest.raises(ValueError, match="line 1"):
        load_task_records(get_task("gsm8k"), path)
    path.write_text(json.dumps([{"instruction": "q", "answer": "answer9"}]))
    with pytest.raises(ValueError, match="record 0 has answer 'answer9'.*piqa|solution1"):
        load_task_records(get_task("piqa"), path)


def test_missing_dataset_in_data_dir(tmp_path):
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="gsm8k/test.json.*present there: boolq"):
        load_task_records(get_task("gsm8k"), tmp_path)


def test_bad_config_values(tmp_path):
    with pytest.raises(ValueError, match="--data_path"):
        EvalConfig(datasets=("gsm8k",), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="num_beams"):
        EvalConfig(datasets=("gsm8k",), output_dir=str(tmp_path), data_path="x", num_beams=0)
    with pytest.raises(ValueError, match="exactly one"):
        EvalConfig(datasets=("gsm8k", "aqua"), output_dir=str(tmp_path), generations="g.json")


@needs_data
def test_data_dir_lookup_is_case_insensitive():
    records, source = load_task_records(get_task("arc-easy"), DATA, limit=3)
    assert len(records) == 3 and source.endswith("ARC-Easy/test.json")


def test_adapter_for_another_base_names_shapes(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from eval.generator import load_generator

    def save_tiny(hidden, path):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(path)
        return model

    trained_on = save_tiny(64, tmp_path / "base64")
    peft.get_peft_model(trained_on, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
                        ).save_pretrained(tmp_path / "adapter")
    save_tiny(32, tmp_path / "base32")
    with pytest.raises(ValueError, match=r"shape \(64, 4\).*in=32, out=32"):
        load_generator(str(tmp_path / "base32"), str(tmp_path / "adapter"))


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_cli_help_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "eval", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--num_beams" in out.stdout and "gsm8k" in out.stdout


SMOL_SETS = ("gsm8k", "AQuA", "boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy")
SMOL_LIMIT, SMOL_NEW_TOKENS = 4, 32
# Their prompt lengths are not in dataset order, so the run's per-batch sort is exercised.
SMOL_DIRECT_SETS = ("gsm8k", "piqa")


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """`python -m eval` with SmolLM2-135M-Instruct (the embedded default model,
    greedy) on the first 4 items of two math sets and of every commonsense set
    in ../shared/data, 32 new tokens (math answers may be cut short, which
    only lowers the uninteresting accuracy). Returns (output dir, {dataset:
    its records})."""
    if not DATA.is_dir():
        pytest.skip(f"reference data not found at {DATA} (../shared/data)")
    from flax_adapters.checkpoints.load import default_model_path
    try:
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smollm2") / "out"
    assert main(["--dataset", *SMOL_SETS, "--data_path", str(DATA), "--output_dir", str(out),
                 "--limit", str(SMOL_LIMIT), "--batch_size", "4",
                 "--max_new_tokens", str(SMOL_NEW_TOKENS)]) == 0
    return out, {name: load_task_records(get_task(name), DATA, SMOL_LIMIT)[0] for name in SMOL_SETS}


def _rows(out, name):
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_end_to_end_smollm2_on_a_few_items(smollm2_run):
    """Every recorded prediction is our extractor applied to the recorded
    generation, every `correct` is that prediction against the label under
    LLM-Adapters' rule, the counts, accuracies and table follow, the files
    hold one record per item, in order, and (on two of the sets) each
    generation is what `flax_adapters.generate`, greedy and called directly
    on a second load of the model, returns for that item's prompt."""
    import flax_adapters as fa

    out, records = smollm2_run
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["datasets"]) == [get_task(name).name for name in SMOL_SETS]
    table = (out / "results.md").read_text()
    for name in SMOL_SETS:
        task = get_task(name)
        result, rows = summary["datasets"][task.name], _rows(out, task.name)
        assert [r["index"] for r in rows] == list(range(SMOL_LIMIT)) and result["n"] == SMOL_LIMIT
        assert [r["question"] for r in rows] == [rec["instruction"] for rec in records[name]]
        assert [r["label"] for r in rows] == [rec["answer"] for rec in records[name]]
        assert all(0 < r["new_tokens"] <= SMOL_NEW_TOKENS for r in rows)
        assert result["throughput"]["new_tokens"] == sum(r["new_tokens"] for r in rows)
        for r in rows:
            text = extract.response_text(r["generation"])
            if task.answer == "number":
                pred = extract.extract_number(text)
                assert r["pred"] == (pred if math.isfinite(pred) else None)
                assert pred == ref_extract_answer_number(text)
                assert r["correct"] == ref_number_correct(r["label"], pred)
            elif task.answer == "option":
                assert r["pred"] == extract.extract_option(text, task.options)
                assert r["correct"] == (r["pred"] == r["label"])
            else:
                assert r["pred"] == {rule: extract.extract_letter(text, rule)
                                     for rule in extract.LETTER_RULES}
                assert r["pred"]["llm_adapters"] == ref_extract_answer_letter(text)
                assert r["correct"] == {rule: p == r["label"] for rule, p in r["pred"].items()}
        if task.answer == "letter":
            for rule in extract.LETTER_RULES:
                c = sum(r["correct"][rule] for r in rows)
                assert result["by_rule"][rule] == {"correct": c, "accuracy": c / SMOL_LIMIT}
                row = f"| AQuA ({rule} rule) | {SMOL_LIMIT} | {100 * c / SMOL_LIMIT:.1f} |"
                assert row in table
            assert result["accuracy"] == result["by_rule"]["robust"]["accuracy"]
        else:
            c = sum(r["correct"] for r in rows)
            assert (result["correct"], result["accuracy"]) == (c, c / SMOL_LIMIT)
            assert f"| {task.name} | {SMOL_LIMIT} | {100 * c / SMOL_LIMIT:.1f} |" in table

    # The same generations from flax_adapters.generate, called directly
    # (greedy: temperature 0) on a fresh load of the model, one batch per
    # dataset in dataset order (the run sorts each batch by prompt length).
    # Two of the datasets only: each costs several seconds of decoding here.
    pre = fa.load_pretrained(fa.default_model_path())
    model = fa.model_class(pre.config)(pre.config)
    tok = pre.tokenizer
    for name in SMOL_DIRECT_SETS:
        rows = _rows(out, get_task(name).name)
        prompts = [tok(prompt_for_eval(rec, "alpaca"))["input_ids"] for rec in records[name]]
        new = fa.generate(model, pre.params, prompts, fa.GenerationConfig(
            max_new_tokens=SMOL_NEW_TOKENS, temperature=0.0, eos_token_ids=(tok.eos_token_id,)))
        for r, ids in zip(rows, new.tolist()):
            n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
            assert (r["generation"], r["new_tokens"]) == (
                tok.decode(ids[:n], skip_special_tokens=True), n), f"{name} item {r['index']}"


@pytest.mark.slow
def test_commonsense_extraction_is_llm_adapters_on_smollm2_generations(smollm2_run):
    """Real generations no one here wrote (SmolLM2's, greedy): on each, our
    extraction equals LLM-Adapters' `extract_answer` applied as its
    commomsense_evaluate.py does, to the decoded prompt + generation."""
    out, records = smollm2_run
    preds = []
    for name in SMOL_SETS:
        task = get_task(name)
        if task.family != "commonsense":
            continue
        for rec, row in zip(records[name], _rows(out, task.name)):
            theirs = ref_extract_answer(task.name, ref_response(
                prompt_for_eval(rec, "alpaca") + row["generation"]))
            assert row["pred"] == theirs, (name, row["generation"])
            preds.append(theirs)
    # Not a vacuous comparison: some generations name an option, some none.
    assert "" in preds and set(preds) - {""}, preds
