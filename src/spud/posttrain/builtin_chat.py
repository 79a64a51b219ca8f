"""Built-in chat data, generated offline and deterministically: `--data builtin`.

- arithmetic requests in dozens of training wordings (spud.data.templates: "Could you add 31 and
  88 for me?", "Subtract 12 from 40.", numbers sometimes in words, sometimes after an irrelevant
  sentence), answered with column steps and the equation ("... So 31 + 88 = 119.");
- multi-step word problems ("boxes of eggs plus loose eggs", change from a purchase, three days of
  reading) in the training wordings, worked one equation per step, and bracketed expressions;
- simple instructions: repeat, reverse word order, count words or letters, capitalise, list;
- greetings, thanks and identity turns ("I am Spud, a small language model ...");
- with `records(..., tool_share)`: conversations that offer a calculator tool and call it
  (spud.posttrain.builtin_tools), in the OpenAI fine-tuning format.

Numbers stay in a range a ~1M-parameter model can learn in minutes of CPU SFT: sums and
differences of 1-3 digit numbers, the 12×12 table and its divisions. Held out by construction
(spud.data.facts): no conversation states an eval-only fact (every text is read back with
`extract_facts` and redrawn if it does) or uses an eval-only wording. The eval sets built on those
(spud.posttrain.chat_eval) are then checked against this data by spud.eval.decontam.
"""

from __future__ import annotations

import random

from spud.data import templates
from spud.data.facts import any_held_out, extract_facts
from spud.posttrain.builtin_tools import tool_records

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
_COLUMNS = ["Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands"]


# ----------------------------------------------------------------------------------- arithmetic
def operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def operation(rng: random.Random, op: str | None = None, digits: int | None = None) -> tuple[int, str, int, int]:
    """One operation in the chat data's range: + and - on 1-3 digit numbers (mostly two digits;
    non-negative results), * within the 12×12 table, exact / with divisor and quotient up to 12.
    `digits` fixes the size of both operands of + and - (the eval's 3- and 5-digit splits)."""
    op = op or rng.choice("+-*/")
    if op in "+-":
        def size() -> int:
            return digits or rng.choices([1, 2, 3], weights=[15, 60, 25])[0]
        a, b = operand(rng, size()), operand(rng, size())
        if op == "-":
            a, b = max(a, b), min(a, b)
        return a, op, b, a + b if op == "+" else a - b
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return a, op, b, a * b
    b, q = rng.randint(1, 12), rng.randint(0, 12)
    return b * q, op, b, q


def answer(a: int, op: str, b: int, c: int) -> str:
    """Sums and differences with a multi-digit operand get column steps (ones, tens, hundreds ...
    with the carry or borrow), the format of the pretraining mix's column additions: a tiny model
    gets multi-digit sums right far more often when each digit is its own small step, and the
    steps extend to any length. The result comes last."""
    if op not in "+-" or max(a, b) < 10:
        return f"{a} {op} {b} = {c}."
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db))
    steps, carry = [], 0
    for i in range(width):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        col = _COLUMNS[i]
        if op == "+":
            s = x + y + carry
            steps.append(f"{col}: {x} + {y}{' + 1' if carry else ''} = {s}.")
            carry = s // 10
        else:
            have = x - carry
            if have < y:
                steps.append(f"{col}: {have + 10} - {y} = {have + 10 - y}, borrow 1.")
                carry = 1
            else:
                steps.append(f"{col}: {x}{' - 1' if carry else ''} - {y} = {have - y}.")
                carry = 0
    return f"{' '.join(steps)} So {a} {op} {b} = {c}."


def _single(rng: random.Random) -> tuple[str, str]:
    a, op, b, c = operation(rng)
    _, q = templates.ask(rng, op, a, b, held_out=False, words=0.15, distract=0.15)
    return q, answer(a, op, b, c)


def _expression(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 9)
    op1, op2 = rng.choice("+-"), rng.choice("+*")
    if op1 == "-":
        a, b = max(a, b), min(a, b)
    d = a + b if op1 == "+" else a - b
    e = d + c if op2 == "+" else d * c
    q = rng.choice([f"What is ({a} {op1} {b}) {op2} {c}?", f"Compute ({a} {op1} {b}) {op2} {c}.",
                    f"Work out ({a} {op1} {b}) {op2} {c}, step by step."])
    return q, f"First {a} {op1} {b} = {d}. Then {d} {op2} {c} = {e}. The answer is {e}."


def _story(rng: random.Random) -> tuple[str, str]:
    s = templates.story(rng, held_out=False, words=0.1, distract=0.25)
    return s.question, s.worked()


# --------------------------------------------------------------------------------- instructions
def _instruction(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(2, 5))
    text = " ".join(words)
    kind = rng.choice(["repeat", "reverse", "count_words", "count_letters", "upper", "title", "list",
                       "numbers"])
    if kind == "repeat":
        return rng.choice([f"Repeat after me: {text}", f"Say exactly this: {text}",
                           f"Please echo: {text}", f"Copy these words: {text}"]), text
    if kind == "reverse":
        return rng.choice([f"Reverse the order of these words: {text}",
                           f"Write these words backwards, last word first: {text}"]), " ".join(reversed(words))
    if kind == "count_words":
        return rng.choice([f"How many words are in this sentence: {text}",
                           f"Count the words: {text}"]), f"There are {len(words)} words."
    if kind == "count_letters":
        w = rng.choice(words)
        return rng.choice([f"How many letters are in the word {w}?",
                           f"Count the letters in {w}."]), f"The word {w} has {len(w)} letters."
    if kind == "upper":
        return rng.choice([f"Write this in capital letters: {text}", f"Uppercase this: {text}"]), text.upper()
    if kind == "title":
        return rng.choice([f"Capitalise each word: {text}",
                           f"Start every word with a capital: {text}"]), " ".join(w.capitalize() for w in words)
    if kind == "list":
        topic = rng.choice(list(_LISTS))
        n = rng.randint(2, 4)
        picked = rng.sample(_LISTS[topic], n) if topic != "days of the week" else _LISTS[topic][:n]
        return (rng.choice([f"List {_COUNT_WORDS[n]} {topic}.", f"Name {_COUNT_WORDS[n]} {topic}."]),
                "\n".join(f"{i}. {x}" for i, x in enumerate(picked, 1)))
    lo = rng.randint(1, 20)
    hi = lo + rng.randint(2, 6)
    return (rng.choice([f"List the numbers from {lo} to {hi}.", f"Count from {lo} to {hi}."]),
            ", ".join(str(i) for i in range(lo, hi + 1)))


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


def non_arithmetic_turn(rng: random.Random) -> tuple[str, str]:
    """An instruction or small talk: requests that need no calculator."""
    return _instruction(rng) if rng.random() < 0.8 else _smalltalk(rng)


_KINDS = [(_single, 12), (_expression, 1), (_story, 3), (_instruction, 4), (_smalltalk, 1)]


def _turn(rng: random.Random) -> tuple[str, str]:
    make = rng.choices([k for k, _ in _KINDS], weights=[w for _, w in _KINDS])[0]
    while True:  # redraw a turn that states an eval-only fact (about 1 arithmetic turn in 10)
        q, a = make(rng)
        if not any_held_out(extract_facts(q + "\n" + a)):
            return q, a


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


def records(n: int, seed: int, tool_share: float = 0.0) -> list[dict]:
    """What `--data builtin` reads: n records in the OpenAI fine-tuning format ({"messages"} and,
    for tool conversations, "tools"). round(n * tool_share) of them are tool conversations
    (spud.posttrain.builtin_tools), the rest are `conversations(...)`, which are the same for
    every tool_share (a shorter list is a prefix of a longer one)."""
    if not 0 <= tool_share <= 1:
        raise ValueError(f"tool_share must be in [0, 1], got {tool_share}")
    k = round(n * tool_share)
    return [{"messages": m} for m in conversations(n - k, seed)] + tool_records(k, seed)
