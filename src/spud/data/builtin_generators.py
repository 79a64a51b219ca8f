"""The generated half of the built-in mix: endless arithmetic and reasoning examples.

- `arithmetic_example`: worked sums in many surface formats (bare equations, questions in the
  training wordings of spud.data.templates, numbers in words, column additions, times tables,
  multi-step expressions).
- `reasoning_example`: word problems (one-step and multi-step stories with distractors),
  comparisons, letter counts, sequences, calendar questions and syllogisms, each worked.

Evaluation stays held out by construction: questions use only the training wordings, and
`clean` redraws any example whose text states a held-out fact (spud.data.facts) — found by
reading the text back with the same `extract_facts` the decontamination check uses, so a new
template cannot leak an eval fact by forgetting to declare it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from spud.data import templates
from spud.data.facts import any_held_out, extract_facts, number_words

OPS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
_COLUMNS = ["Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands"]
NAMES, ITEMS = templates.NAMES, templates.ITEMS


def clean(make: Callable[[random.Random], str], rng: random.Random) -> str:
    """An example from `make` that states no held-out fact (about 1 in 10 draws is redrawn)."""
    while True:
        text = make(rng)
        if not any_held_out(extract_facts(text)):
            return text


# --------------------------------------------------------------------------------- arithmetic
def number(rng: random.Random, max_digits: int = 4) -> int:
    """Uniform over digit counts first, so 3-digit numbers are as common as 1-digit ones instead
    of 90% of draws being 4-digit."""
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def operation(rng: random.Random, op: str | None = None) -> tuple[int, str, int, int]:
    """One operation of the pretraining range: 1-4 digit sums and differences, products of at
    most 5 operand digits, exact quotients with a divisor up to 99."""
    op = op or rng.choice("+-*/")
    if op == "+":
        a, b = number(rng), number(rng)
        return a, op, b, a + b
    if op == "-":
        a, b = sorted((number(rng), number(rng)), reverse=True)  # results stay non-negative
        return a, op, b, a - b
    if op == "*":
        da = rng.randint(1, 4)
        a, b = number(rng, da), number(rng, max(1, 5 - da))
        return a, op, b, a * b
    b = rng.randint(1, 99)  # exact division: build the dividend from the quotient
    q = rng.randint(0, 9999 // b)
    return b * q, op, b, q


def column_addition(rng: random.Random) -> str:
    a, b = number(rng), number(rng)
    da, db = str(a)[::-1], str(b)[::-1]
    lines = [f"Add {a} + {b} column by column."]
    carry = 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        new_carry = s // 10
        step = f"{_COLUMNS[i]}: {terms} = {s}, write {s % 10}"
        lines.append(step + (f", carry {new_carry}." if new_carry else "."))
        carry = new_carry
    if carry:
        lines.append(f"{_COLUMNS[len(lines) - 1]}: write the carry {carry}.")
    lines.append(f"So {a} + {b} = {a + b}.")
    return "\n".join(lines)


def multi_step(rng: random.Random) -> str:
    a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 12)
    if rng.random() < 0.5:  # parentheses first
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        if op1 == "-":
            a, b = max(a, b), min(a, b)
        d = {"+": a + b, "-": a - b, "*": a * b}[op1]
        if op2 == "-":
            c = rng.randint(0, d)
        e = {"+": d + c, "-": d - c, "*": d * c}[op2]
        return (f"Compute ({a} {op1} {b}) {op2} {c}. First {a} {op1} {b} = {d}. "
                f"Then {d} {op2} {c} = {e}. The answer is {e}.")
    op = rng.choice("+*")  # precedence: the product is computed before the sum
    d = b * c
    e = a + d if op == "+" else a * d
    return (f"Compute {a} {op} {b} * {c}. Multiplication comes first: {b} * {c} = {d}. "
            f"Then {a} {op} {d} = {e}. The answer is {e}.")


def times_table(rng: random.Random) -> str:
    n = rng.randint(2, 12)
    rows = "\n".join(f"{n} * {k} = {n * k}" for k in range(1, 11))
    return f"Multiplication table of {n}:\n{rows}"


def _arithmetic(rng: random.Random) -> str:
    kind = rng.choices(
        ["equation", "question", "qa", "words", "multi", "column", "table"],
        weights=[5, 6, 3, 2, 3, 2, 1],
    )[0]
    if kind == "multi":
        return multi_step(rng)
    if kind == "column":
        return column_addition(rng)
    if kind == "table":
        return times_table(rng)
    a, op, b, c = operation(rng)
    if kind == "equation":
        return f"{a} {op} {b} = {c}"
    if kind == "question":  # a training wording, sometimes with number words or a distractor
        _, q = templates.ask(rng, op, a, b, held_out=False, words=0.15, distract=0.1)
        return f"{q} {a} {op} {b} = {c}."
    if kind == "qa":
        return f"Q: {a} {op} {b}\nA: {c}"
    if max(a, b, c) < 1000 and rng.random() < 0.5:
        return f"{number_words(a)} {OPS[op]} {number_words(b)} equals {number_words(c)}."
    return f"{a} {OPS[op]} {b} equals {c}."


def arithmetic_example(rng: random.Random) -> str:
    return clean(_arithmetic, rng)


# ---------------------------------------------------------------------------------- reasoning
_ADJECTIVES = [("taller", "tallest", "shortest"), ("older", "oldest", "youngest"),
               ("faster", "fastest", "slowest"), ("heavier", "heaviest", "lightest")]
_WORDS = ["strawberry", "banana", "mississippi", "letter", "committee", "bookkeeper", "balloon",
          "pepper", "address", "coffee", "success", "parallel", "assessment", "tomorrow",
          "apple", "kitten", "little", "puzzle", "grammar", "window", "bubble", "rhythm"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_KINDS = [("cat", "cats", "animal"), ("rose", "roses", "flower"), ("oak", "oaks", "tree"),
          ("sparrow", "sparrows", "bird"), ("salmon", "salmon", "fish"),
          ("hammer", "hammers", "tool"), ("violin", "violins", "instrument")]
_CANNOT = [("fish", "fish", "walk"), ("stone", "stones", "breathe"), ("penguin", "penguins", "fly"),
           ("chair", "chairs", "think"), ("cloud", "clouds", "sing")]
_CONDITIONALS = [  # (condition, consequence, question about consequence, its negation, question)
    ("it rains", "the grass gets wet", "Does the grass get wet?", "the grass does not get wet",
     "Does it rain?"),
    ("the alarm rings", "Sam wakes up", "Does Sam wake up?", "Sam does not wake up",
     "Does the alarm ring?"),
    ("the light is red", "the cars stop", "Do the cars stop?", "the cars do not stop",
     "Is the light red?"),
    ("the water boils", "the kettle whistles", "Does the kettle whistle?",
     "the kettle does not whistle", "Does the water boil?"),
]


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def word_problem(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    items = rng.choice(ITEMS)
    kind = rng.choice(["buy", "give", "groups", "share"])
    if kind == "buy":
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        return (f"{name} has {a} {items} and buys {b} more. How many {items} does {name} have? "
                f"{name} has {a} + {b} = {a + b} {items}.")
    if kind == "give":
        a = rng.randint(3, 60)
        b = rng.randint(1, a - 1)
        return (f"{name} has {a} {items} and gives {b} to {other}. How many {items} does {name} "
                f"have left? {name} has {a} - {b} = {a - b} {items} left.")
    if kind == "groups":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"{name} has {a} bags with {b} {items} in each bag. How many {items} does {name} "
                f"have? {name} has {a} * {b} = {a * b} {items}.")
    b, q = rng.randint(2, 9), rng.randint(2, 12)
    return (f"{name} shares {b * q} {items} equally among {b} friends. How many {items} does each "
            f"friend get? Each friend gets {b * q} / {b} = {q} {items}.")


def story_problem(rng: random.Random) -> str:
    """A multi-step story in a training wording, worked one equation per step."""
    s = templates.story(rng, held_out=False, words=0.1, distract=0.25)
    return f"{s.question} {s.worked()}"


def comparison(rng: random.Random) -> str:
    if rng.random() < 0.5:
        a, b = rng.sample(range(0, 1000), 2)
        if rng.random() < 0.5:
            big = max(a, b)
            return f"Which is larger, {a} or {b}? {big} is larger than {min(a, b)}, so the answer is {big}."
        small = min(a, b)
        return f"Which is smaller, {a} or {b}? {small} is smaller than {max(a, b)}, so the answer is {small}."
    x, y, z = rng.sample(NAMES, 3)
    comp, most, least = rng.choice(_ADJECTIVES)
    facts = f"{x} is {comp} than {y}. {y} is {comp} than {z}."
    if rng.random() < 0.5:
        return (f"{facts} Who is the {most}? {x} is {comp} than {y}, and {y} is {comp} than {z}, "
                f"so {x} is the {most}.")
    return (f"{facts} Who is the {least}? {z} is below {y}, and {y} is below {x}, "
            f"so {z} is the {least}.")


def letter_count(rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("qxzjvk")
    positions = [str(i + 1) for i, ch in enumerate(word) if ch == letter]
    spelled = ", ".join(word)
    n = len(positions)
    if n == 0:
        where = f'"{letter}" does not appear'
    else:
        where = f'"{letter}" is at position{"s" if n > 1 else ""} {", ".join(positions)}'
    return (f'How many times does the letter "{letter}" appear in "{word}"? Spelled out: {spelled}. '
            f"The letter {where}, so the answer is {n}.")


def sequence(rng: random.Random) -> str:
    kind = rng.choice(["up", "down", "times"])
    if kind == "times":
        ratio, start = rng.choice([2, 3]), rng.randint(1, 5)
        seq = [start * ratio**i for i in range(5)]
        rule, nxt = f"Each number is {ratio} times the one before", seq[-1] * ratio
        work = f"{seq[-1]} * {ratio} = {nxt}"
    else:
        step = rng.randint(1, 12)
        start = rng.randint(0, 50) if kind == "up" else rng.randint(5 * step, 5 * step + 60)
        sign = 1 if kind == "up" else -1
        seq = [start + sign * step * i for i in range(5)]
        nxt = seq[-1] + sign * step
        rule = f"Each number is {step} {'more' if kind == 'up' else 'less'} than the one before"
        work = f"{seq[-1]} {'+' if kind == 'up' else '-'} {step} = {nxt}"
    shown = ", ".join(str(v) for v in seq)
    return f"What comes next in the sequence {shown}? {rule}, so the next number is {work}."


def days(rng: random.Random) -> str:
    start = rng.randrange(7)
    today = _DAYS[start]
    if rng.random() < 0.3:
        return f"What day comes after {today}? The day after {today} is {_DAYS[(start + 1) % 7]}."
    n = rng.randint(1, 20)
    if rng.random() < 0.3:
        back = _DAYS[(start - n) % 7]
        split = f" ({n // 7} week{'s' if n >= 14 else ''} and {n % 7} days)" if n >= 7 else ""
        return (f"If today is {today}, what day was it {n} days ago? Going back {n} days{split} "
                f"from {today} gives {back}.")
    target = _DAYS[(start + n) % 7]
    if n <= 6:
        walk = ", ".join(_DAYS[(start + k) % 7] for k in range(1, n + 1))
        how = f"Counting forward from {today}: {walk}."
    else:
        how = (f"{n} days is {n // 7} week{'s' if n >= 14 else ''} and {n % 7} days, and whole "
               f"weeks do not change the day, so count {n % 7} days forward from {today}.")
    return f"If today is {today}, what day will it be in {n} days? {how} The answer is {target}."


def syllogism(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    kind = rng.choice(["all", "none", "if", "if_not"])
    if kind == "all":
        one, many, group = rng.choice(_KINDS)
        a1, a2 = _article(one), _article(group)
        return (f"All {many} are {group}s. {name} has {a1} {one}. Is {name}'s {one} {a2} {group}? "
                f"Yes. Every {one} is {a2} {group}, so {name}'s {one} is {a2} {group}.")
    if kind == "none":
        one, many, verb = rng.choice(_CANNOT)
        a1 = _article(one)
        return (f"No {many} can {verb}. {name} has {a1} {one}. Can {name}'s {one} {verb}? No. "
                f"No {many} can {verb}, and {name}'s {one} is {a1} {one}, so it cannot {verb}.")
    p, q, ask_q, not_q, ask_p = rng.choice(_CONDITIONALS)
    if kind == "if":
        return f"If {p}, then {q}. Today {p}. {ask_q} Yes. Since {p}, it follows that {q}."
    return (f"If {p}, then {q}. Today {not_q}. {ask_p} No. If {p}, then {q}; "
            f"but {not_q}, so it cannot be that {p}.")


_REASONING: list[tuple[Callable[[random.Random], str], int]] = [
    (word_problem, 2), (story_problem, 3), (comparison, 2), (letter_count, 2), (sequence, 2),
    (days, 2), (syllogism, 2),
]


def reasoning_example(rng: random.Random) -> str:
    make = rng.choices([m for m, _ in _REASONING], weights=[w for _, w in _REASONING])[0]
    return clean(make, rng)
