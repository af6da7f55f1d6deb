"""Prompt templates: how a record becomes the text a model is asked, the
same in training (`python -m train`, which appends the answer) and in
evaluation (`python -m eval`), so a trained adapter is evaluated on exactly
the prompt ending it was trained on.

Templates (see train/data.py for why the default differs from LLM-Adapters'):
"alpaca" (alpaca-lora's templates/alpaca.json), "llm_adapters" (LLM-Adapters'
finetune.py f-string verbatim, 16 spaces of source indentation included)
and "chat" (the tokenizer's chat template: user = instruction [+ input]).
"""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]

# alpaca-lora templates/alpaca.json
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# LLM-Adapters finetune.py `generate_prompt`, character for character (the 16
# spaces are its source indentation; note one trailing space after "request."
# with input and two without). The output follows the last line directly.
_I = " " * 16
LLM_ADAPTERS_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request. \n\n"
    f"{_I}### Instruction:\n{_I}{{instruction}}\n{_I}\n{_I}### Input:\n{_I}{{input}}\n{_I}\n"
    f"{_I}### Response:\n{_I}")
LLM_ADAPTERS_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.  \n\n"
    f"{_I}### Instruction:\n{_I}{{instruction}}\n{_I}\n{_I}### Response:\n{_I}")

_FORMATS = {"alpaca": (ALPACA_INPUT, ALPACA_NO_INPUT),
            "llm_adapters": (LLM_ADAPTERS_INPUT, LLM_ADAPTERS_NO_INPUT)}
TEMPLATES = (*_FORMATS, "chat")


def prompt_for_eval(record: Record, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text without the answer: what a model is asked at evaluation.

    Training text is exactly `prompt_for_eval(record) + record["output"]`."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat template; this "
                             "one has none: use template='alpaca'")
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                             tokenize=False, add_generation_prompt=True)
    if template not in _FORMATS:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {TEMPLATES}")
    with_input, without_input = _FORMATS[template]
    if record.get("input"):  # LLM-Adapters tests truthiness: "" and None mean no input
        return with_input.format(instruction=record["instruction"], input=record["input"])
    return without_input.format(instruction=record["instruction"])


def generate_prompt(record: Record, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The full training text: prompt + output (LLM-Adapters' `generate_prompt`)."""
    return prompt_for_eval(record, template, tokenizer) + record["output"]


def add_special_tokens(template: str) -> bool:
    """Whether the tokenizer adds its own specials (e.g. LLaMA's BOS). A chat
    template already writes them, so adding them again would double the BOS."""
    return template != "chat"


def encode_prompt(record: Record, tokenizer: Any, template: str = "alpaca") -> list[int]:
    """Token ids of `prompt_for_eval(record)`, tokenized as in training."""
    text = prompt_for_eval(record, template, tokenizer)
    return tokenizer(text, add_special_tokens=add_special_tokens(template))["input_ids"]
