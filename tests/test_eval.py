"""`python -m eval`: answer extraction, the GPT-3.5 log reproduction, scoring-only
mode, bad inputs, and an end-to-end SmolLM2 run on a few items.

Tests that read ../shared/data (beside the checkout) skip when it is absent.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from eval import extract
from eval.__main__ import main
from eval.run import EvalConfig, run, score_example, summarize
from eval.tasks import TASKS, get_task, load_task_records

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "llm_adapters"
LOGS = DATA / "gpt35_logs"
needs_data = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"reference data not found at {DATA} (../shared/data)")


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


@needs_data
def test_aqua_robust_rule_beats_llm_adapters_rule(tmp_path):
    records = _log("aqua")
    logged = sum(r["pred"] == r["answer"] for r in records) / len(records)
    assert round(100 * logged, 1) == 48.4
    summary = run(EvalConfig(datasets=("AQuA",), generations=str(LOGS / "aqua_1.json"),
                             output_dir=str(tmp_path)))
    by_rule = summary["datasets"]["AQuA"]["by_rule"]
    assert round(100 * by_rule["llm_adapters"]["accuracy"], 1) == 42.9
    assert by_rule["robust"]["accuracy"] >= logged
    assert summary["datasets"]["AQuA"]["accuracy"] == by_rule["robust"]["accuracy"]


def test_scoring_only_mode_jsonl_with_generation_field(tmp_path):
    gen = tmp_path / "gens.jsonl"
    gen.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "q1", "generation": "the correct answer is option2", "answer": "option2"},
        {"question": "q2", "output": "option1", "answer": "option2"}]) + "\n")
    assert main(["--dataset", "WinoGrande", "--generations", str(gen), "--output_dir",
                 str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["datasets"]["winogrande"] == {"n": 2, "correct": 1, "accuracy": 0.5}


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


@pytest.mark.slow
@needs_data
def test_end_to_end_smollm2_on_a_few_items(tmp_path):
    """SmolLM2-135M-Instruct (the embedded default model) on 4 items each of
    two math sets and one commonsense set. 32 new tokens keep it fast: math
    answers may be cut short, which only lowers the (uninteresting) accuracy."""
    from flax_adapters.checkpoints.load import default_model_path
    try:
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "out"
    assert main(["--dataset", "gsm8k", "AQuA", "boolq", "--data_path", str(DATA), "--output_dir",
                 str(out), "--limit", "4", "--batch_size", "4", "--max_new_tokens", "32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["datasets"]) == ["gsm8k", "AQuA", "boolq"]
    for name, result in summary["datasets"].items():
        assert result["n"] == 4 and 0 <= result["accuracy"] <= 1
        assert result["throughput"]["new_tokens"] > 0
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == [0, 1, 2, 3]
        assert all(0 < r["new_tokens"] <= 32 and isinstance(r["generation"], str) for r in rows)
        assert sum(bool(r["correct"] if name != "AQuA" else r["correct"]["robust"])
                   for r in rows) == result["correct"]
    assert "AQuA (llm_adapters rule)" in (out / "results.md").read_text()
