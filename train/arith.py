"""The embedded default data source `embedded:arith`: small arithmetic word problems.

Written for this project (no download). Records use the LLM-Adapters format
`{"instruction", "input": "", "output", "answer"}`; `output` is a short worked
solution in the style of LLM-Adapters' math_10k rationales ("She bought 7
packs ... so she has 70 - 2 = 68 invitations left. The answer is 68.") and
`answer` is the number as a string.

Why so easy: the default model is SmolLM2-135M, which after 25 minutes of LoRA
on MAWPS learned the answer format but not multi-digit arithmetic. Here every
operand is a single digit and every intermediate result is below 20, so both
the format and the arithmetic are learnable in a few minutes on a laptop CPU,
and accuracy on held-out items shows whether the adapter learned anything.

Problems are one or two steps: gain ("gets 3 more"), loss ("gives 2 to Ben"),
gain then loss, loss then gain, "together", "N more than", "N fewer than".
Every gain phrase contains the word "more" and no loss phrase does (the tests
rely on it to re-derive each step's sign from the question text).

`make_split(n_train, n_test, seed)` draws the test items first from their own
seed, then the train items from another seed, skipping any question whose
normalized text is already taken: the splits are disjoint, each is free of
duplicates, the test split does not depend on n_train, and train(n) is a
prefix of train(n + k).
"""

from __future__ import annotations

import random

from eval.tasks import Task

# How the held-out problems are scored: a number, as LLM-Adapters scores math.
TASK = Task("embedded:arith", "math", "number")

# (name, subject pronoun, object pronoun)
PEOPLE = (
    ("Tom", "he", "him"), ("Anna", "she", "her"), ("Sam", "he", "him"),
    ("Lily", "she", "her"), ("Ben", "he", "him"), ("Mia", "she", "her"),
    ("Jack", "he", "him"), ("Emma", "she", "her"), ("Leo", "he", "him"),
    ("Zoe", "she", "her"), ("Max", "he", "him"), ("Nora", "she", "her"),
    ("Omar", "he", "him"), ("Ruth", "she", "her"), ("Ivan", "he", "him"),
    ("Sara", "she", "her"), ("Raj", "he", "him"), ("Lena", "she", "her"),
    ("Paul", "he", "him"), ("Kate", "she", "her"),
)
OBJECTS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "shells",
           "coins", "cards", "balloons", "toy cars", "flowers", "stamps", "candies",
           "eggs", "crayons")

STARTS = ("{A} has {n} {obj}.", "{A} starts with {n} {obj}.", "{A} has a bag with {n} {obj}.")
# Verb phrases after the subject pronoun; used verbatim in the question and in
# the solution ("He finds 3 more, so he has 4 + 3 = 7.").
GAINS = ("gets {n} more", "finds {n} more", "buys {n} more", "is given {n} more",
         "picks up {n} more")
LOSSES = ("gives {n} to {F}", "loses {n}", "gives away {n}", "sells {n}", "uses {n}")
QUESTIONS = ("How many {obj} does {A} have now?", "How many {obj} does {A} have in the end?",
             "How many {obj} does {A} have after that?")
TOGETHER = ("{A} has {a} {obj} and {B} has {b} {obj}. How many {obj} do they have together?",
            "{A} has {a} {obj} and {B} has {b} {obj}. How many {obj} do {A} and {B} have "
            "in total?")
MORE_THAN = "{A} has {a} {obj}. {B} has {b} more {obj} than {A}. How many {obj} does {B} have?"
FEWER_THAN = "{A} has {a} {obj}. {B} has {b} fewer {obj} than {A}. How many {obj} does {B} have?"

ANSWER = " The answer is {r}."  # LLM-Adapters' closing sentence; evaluators take its number


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _changes(rng: random.Random, start: int, signs: str, people: dict) -> tuple[str, str, int]:
    """Applies one gain/loss step per sign ('+' or '-') to `start`.

    Returns (question sentences, solution sentences, final result). Operands are
    1-9 and a loss never takes more than there is, so results stay in 0..18."""
    question, solution, x = [], [], start
    for sign in signs:
        if sign == "+":
            n = rng.randint(1, 9)
            phrase, y, op = rng.choice(GAINS), x + n, "+"
        else:
            n = rng.randint(1, min(9, x))
            phrase, y, op = rng.choice(LOSSES), x - n, "-"
        clause = f"{people['he']} {phrase.format(n=n, F=people['F'])}"
        question.append(_cap(clause) + ".")
        solution.append(f"{_cap(clause)}, so {people['he']} has {x} {op} {n} = {y}.")
        x = y
    return " ".join(question), " ".join(solution), x


def sample(rng: random.Random) -> dict:
    """One problem as an LLM-Adapters record, drawn with `rng`."""
    (a_name, he, _), (b_name, _, _) = rng.sample(PEOPLE, 2)
    obj = rng.choice(OBJECTS)
    kind = rng.choice(("+", "-", "+-", "-+", "together", "more_than", "fewer_than"))
    a = rng.randint(2, 9)
    if kind in ("together", "more_than", "fewer_than"):
        b = rng.randint(1, 9) if kind != "fewer_than" else rng.randint(1, a - 1)
        r = a - b if kind == "fewer_than" else a + b
        fmt = dict(A=a_name, B=b_name, a=a, b=b, obj=obj)
        if kind == "together":
            question = rng.choice(TOGETHER).format(**fmt)
            solution = f"{a_name} has {a} and {b_name} has {b}, so together they have " \
                       f"{a} + {b} = {r}."
        elif kind == "more_than":
            question = MORE_THAN.format(**fmt)
            solution = f"{b_name} has {b} more than {a_name}, so {b_name} has {a} + {b} = {r}."
        else:
            question = FEWER_THAN.format(**fmt)
            solution = f"{b_name} has {b} fewer than {a_name}, so {b_name} has {a} - {b} = {r}."
    else:
        start = rng.choice(STARTS).format(A=a_name, n=a, obj=obj)
        steps_q, steps_s, r = _changes(rng, a, kind, {"he": he, "F": b_name})
        ask = rng.choice(QUESTIONS).format(A=a_name, obj=obj)
        question = f"{start} {steps_q} {ask}"
        solution = f"{a_name} has {a} {obj}. {steps_s}"
    return {"instruction": question, "input": "", "output": solution + ANSWER.format(r=r),
            "answer": str(r)}


def normalize(question: str) -> str:
    """The key under which two questions count as the same item."""
    return " ".join(question.lower().split())


def _draw(rng: random.Random, n: int, taken: set[str]) -> list[dict]:
    out = []
    for _ in range(200 * n + 1000):  # the space is ~10^6 questions: this never binds
        if len(out) == n:
            return out
        rec = sample(rng)
        key = normalize(rec["instruction"])
        if key not in taken:
            taken.add(key)
            out.append(rec)
    raise ValueError(f"could not draw {n} distinct arithmetic problems; ask for fewer")


def make_split(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) records: deterministic for `seed`, disjoint by normalized question.

    The seeds are strings: `random.Random` hashes them with SHA-512, which is
    stable across Python versions and processes (unlike `hash()`)."""
    if n_train < 0 or n_test < 0:
        raise ValueError(f"split sizes must be >= 0, got n_train={n_train}, n_test={n_test}")
    taken: set[str] = set()
    test = _draw(random.Random(f"arith-test-{seed}"), n_test, taken)
    train = _draw(random.Random(f"arith-train-{seed}"), n_train, taken)
    return train, test
