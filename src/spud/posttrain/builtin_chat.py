"""Built-in chat data, generated offline and deterministically: `--data builtin`.

- arithmetic questions in several phrasings, answered as "a + b = c." (the equation format of
  the pretraining mix, so SFT only has to teach the chat turn-taking, not new arithmetic);
  multi-step problems get short worked steps;
- simple instructions: repeat, reverse word order, count words or letters, capitalise, list;
- greetings, thanks and identity turns ("I am Spud, a small language model ...").

Numbers are kept in a range a ~1M-parameter model can get right (sums of up to 2-digit numbers,
the 12×12 times table and its divisions), so minutes of SFT on CPU reach high accuracy.
A hash-chosen 1 in 16 of the sums and differences is never generated for training: those are the
held-out facts `spud.posttrain.chat_eval` scores, so its accuracy on them is not memorisation.
Products and quotients come from the 12×12 table, which is learnt by heart (see `held_out`).
"""

from __future__ import annotations

import hashlib
import random

from spud.data.builtin import _ITEMS, _NAMES, _OPS

IDENTITY = "I am Spud, a small language model trained with the spud framework."
SYSTEM_PROMPTS = ["You are Spud, a helpful assistant.", "You are a helpful assistant.",
                  "Answer briefly."]
_WORDS = ["apple", "river", "green", "table", "music", "cloud", "stone", "light", "paper", "dream",
          "tiger", "house", "ocean", "bread", "train", "chair", "smile", "plant", "night", "grape"]
_LISTS = {"fruits": ["apple", "banana", "orange", "grape", "pear", "mango", "cherry", "plum"],
          "colours": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
          "animals": ["cat", "dog", "horse", "rabbit", "lion", "tiger", "sheep", "mouse"],
          "days of the week": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]}
_COUNT_WORDS = ["zero", "one", "two", "three", "four", "five"]


# ----------------------------------------------------------------------------------- arithmetic
def operation(rng: random.Random, op: str | None = None) -> tuple[int, str, int, int]:
    """One operation in the chat data's range: + and - on 1-2 digit numbers (non-negative
    results), * within the 12×12 table, exact / with divisor and quotient up to 12."""
    op = op or rng.choice("+-*/")
    if op in "+-":
        a, b = (rng.randint(0, 9) if rng.random() < 0.2 else rng.randint(10, 99) for _ in range(2))
        if op == "-":
            a, b = max(a, b), min(a, b)
        return a, op, b, a + b if op == "+" else a - b
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return a, op, b, a * b
    b, q = rng.randint(1, 12), rng.randint(0, 12)
    return b * q, op, b, q


def held_out(a: int, op: str, b: int) -> bool:
    """True for the sums and differences reserved for evaluation (never in the built-in training
    data). Products and quotients are never held out: the 12×12 table is a set of 169 facts one
    memorises rather than derives, so an unseen fact cannot be inferred from the others; its eval
    questions test recall in new phrasings and contexts instead."""
    if op in "*/":
        return False
    return hashlib.sha256(f"{a} {op} {b}".encode()).digest()[0] % 16 == 0


def question(rng: random.Random, a: int, op: str, b: int) -> str:
    word, sym = _OPS[op], op
    return rng.choice([
        f"What is {a} {word} {b}?", f"What's {a} {sym} {b}?", f"Compute {a} {sym} {b}.",
        f"Calculate {a} {word} {b}.", f"{a} {sym} {b} = ?", f"How much is {a} {word} {b}?",
        f"Please work out {a} {sym} {b}.", f"{a} {sym} {b}",
    ])


def answer(a: int, op: str, b: int, c: int) -> str:
    """Sums and differences of two-digit numbers get column steps (ones, then tens with the carry
    or borrow), the format of the pretraining mix's column additions: a tiny model gets multi-digit
    sums right far more often when each digit is its own small step. The result comes last."""
    if op not in "+-" or max(a, b) < 10:
        return f"{a} {op} {b} = {c}."
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    if op == "+":
        s0 = a0 + b0
        carry = " + 1" if s0 >= 10 else ""
        steps = f"Ones: {a0} + {b0} = {s0}. Tens: {a1} + {b1}{carry} = {a1 + b1 + s0 // 10}."
    elif a0 < b0:
        steps = f"Ones: {a0 + 10} - {b0} = {a0 + 10 - b0}, borrow 1. Tens: {a1} - 1 - {b1} = {a1 - 1 - b1}."
    else:
        steps = f"Ones: {a0} - {b0} = {a0 - b0}. Tens: {a1} - {b1} = {a1 - b1}."
    return f"{steps} So {a} {op} {b} = {c}."


def _single(rng: random.Random) -> tuple[str, str]:
    while True:
        a, op, b, c = operation(rng)
        if not held_out(a, op, b):
            return question(rng, a, op, b), answer(a, op, b, c)


def _multi(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 9)
    op1, op2 = rng.choice("+-"), rng.choice("+*")
    if op1 == "-":
        a, b = max(a, b), min(a, b)
    d = a + b if op1 == "+" else a - b
    e = d + c if op2 == "+" else d * c
    q = rng.choice([f"What is ({a} {op1} {b}) {op2} {c}?", f"Compute ({a} {op1} {b}) {op2} {c}."])
    return q, f"First {a} {op1} {b} = {d}. Then {d} {op2} {c} = {e}. The answer is {e}."


def _word_problem(rng: random.Random) -> tuple[str, str]:
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 30), rng.randint(1, 20)
    if rng.random() < 0.5:
        return (f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?",
                f"{a} + {b} = {a + b}. {name} has {a + b} {items}.")
    a += b
    return (f"{name} has {a} {items} and gives away {b}. How many are left?",
            f"{a} - {b} = {a - b}. {name} has {a - b} {items} left.")


# --------------------------------------------------------------------------------- instructions
def _instruction(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(2, 5))
    text = " ".join(words)
    kind = rng.choice(["repeat", "reverse", "count_words", "count_letters", "upper", "title", "list",
                       "numbers"])
    if kind == "repeat":
        return rng.choice([f"Repeat after me: {text}", f"Say exactly this: {text}"]), text
    if kind == "reverse":
        return f"Reverse the order of these words: {text}", " ".join(reversed(words))
    if kind == "count_words":
        return f"How many words are in this sentence: {text}", f"There are {len(words)} words."
    if kind == "count_letters":
        w = rng.choice(words)
        return f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters."
    if kind == "upper":
        return f"Write this in capital letters: {text}", text.upper()
    if kind == "title":
        return f"Capitalise each word: {text}", " ".join(w.capitalize() for w in words)
    if kind == "list":
        topic = rng.choice(list(_LISTS))
        n = rng.randint(2, 4)
        picked = rng.sample(_LISTS[topic], n) if topic != "days of the week" else _LISTS[topic][:n]
        return (f"List {_COUNT_WORDS[n]} {topic}.",
                "\n".join(f"{i}. {x}" for i, x in enumerate(picked, 1)))
    lo = rng.randint(1, 20)
    hi = lo + rng.randint(2, 6)
    return f"List the numbers from {lo} to {hi}.", ", ".join(str(i) for i in range(lo, hi + 1))


# ----------------------------------------------------------------------------------- smalltalk
_SMALLTALK = [
    (["Hi", "Hello", "Hello!", "Hi there", "Hey", "Good morning"],
     ["Hello! How can I help you?", "Hi! What can I do for you?"]),
    (["Who are you?", "What are you?", "Introduce yourself."],
     [f"{IDENTITY} I can answer simple questions and do arithmetic."]),
    (["What is your name?", "What's your name?"], ["My name is Spud."]),
    (["Thanks!", "Thank you", "Thanks a lot"], ["You're welcome!", "Glad I could help."]),
    (["Bye", "Goodbye", "See you"], ["Goodbye!", "Bye! Have a nice day."]),
    (["How are you?"], ["I'm doing well, thank you. How can I help?"]),
    (["Are you a human?"], [f"No. {IDENTITY}"]),
]


def _smalltalk(rng: random.Random) -> tuple[str, str]:
    asks, replies = rng.choice(_SMALLTALK)
    return rng.choice(asks), rng.choice(replies)


_KINDS = [(_single, 12), (_multi, 2), (_word_problem, 1), (_instruction, 4), (_smalltalk, 1)]


def _turn(rng: random.Random) -> tuple[str, str]:
    make = rng.choices([k for k, _ in _KINDS], weights=[w for _, w in _KINDS])[0]
    return make(rng)


def conversations(n: int, seed: int) -> list[list[dict]]:
    """n conversations in OpenAI messages format; the same (n, seed) gives the same list."""
    rng = random.Random(f"spud-builtin-chat/{seed}")
    out = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.15:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(1 if rng.random() < 0.75 else rng.randint(2, 3)):  # some multi-turn
            q, a = _turn(rng)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append(msgs)
    return out


def eval_questions(n: int, seed: int) -> list[tuple[int, str, int, int, str]]:
    """n single-operation questions (a, op, b, c, question text), deterministic; every sum and
    difference is a fact the built-in training data never contains (see `held_out`)."""
    rng = random.Random(f"spud-builtin-chat-eval/{seed}")
    out = []
    while len(out) < n:
        op = rng.choice("+-*/")  # the four operations equally often, as in training
        while True:
            a, op, b, c = operation(rng, op)
            if op in "*/" or held_out(a, op, b):
                break
        out.append((a, op, b, c, question(rng, a, op, b)))
    return out
