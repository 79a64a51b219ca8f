"""Built-in chat data, generated offline and deterministically: `--data builtin`.

- arithmetic questions in several phrasings, answered as "a + b = c." (the equation format of
  the pretraining mix, so SFT only has to teach the chat turn-taking, not new arithmetic);
  multi-step problems get short worked steps;
- simple instructions: repeat, reverse word order, count words or letters, capitalise, list;
- greetings, thanks and identity turns ("I am Spud, a small language model ...").

Numbers are kept in a range a ~1M-parameter model can get right (sums of up to 2-digit numbers,
the 12×12 times table and its divisions), so minutes of SFT on CPU reach high accuracy.
A hash-chosen 1 in 16 of the arithmetic facts is never generated for training: those are the
held-out questions `spud.posttrain.chat_eval` scores, so its accuracy is not memorisation.
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
def operation(rng: random.Random) -> tuple[int, str, int, int]:
    """One operation in the chat data's range: + and - on 1-2 digit numbers (non-negative
    results), * within the 12×12 table, exact / with divisor and quotient up to 12."""
    op = rng.choice("+-*/")
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
    """True for the facts reserved for evaluation (never in the built-in training data)."""
    return hashlib.sha256(f"{a} {op} {b}".encode()).digest()[0] % 16 == 0


def question(rng: random.Random, a: int, op: str, b: int) -> str:
    word, sym = _OPS[op], op
    return rng.choice([
        f"What is {a} {word} {b}?", f"What's {a} {sym} {b}?", f"Compute {a} {sym} {b}.",
        f"Calculate {a} {word} {b}.", f"{a} {sym} {b} = ?", f"How much is {a} {word} {b}?",
        f"Please work out {a} {sym} {b}.", f"{a} {sym} {b}",
    ])


def answer(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}."


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
    """n held-out single-operation questions (a, op, b, c, question text), deterministic and
    disjoint from every fact the built-in training data uses."""
    rng = random.Random(f"spud-builtin-chat-eval/{seed}")
    out = []
    while len(out) < n:
        a, op, b, c = operation(rng)
        if held_out(a, op, b):
            out.append((a, op, b, c, question(rng, a, op, b)))
    return out
