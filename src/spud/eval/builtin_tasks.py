"""Built-in tasks, generated offline and deterministically from a seed.

The arithmetic prompts use exactly the surface formats of the built-in training mix
(spud.data.builtin: "What is 17 plus 25? 17 + 25 = 42." and "17 + 25 = 42"), so a minutes-old
model from `spud demo` is evaluated on text it has learned to continue and can beat chance.
Eval examples come from a separate string-seeded stream; with 1-4 digit numbers some overlap with
training sums is unavoidable (small sums are few), which is acceptable for a smoke-test task.
"""

from __future__ import annotations

import random

from spud.data.builtin import (  # the training mix's own generators
    _NAMES,
    _OPS,
    _operation,
)
from spud.eval.tasks import CODE_STOP, Example, Task

EVAL_SIZE = {"arithmetic": 500, "word_problems": 250, "mc_arithmetic": 500}
POOL_SIZE = 50


def _rng(task: str, split: str, seed: int) -> random.Random:
    # str seeds hash with SHA-512 in random.Random: stable across runs and Python versions
    return random.Random(f"spud-eval/{task}/{split}/{seed}")


def _arith_prompt(rng: random.Random) -> tuple[str, int, tuple]:
    a, op, b, c = _operation(rng)
    if rng.random() < 0.5:
        return f"What is {a} {_OPS[op]} {b}? {a} {op} {b} =", c, (a, op, b)
    return f"{a} {op} {b} =", c, (a, op, b)


def arithmetic(seed: int) -> Task:
    def make(split: str, n: int) -> list[Example]:
        rng, out = _rng("arithmetic", split, seed), []
        for i in range(n):
            prompt, c, _ = _arith_prompt(rng)
            out.append(Example(prompt, str(c), demo=f" {c}", where=f"arithmetic/{split}/{i}"))
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
            prompt, c, (a, op, b) = _arith_prompt(rng)
            options = [c, *_distractors(rng, a, op, b, c)]
            rng.shuffle(options)
            choices = [f" {x}" for x in options]
            label = options.index(c)
            out.append(Example(prompt, choices[label], demo=choices[label], choices=choices,
                               label=label, where=f"mc_arithmetic/{split}/{i}"))
        return out

    return Task("mc_arithmetic", "mc", make("test", EVAL_SIZE["mc_arithmetic"]),
                make("train", POOL_SIZE), separator="\n")


_ITEMS = ["apples", "pencils", "books", "marbles", "cookies", "stickers", "cards", "shells"]


def _word_problem(rng: random.Random) -> tuple[str, str, int]:
    """A two- or three-step problem with a GSM8K-style worked answer ending in '#### N'."""
    name, other = rng.sample(_NAMES, 2)
    items = rng.choice(_ITEMS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    steps = [f"{name} starts with {a} {items} and buys {b} more, so {name} has {a} + {b} = {a + b}."]
    q = f"{name} has {a} {items} and buys {b} more."
    total = a + b
    if rng.random() < 0.5:
        k = rng.randint(2, 4)
        q += f" Then {name} buys {k} times as many as {name} has now and adds them."
        steps.append(f"{name} buys {total} * {k} = {total * k} more, so {name} has "
                     f"{total} + {total * k} = {total * (k + 1)}.")
        total *= k + 1
    g = rng.randint(1, total - 1)
    q += f" {name} gives {g} {items} to {other}. How many {items} does {name} have left?"
    steps.append(f"After giving {g} away, {name} has {total} - {g} = {total - g}.")
    total -= g
    return q, " ".join(steps) + f"\n#### {total}", total


def word_problems(seed: int) -> Task:
    def make(split: str, n: int) -> list[Example]:
        rng, out = _rng("word_problems", split, seed), []
        for i in range(n):
            q, worked, ans = _word_problem(rng)
            out.append(Example(f"Question: {q}\nAnswer:", str(ans), demo=" " + worked,
                               where=f"word_problems/{split}/{i}"))
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
