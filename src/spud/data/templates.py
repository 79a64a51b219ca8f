"""Wordings of the built-in arithmetic questions and word problems, shared by the pretraining
generators (spud.data.builtin), the SFT data (spud.posttrain.builtin_chat) and the evaluation sets
(spud.eval.builtin_tasks, spud.posttrain.chat_eval).

Every wording has a stable id; `spud.data.facts.template_held_out` puts about 1 in 4 of them in
the eval-only part, so a model that has only learned the training wordings meets new ones when it
is evaluated. Ids, not list positions, decide the split: adding a wording never moves another.
Distractor sentences (irrelevant details a reader has to ignore) are split the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

from spud.data.facts import canonical, number_words, template_held_out

NAMES = ["Tom", "Anna", "Sam", "Mia", "Leo", "Emma", "Ben", "Lily", "Max", "Zoe", "Omar", "Nina",
         "Ravi", "Sara", "Jack", "Ella", "Ivan", "Lucy", "Noah", "Ada"]

# ------------------------------------------------------------------------ one-operation questions
# {a} and {b} are the operands in the order of the equation "a op b"; short on purpose, so that
# every 13-word window of a question holds an operand (see spud.eval.decontam).
ASK: dict[str, list[tuple[str, str]]] = {
    "+": [
        ("p01", "What is {a} plus {b}?"), ("p02", "What's {a} + {b}?"), ("p03", "Compute {a} + {b}."),
        ("p04", "Calculate {a} plus {b}."), ("p05", "{a} + {b} = ?"), ("p06", "How much is {a} plus {b}?"),
        ("p07", "Please work out {a} + {b}."), ("p08", "{a} + {b}"), ("p09", "Could you add {a} and {b} for me?"),
        ("p10", "Add {a} and {b}."), ("p11", "What is the sum of {a} and {b}?"), ("p12", "Find {a} + {b}."),
        ("p13", "What do you get if you add {b} to {a}?"), ("p14", "Can you tell me what {a} + {b} is?"),
        ("p15", "{a} plus {b} is what?"), ("p16", "Sum {a} and {b}, please."), ("p17", "Quick one: {a} + {b}?"),
        ("p18", "What is the total of {a} and {b}?"), ("p19", "I need {a} + {b}."), ("p20", "Work out {a} plus {b}."),
        ("p21", "Help me add {a} and {b}."), ("p22", "What number is {b} more than {a}?"),
        ("p23", "If I have {a} and get {b} more, how many is that?"), ("p24", "Tell me the sum {a} + {b}."),
        ("p25", "Add up {a} and {b}."), ("p26", "Solve: {a} + {b}"), ("p27", "What does {a} + {b} equal?"),
        ("p28", "Increase {a} by {b}. What do you get?"),
    ],
    "-": [
        ("m01", "What is {a} minus {b}?"), ("m02", "What's {a} - {b}?"), ("m03", "Compute {a} - {b}."),
        ("m04", "Calculate {a} minus {b}."), ("m05", "{a} - {b} = ?"), ("m06", "How much is {a} minus {b}?"),
        ("m07", "Please work out {a} - {b}."), ("m08", "{a} - {b}"), ("m09", "Could you subtract {b} from {a} for me?"),
        ("m10", "Subtract {b} from {a}."), ("m11", "What is the difference between {a} and {b}?"),
        ("m12", "Find {a} - {b}."), ("m13", "What do you get if you take {b} away from {a}?"),
        ("m14", "Can you tell me what {a} - {b} is?"), ("m15", "{a} minus {b} is what?"),
        ("m16", "Quick one: {a} - {b}?"), ("m17", "What number is {b} less than {a}?"),
        ("m18", "If I have {a} and lose {b}, how many are left?"), ("m19", "Take {b} from {a}."),
        ("m20", "Solve: {a} - {b}"), ("m21", "What does {a} - {b} equal?"), ("m22", "Decrease {a} by {b}."),
        ("m23", "How much is left when {b} is taken from {a}?"), ("m24", "Work out {a} minus {b}."),
    ],
    "*": [
        ("t01", "What is {a} times {b}?"), ("t02", "What's {a} * {b}?"), ("t03", "Compute {a} * {b}."),
        ("t04", "Calculate {a} times {b}."), ("t05", "{a} * {b} = ?"), ("t06", "How much is {a} times {b}?"),
        ("t07", "Please work out {a} * {b}."), ("t08", "{a} * {b}"), ("t09", "Could you multiply {a} by {b} for me?"),
        ("t10", "Multiply {a} and {b}."), ("t11", "What is the product of {a} and {b}?"),
        ("t12", "What is {a} multiplied by {b}?"), ("t13", "Quick one: {a} * {b}?"), ("t14", "Solve: {a} * {b}"),
        ("t15", "What does {a} * {b} equal?"), ("t16", "Find {a} times {b}."),
    ],
    "/": [
        ("d01", "What is {a} divided by {b}?"), ("d02", "What's {a} / {b}?"), ("d03", "Compute {a} / {b}."),
        ("d04", "Calculate {a} divided by {b}."), ("d05", "{a} / {b} = ?"), ("d06", "How much is {a} divided by {b}?"),
        ("d07", "Please work out {a} / {b}."), ("d08", "{a} / {b}"), ("d09", "Could you divide {a} by {b} for me?"),
        ("d10", "Divide {a} by {b}."), ("d11", "Quick one: {a} / {b}?"), ("d12", "Solve: {a} / {b}"),
        ("d13", "What does {a} / {b} equal?"), ("d14", "Find {a} divided by {b}."),
    ],
}

# Irrelevant sentences put before a question: the answer must not depend on them.
DISTRACTORS: list[tuple[str, str]] = [
    ("x01", "I'm checking my homework."), ("x02", "My teacher asked this today."), ("x03", "Quick question."),
    ("x04", "This is for a recipe."), ("x05", "Hi!"), ("x06", "I keep getting this wrong."),
    ("x07", "It is raining here."), ("x08", "{name} asked me this."), ("x09", "Sorry to bother you."),
    ("x10", "I am {n} years old."), ("x11", "Just curious."), ("x12", "We are playing a game."),
    ("x13", "My cat is asleep."), ("x14", "The shop opens at {n}."), ("x15", "Be quick, please."),
    ("x16", "I have {n} minutes left."), ("x17", "Hello there."), ("x18", "Need help with maths."),
    ("x19", "{name} thinks it is easy."), ("x20", "The bus is late again."),
]


def split(items: list[tuple], family: str, held_out: bool) -> list[tuple]:
    """The training (held_out=False) or eval-only (held_out=True) part of a list of wordings."""
    return [it for it in items if template_held_out(family, it[0]) == held_out]


@cache
def ask_templates(op: str, held_out: bool) -> list[tuple[str, str]]:
    return split(ASK[op], "ask" + op, held_out)


@cache
def distractors(held_out: bool) -> list[tuple[str, str]]:
    return split(DISTRACTORS, "distractor", held_out)


@cache
def story_distractors(held_out: bool) -> list[tuple[str, str]]:
    return split(STORY_DISTRACTORS, "story-distractor", held_out)


def show(n: int, rng: random.Random, words: float) -> str:
    """A number in digits, or (with probability `words`) in English words."""
    return number_words(n) if n < 1000 and rng.random() < words else str(n)


def ask(rng: random.Random, op: str, a: int, b: int, held_out: bool, words: float = 0.0,
        distract: float = 0.0) -> tuple[str, str]:
    """→ (template id, question text) for "a op b" in a wording of the chosen part."""
    tid, tpl = rng.choice(ask_templates(op, held_out))
    text = tpl.format(a=show(a, rng, words), b=show(b, rng, words))
    if rng.random() < distract:
        did, d = rng.choice(distractors(held_out))
        text = d.format(name=rng.choice(NAMES), n=rng.randint(2, 12)) + " " + text
        tid += "+" + did
    return tid, text


# ------------------------------------------------------------------------ multi-step word problems
# (container, containers, things): "boxes of eggs plus loose eggs" and its cousins
GROUPS = [("box", "boxes", "eggs"), ("pack", "packs", "cards"), ("bag", "bags", "marbles"),
          ("crate", "crates", "apples"), ("tray", "trays", "cookies"), ("jar", "jars", "sweets"),
          ("carton", "cartons", "juice boxes"), ("shelf", "shelves", "books")]
# Irrelevant details inside a story, put before its question sentence (numbers included: a reader
# must not add the age of the dog).
STORY_DISTRACTORS: list[tuple[str, str]] = [
    ("y01", "The weather is sunny."), ("y02", "{o} is {n} years old."), ("y03", "It takes {n} minutes to get home."),
    ("y04", "{o} watches quietly."), ("y05", "The shop closes at {n}."), ("y06", "There is a red door."),
    ("y07", "{o} has a dog."), ("y08", "It is a Tuesday."), ("y09", "The room has {n} windows."),
    ("y10", "Everyone is happy."), ("y11", "{o} is reading a book."), ("y12", "The bus left at {n}."),
]
ITEMS = ["apples", "pencils", "books", "marbles", "cookies", "stickers", "cards", "shells", "coins",
         "stamps", "oranges", "balloons"]

# kind → how the numbers combine; every wording of a kind is the same computation.
#   groups_plus  a*b + c      groups_minus a*b - c     plus_minus a + b - c
#   minus_plus   a - b + c    price        c - a*b     sum3       a + b + c
STORIES: list[tuple[str, str, str]] = [
    ("g1", "groups_plus", "{name} buys {a} {cs} of {t} with {b} {t} in each {c}, and already has {x} loose {t}. How many {t} does {name} have now?"),
    ("g2", "groups_plus", "There are {a} {cs} with {b} {t} in each. {name} adds {x} more {t}. How many {t} are there in total?"),
    ("g3", "groups_plus", "{name} has {x} {t} on the table and {a} full {cs}. Each {c} holds {b} {t}. How many {t} does {name} have altogether?"),
    ("g4", "groups_plus", "A {c} holds {b} {t}. {name} fills {a} {cs} and keeps {x} {t} aside. How many {t} is that in all?"),
    ("g5", "groups_plus", "{name} counts {a} {cs} of {b} {t} each, plus {x} {t} that are not in a {c}. What is the total?"),
    ("h1", "groups_minus", "{name} has {a} {cs} with {b} {t} in each and gives away {x} {t}. How many {t} are left?"),
    ("h2", "groups_minus", "There are {a} {cs} of {b} {t}. {x} of the {t} get lost. How many {t} remain?"),
    ("h3", "groups_minus", "Each {c} has {b} {t}. {name} opens {a} {cs} and uses {x} {t}. How many {t} are still unused?"),
    ("h4", "groups_minus", "{name} packs {b} {t} into each of {a} {cs}, then takes {x} {t} back out. How many {t} are in the {cs} now?"),
    ("k1", "plus_minus", "{name} has {a} {i} and gets {b} more. Then {name} gives {x} to {o}. How many {i} does {name} have left?"),
    ("k2", "plus_minus", "A jar holds {a} {i}. {name} puts in {b} more and later takes out {x}. How many {i} are in the jar?"),
    ("k3", "plus_minus", "{name} collects {a} {i} in the morning and {b} in the afternoon, then loses {x}. How many {i} are left?"),
    ("k4", "plus_minus", "{o} gives {name} {b} {i}. {name} had {a} before and then uses {x}. How many {i} does {name} have now?"),
    ("n1", "minus_plus", "{name} has {a} {i}, gives {b} to {o}, then finds {x} more. How many {i} does {name} have?"),
    ("n2", "minus_plus", "There were {a} {i} in a box. {b} were taken out and {x} were put back. How many {i} are in the box?"),
    ("n3", "minus_plus", "{name} starts with {a} {i}. After selling {b}, {name} buys {x} new ones. How many {i} now?"),
    ("n4", "minus_plus", "{name} had {a} {i} but lost {b}. {o} then gave {name} {x}. How many {i} does {name} have?"),
    ("q1", "price", "{name} buys {a} {i} that cost {b} dollars each and pays with {x} dollars. How much change does {name} get?"),
    ("q2", "price", "Each of the {i} costs {b} dollars. {name} has {x} dollars and buys {a} of them. How many dollars are left?"),
    ("q3", "price", "{name} pays for {a} {i} at {b} dollars apiece with a {x} dollar note. What is the change?"),
    ("q4", "price", "With {x} dollars, {name} buys {a} {i} for {b} dollars each. How much money remains?"),
    ("s1", "sum3", "{name} reads {a} pages on Monday, {b} on Tuesday and {x} on Wednesday. How many pages in all?"),
    ("s2", "sum3", "A farm has {a} cows, {b} sheep and {x} goats. How many animals are on the farm?"),
    ("s3", "sum3", "{name} walks {a} minutes, then {b} minutes, then {x} minutes more. How many minutes is that?"),
    ("s4", "sum3", "{name} scores {a} points, {o} scores {b} and Ada scores {x}. What is their total score?"),
]


@dataclass
class Story:
    template: str                  # id of the wording
    kind: str
    question: str
    steps: list[tuple[int, str, int, int]]  # (x, op, y, result) in order
    answer: int

    @property
    def facts(self) -> set:
        return {canonical(o, x, y) for x, o, y, _ in self.steps}

    def worked(self) -> str:
        """"9 * 12 = 108. 108 + 7 = 115. The answer is 115.": each step its own equation."""
        return " ".join(f"{x} {o} {y} = {r}." for x, o, y, r in self.steps) + f" The answer is {self.answer}."


@cache
def story_templates(held_out: bool) -> list[tuple[str, str, str]]:
    return [s for s in STORIES if template_held_out("story", s[0]) == held_out]


def _numbers(rng: random.Random, kind: str) -> tuple[int, int, int, list[tuple[int, str, int, int]], int]:
    if kind in ("groups_plus", "groups_minus", "price"):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        p = a * b
        if kind == "groups_plus":
            x = rng.randint(1, 40)
            return a, b, x, [(a, "*", b, p), (p, "+", x, p + x)], p + x
        if kind == "groups_minus":
            x = rng.randint(1, p - 1)
            return a, b, x, [(a, "*", b, p), (p, "-", x, p - x)], p - x
        x = p + rng.randint(1, 60)
        return a, b, x, [(a, "*", b, p), (x, "-", p, x - p)], x - p
    a, b = rng.randint(10, 60), rng.randint(2, 40)
    if kind == "plus_minus":
        x = rng.randint(1, a + b - 1)
        return a, b, x, [(a, "+", b, a + b), (a + b, "-", x, a + b - x)], a + b - x
    if kind == "minus_plus":
        b = rng.randint(1, a - 1)
        x = rng.randint(2, 40)
        return a, b, x, [(a, "-", b, a - b), (a - b, "+", x, a - b + x)], a - b + x
    x = rng.randint(2, 40)
    return a, b, x, [(a, "+", b, a + b), (a + b, "+", x, a + b + x)], a + b + x


def story(rng: random.Random, held_out: bool, words: float = 0.0, distract: float = 0.0) -> Story:
    """One word problem in a wording of the chosen part (numbers not yet filtered for held-out
    facts: callers redraw until the facts suit them)."""
    tid, kind, tpl = rng.choice(story_templates(held_out))
    a, b, x, steps, ans = _numbers(rng, kind)
    name, other = rng.sample(NAMES[:-1], 2)  # "Ada" is a fixed character of one wording
    c, cs, t = rng.choice(GROUPS)
    q = tpl.format(name=name, o=other, a=show(a, rng, words), b=show(b, rng, words), x=show(x, rng, words),
                   c=c, cs=cs, t=t, i=rng.choice(ITEMS))
    if rng.random() < distract:
        did, d = rng.choice(story_distractors(held_out))
        head, _, ask_ = q.rstrip("?").rpartition(". ")
        q = f"{head}. {d.format(o=other, n=rng.randint(2, 12))} {ask_}?"
        tid += "+" + did
    return Story(tid, kind, q[0].upper() + q[1:], steps, ans)
