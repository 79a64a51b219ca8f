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

The tool-use split (`tool_items`, `tool_accuracy`; chat model only) offers the calculator of
spud.posttrain.builtin_tools with one-operation questions in eval-only wordings on held-out
operand pairs (up to 4-digit sums and differences, 2-digit products and quotients). The model's
first answer is read by the server's tool-call parser (spud.serve.structured.ToolCallParser);
each call is run by the calculator and its result sent back as a tool turn, and the answer
after it is read as above. Reported: the share of well-formed calculator calls, of calls whose
result is the answer, and of correct final answers (with or without a call). With the tool
offered, non-arithmetic requests should get no call: `direct_prompts` measures that.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from spud.data import templates
from spud.data.facts import any_held_out, canonical, fact_held_out
from spud.posttrain import builtin_tools
from spud.posttrain.builtin_chat import answer, non_arithmetic_turn, operation
from spud.tokenizer import TOOL_CALL_OPEN

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
    """→ {split: {"accuracy", "n", "correct", "tool_calls" (answers that wrote a tool call, though
    none is offered), "examples": [(question, output, correct)]}}."""
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
        r = res.setdefault(it.split, {"correct": 0, "n": 0, "examples": [], "tool_calls": 0})
        r["tool_calls"] += TOOL_CALL_OPEN in text  # no tools are offered here: a call is a mistake
        ok = final_number(text.split("\n", 1)[0] if not chat else text) == it.answer
        r["correct"] += ok
        r["n"] += 1
        if len(r["examples"]) < examples:
            r["examples"].append((it.question, text.strip(), ok))
    for r in res.values():
        r["accuracy"] = r["correct"] / r["n"]
    return res


# ------------------------------------------------------------------------------------- tool use
TOOL_SPLIT = "tool_use"
TOOL_MAX_TOKENS = (64, 48)  # the turn with the call (or a direct answer), the answer after the result


def tool_items(n: int, seed: int = 0) -> list[Item]:
    """n distinct calculator questions: eval-only wordings, held-out operand pairs."""
    rng = random.Random(f"spud-chat-eval/{TOOL_SPLIT}/{seed}")
    out, seen = [], set()
    while len(out) < n:
        tid, q, expr, value, (op, a, b) = builtin_tools.request(rng, held_out=True)
        if fact_held_out(op, a, b) and q not in seen:
            seen.add(q)
            out.append(Item(TOOL_SPLIT, q, value, (canonical(op, a, b),), tid, f"{expr} = {value}."))
    return out


def direct_prompts(n: int, seed: int = 0) -> list[str]:
    """n requests that need no calculator (instructions, small talk; the chat data's kinds)."""
    rng = random.Random(f"spud-chat-eval/direct/{seed}")
    return [non_arithmetic_turn(rng)[0] for _ in range(n)]


def tool_accuracy(model, tok, items: list[Item], direct: list[str] = (), examples: int = 2) -> dict:
    """The calculator offered on every prompt. → {"n", "called", "call_right", "after_call",
    "accuracy" (shares of the items), "direct": {"n", "no_call"}, "examples": [(question,
    transcript, correct)]}. A call counts as well-formed when the server's parser reads it as a
    calculator call with a string "expression"; `after_call` counts items with such a call and a
    correct answer after the tool's result; `accuracy` any correct final answer."""
    from spud.serve.structured import ToolCallParser

    tools, names = [builtin_tools.CALCULATOR], {builtin_tools.CALCULATOR["name"]}
    limit = model.cfg.max_seq_len - 8

    def prompt(messages: list[dict]) -> list[int]:
        return tok.render_chat(messages, add_generation_prompt=True, tools=tools)[0][-limit:]

    asks = [[{"role": "user", "content": q}] for q in [it.question for it in items] + list(direct)]
    firsts = _generate(model, tok, [prompt(m) for m in asks], [TOOL_MAX_TOKENS[0]] * len(asks), [])
    parsed = [ToolCallParser(names).parse(text) for text in firsts]
    # the round trip: every call is answered by the calculator, then the model answers
    follow = {}
    for k, (content, calls) in enumerate(parsed[:len(items)]):
        if calls:
            follow[k] = [*asks[k], {"role": "assistant", "content": content, "tool_calls": calls},
                         *[{"role": "tool", "tool_call_id": c["id"], "content": builtin_tools.run_tool_call(c)}
                           for c in calls]]
    finals = dict(zip(follow, _generate(model, tok, [prompt(m) for m in follow.values()],
                                        [TOOL_MAX_TOKENS[1]] * len(follow), [])))
    res = {"n": len(items), "called": 0, "call_right": 0, "after_call": 0, "accuracy": 0, "examples": []}
    for k, it in enumerate(items):
        content, calls = parsed[k]
        well_formed = bool(calls) and all(_expression_of(c) is not None for c in calls)
        if calls:
            final, more = ToolCallParser(names).parse(finals[k])
            ok = not more and final is not None and final_number(final) == it.answer
            results = [m["content"] for m in follow[k] if m["role"] == "tool"]
            res["call_right"] += well_formed and results[-1] == str(it.answer)
            transcript = f"{_calls_text(calls)} → {' | '.join(results)} → {finals[k].strip()}"
        else:
            ok = final_number(content or "") == it.answer
            transcript = (content or "").strip()
        res["called"] += well_formed
        res["after_call"] += well_formed and ok
        res["accuracy"] += ok
        if len(res["examples"]) < examples:
            res["examples"].append((it.question, transcript, ok))
    for key in ("called", "call_right", "after_call", "accuracy"):
        res[key] = res[key] / max(1, len(items))
    no_call = sum(not calls for _, calls in parsed[len(items):])
    res["direct"] = {"n": len(direct), "no_call": no_call / max(1, len(direct))}
    return res


def _expression_of(call: dict) -> str | None:
    args = json.loads(call["function"]["arguments"])  # the parser wrote it with json.dumps
    expr = args.get("expression")
    return expr if isinstance(expr, str) else None


def _calls_text(calls: list[dict]) -> str:
    return " ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)
