"""Built-in tasks, generated offline and deterministically from a seed.

The arithmetic prompts use the surface formats of the built-in training mix (spud.data.builtin:
"What is 17 plus 25? 17 + 25 = 42." and "17 + 25 = 42"), so a minutes-old model from `spud demo`
is evaluated on text it has learned to continue and can beat chance. They are held out all the
same: every question is a fact the training generators never state (spud.data.facts), and the
word problems use story wordings no training generator uses (spud.data.templates). Each example
carries its facts, and `spud eval` checks them and its text against the run's actual training
data (spud.eval.decontam).
"""

from __future__ import annotations

import random

from spud.data import templates
from spud.data.builtin_generators import OPS, operation
from spud.data.facts import any_held_out, canonical, fact_held_out
from spud.eval.example import CODE_STOP, Example, Task

EVAL_SIZE = {"arithmetic": 500, "word_problems": 250, "mc_arithmetic": 500}
POOL_SIZE = 50


def _rng(task: str, split: str, seed: int) -> random.Random:
    # str seeds hash with SHA-512 in random.Random: stable across runs and Python versions
    return random.Random(f"spud-eval/{task}/{split}/{seed}")


def _held_out_operation(rng: random.Random, held_out: bool) -> tuple[int, str, int, int]:
    """An operation of the pretraining range whose fact is held out (eval) or not (few-shot pool)."""
    while True:
        a, op, b, c = operation(rng)
        if fact_held_out(op, a, b) == held_out:
            return a, op, b, c


def _arith_prompt(rng: random.Random, held_out: bool) -> tuple[str, int, tuple]:
    a, op, b, c = _held_out_operation(rng, held_out)
    if rng.random() < 0.5:
        return f"What is {a} {OPS[op]} {b}? {a} {op} {b} =", c, (a, op, b)
    return f"{a} {op} {b} =", c, (a, op, b)


def arithmetic(seed: int) -> Task:
    def make(split: str, n: int) -> list[Example]:
        rng, out = _rng("arithmetic", split, seed), []
        for i in range(n):
            prompt, c, (a, op, b) = _arith_prompt(rng, held_out=split == "test")
            out.append(Example(prompt, str(c), demo=f" {c}", where=f"arithmetic/{split}/{i}",
                               facts=(canonical(op, a, b),), split="operands"))
        return out

    # one example per line, as in the training documents; the answer ends at the newline
    return Task("arithmetic", "gen", make("test", EVAL_SIZE["arithmetic"]), make("train", POOL_SIZE),
                answer="first_number", stop=("\n",), max_new_tokens=10, separator="\n")


def _distractors(rng: random.Random, a: int, op: str, b: int, c: int) -> list[int]:
    """Plausible wrong answers: off by one or ten, another operation, swapped last digits."""
    other = {"+": a * b, "-": a + b, "*": a + b, "/": a * b}[op]
    cands = [c + 1, c - 1, c + 10, c - 10, other, c + 2, int(str(c)[::-1])]
    seen, out = {c}, []
    rng.shuffle(cands)
    for x in cands:
        if x >= 0 and x not in seen:
            seen.add(x)
            out.append(x)
    return out[:3]


def mc_arithmetic(seed: int) -> Task:
    def make(split: str, n: int) -> list[Example]:
        rng, out = _rng("mc_arithmetic", split, seed), []
        for i in range(n):
            prompt, c, (a, op, b) = _arith_prompt(rng, held_out=split == "test")
            options = [c, *_distractors(rng, a, op, b, c)]
            rng.shuffle(options)
            choices = [f" {x}" for x in options]
            label = options.index(c)
            out.append(Example(prompt, choices[label], demo=choices[label], choices=choices,
                               label=label, where=f"mc_arithmetic/{split}/{i}",
                               facts=(canonical(op, a, b),), split="operands"))
        return out

    return Task("mc_arithmetic", "mc", make("test", EVAL_SIZE["mc_arithmetic"]),
                make("train", POOL_SIZE), separator="\n")


def _story(rng: random.Random, held_out: bool) -> templates.Story:
    """Eval: a held-out wording with at least one held-out fact; pool: training ones."""
    while True:
        s = templates.story(rng, held_out=held_out, words=0.1 if held_out else 0.0,
                            distract=0.25 if held_out else 0.0)
        if any_held_out(s.facts) == held_out:
            return s


def word_problems(seed: int) -> Task:
    """Two-step word problems with a GSM8K-style worked answer ending in '#### N'."""
    def make(split: str, n: int) -> list[Example]:
        rng, out = _rng("word_problems", split, seed), []
        for i in range(n):
            s = _story(rng, held_out=split == "test")
            out.append(Example(f"Question: {s.question}\nAnswer:", str(s.answer),
                               demo=f" {s.worked()}\n#### {s.answer}",
                               where=f"word_problems/{split}/{i} (wording {s.template})",
                               facts=tuple(sorted(s.facts)), split="multi_step"))
        return out

    return Task("word_problems", "gen", make("test", EVAL_SIZE["word_problems"]),
                make("train", POOL_SIZE), answer="gsm8k",
                stop=("\n\nQuestion:", "Question:", "\n\n"), max_new_tokens=128)


# (signature + docstring, body, asserts): HumanEval-shaped, small enough for a demo model
_CODE = [
    ("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n", "    return a + b\n",
     ["candidate(2, 3) == 5", "candidate(-1, 1) == 0", "candidate(0, 0) == 0"]),
    ("def sub(a, b):\n    \"\"\"Return a minus b.\"\"\"\n", "    return a - b\n",
     ["candidate(5, 3) == 2", "candidate(0, 4) == -4"]),
    ("def mul(a, b):\n    \"\"\"Return the product of a and b.\"\"\"\n", "    return a * b\n",
     ["candidate(4, 3) == 12", "candidate(-2, 5) == -10"]),
    ("def square(x):\n    \"\"\"Return x squared.\"\"\"\n", "    return x * x\n",
     ["candidate(3) == 9", "candidate(-4) == 16"]),
    ("def is_even(n):\n    \"\"\"Return True if n is even.\"\"\"\n", "    return n % 2 == 0\n",
     ["candidate(4) is True", "candidate(7) is False", "candidate(0) is True"]),
    ("def maximum(a, b):\n    \"\"\"Return the larger of a and b.\"\"\"\n", "    return a if a > b else b\n",
     ["candidate(2, 9) == 9", "candidate(9, 2) == 9", "candidate(-1, -5) == -1"]),
    ("def absolute(x):\n    \"\"\"Return the absolute value of x.\"\"\"\n", "    return -x if x < 0 else x\n",
     ["candidate(-3) == 3", "candidate(3) == 3", "candidate(0) == 0"]),
    ("def first(items):\n    \"\"\"Return the first element of the list items.\"\"\"\n", "    return items[0]\n",
     ["candidate([4, 5]) == 4", "candidate(['a']) == 'a'"]),
    ("def last(items):\n    \"\"\"Return the last element of the list items.\"\"\"\n", "    return items[-1]\n",
     ["candidate([4, 5]) == 5", "candidate(['a', 'b', 'c']) == 'c'"]),
    ("def length(items):\n    \"\"\"Return the number of elements in items.\"\"\"\n", "    return len(items)\n",
     ["candidate([1, 2, 3]) == 3", "candidate([]) == 0"]),
    ("def total(numbers):\n    \"\"\"Return the sum of a list of numbers.\"\"\"\n", "    return sum(numbers)\n",
     ["candidate([1, 2, 3]) == 6", "candidate([]) == 0"]),
    ("def reverse(s):\n    \"\"\"Return the string s reversed.\"\"\"\n", "    return s[::-1]\n",
     ["candidate('abc') == 'cba'", "candidate('') == ''"]),
    ("def upper(s):\n    \"\"\"Return s in upper case.\"\"\"\n", "    return s.upper()\n",
     ["candidate('abc') == 'ABC'", "candidate('A1') == 'A1'"]),
    ("def count_char(s, c):\n    \"\"\"Return how many times the character c occurs in s.\"\"\"\n",
     "    return s.count(c)\n", ["candidate('banana', 'a') == 3", "candidate('xyz', 'a') == 0"]),
    ("def double_all(numbers):\n    \"\"\"Return a list with every number doubled.\"\"\"\n",
     "    return [2 * x for x in numbers]\n", ["candidate([1, 2]) == [2, 4]", "candidate([]) == []"]),
    ("def is_empty(items):\n    \"\"\"Return True if items has no elements.\"\"\"\n",
     "    return len(items) == 0\n", ["candidate([]) is True", "candidate([0]) is False"]),
]


def code_simple(seed: int) -> Task:
    rng = _rng("code_simple", "order", seed)
    order = list(range(len(_CODE)))
    rng.shuffle(order)  # the seed only orders the problems (few-shot picks and --limit differ)
    examples = []
    for i in order:
        prompt, body, asserts = _CODE[i]
        entry = prompt.split("(")[0][4:]
        test = "def check(candidate):\n" + "".join(f"    assert {a}\n" for a in asserts)
        examples.append(Example(prompt, "", demo=body, test=test, entry_point=entry,
                                where=f"code_simple/{entry}"))
    return Task("code_simple", "code", examples, None, stop=CODE_STOP, max_new_tokens=48)


BUILTIN_TASKS = {"arithmetic": arithmetic, "word_problems": word_problems,
                 "mc_arithmetic": mc_arithmetic, "code_simple": code_simple}


def make_task(name: str, seed: int) -> Task:
    return BUILTIN_TASKS[name](seed)
