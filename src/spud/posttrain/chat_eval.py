"""The demo's chat eval: exact match on five held-out splits, for the base model and the chat model.

| split         | questions                                                                   |
|---------------|-----------------------------------------------------------------------------|
| operands      | 2-digit + and −, training wordings, operand pairs no training data contains |
| templates     | 2-digit + and −, eval-only wordings and distractors, held-out operand pairs |
| three_digit   | 3-digit + and −, training wordings, held-out operand pairs                  |
| multi_step    | two-step word problems in eval-only story wordings, with a held-out fact    |
| out_of_range  | 5-digit + and −: longer numbers than any training data has                  |

Every question is held out by construction (spud.data.facts, spud.data.templates) and each
carries its facts so spud.eval.decontam can verify it against the run's real training data.
Both models get the same question text: the chat model as one user turn in the chat template,
the base model as plain text (the pretraining mix writes "question equation" on one line, so the
base model answers by continuing the line). Both answers are read the same way: the number after
the last "=", else the last number. Generation is greedy and batched through the serving engine.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from spud.data import templates
from spud.data.facts import any_held_out, canonical, fact_held_out
from spud.posttrain.builtin_chat import answer, operation

SPLITS = {
    "operands": "2-digit +/-, seen wordings, unseen operands",
    "templates": "2-digit +/-, unseen wordings",
    "three_digit": "3-digit +/-, unseen operands",
    "multi_step": "2-step word problems, unseen wordings",
    "out_of_range": "5-digit +/-, beyond the training range",
}
# longest answers: column steps grow with the digits
MAX_TOKENS = {"operands": 48, "templates": 48, "three_digit": 72, "multi_step": 48, "out_of_range": 120}
_NUMBER = re.compile(r"-?\d+")


@dataclass
class Item:
    split: str
    question: str
    answer: int
    facts: tuple       # canonical (op, a, b) of the question (every step for word problems)
    template: str      # wording id (with "+distractor id" when one was added)
    reference: str     # the worked answer the chat data would give


def _single(rng: random.Random, digits: int, held_out_wording: bool) -> Item | None:
    a, op, b, c = operation(rng, rng.choice("+-"), digits=digits)
    if not fact_held_out(op, a, b):
        return None
    tid, q = templates.ask(rng, op, a, b, held_out=held_out_wording,
                           words=0.15 if held_out_wording else 0.0,
                           distract=0.3 if held_out_wording else 0.0)
    return Item("", q, c, (canonical(op, a, b),), tid, answer(a, op, b, c))


def _multi(rng: random.Random) -> Item | None:
    s = templates.story(rng, held_out=True, words=0.1, distract=0.25)
    if not any_held_out(s.facts):
        return None
    return Item("", s.question, s.answer, tuple(sorted(s.facts)), s.template, s.worked())


def eval_items(split: str, n: int, seed: int = 0) -> list[Item]:
    """n distinct questions of `split`, deterministic in (split, n, seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    rng = random.Random(f"spud-chat-eval/{split}/{seed}")
    make = {"operands": lambda: _single(rng, 2, False), "templates": lambda: _single(rng, 2, True),
            "three_digit": lambda: _single(rng, 3, False), "multi_step": lambda: _multi(rng),
            "out_of_range": lambda: _single(rng, 5, False)}[split]
    out, seen = [], set()
    while len(out) < n:
        item = make()
        if item is None or item.question in seen:
            continue
        seen.add(item.question)
        item.split = split
        out.append(item)
    return out


def final_number(text: str) -> int | None:
    """The number after the last '=' (answers end "... = c." or "The answer is c."), else the
    last number."""
    tail = text.rsplit("=", 1)[-1]
    found = _NUMBER.findall(tail) or _NUMBER.findall(text)
    return int(found[-1]) if found else None


def _generate(model, tok, prompts: list[list[int]], max_tokens: list[int], stop: list[str]) -> list[str]:
    """Greedy completions of many prompts at once through the serving engine (spud.serve.batch)."""
    from spud.serve.batch import complete_many
    from spud.serve.engine import SamplingParams

    params = [SamplingParams(max_tokens=m, temperature=0.0, stop=list(stop)) for m in max_tokens]
    return [c.text for c in complete_many(model, tok, prompts, params, max_batch=32)]


def split_accuracy(model, tok, items: list[Item], chat: bool, examples: int = 2) -> dict:
    """→ {split: {"accuracy", "n", "correct", "examples": [(question, output, correct)]}}."""
    limit = model.cfg.max_seq_len - 8
    prompts = []
    for it in items:
        if chat:
            ids, _ = tok.render_chat([{"role": "user", "content": it.question}], add_generation_prompt=True)
        else:
            ids = tok.encode(it.question, add_bos=True)  # continues " 31 + 88 = 119."
        prompts.append(ids[-limit:])
    outs = _generate(model, tok, prompts, [MAX_TOKENS[it.split] for it in items], [] if chat else ["\n"])
    res: dict = {}
    for it, text in zip(items, outs):
        r = res.setdefault(it.split, {"correct": 0, "n": 0, "examples": []})
        ok = final_number(text.split("\n", 1)[0] if not chat else text) == it.answer
        r["correct"] += ok
        r["n"] += 1
        if len(r["examples"]) < examples:
            r["examples"].append((it.question, text.strip(), ok))
    for r in res.values():
        r["accuracy"] = r["correct"] / r["n"]
    return res
