"""A short exact-match eval on held-out single-operation arithmetic, for the base model (plain
text prompt "a + b =", the pretraining format) and the chat model (one user turn in the chat
template). The questions come from `builtin_chat.eval_questions`: facts the built-in chat data
never contains, so the chat model's score is not memorisation of its SFT data."""

from __future__ import annotations

import re

import torch

from spud.posttrain import builtin_chat
from spud.serve.sampling import generate

_NUMBER = re.compile(r"-?\d+")


def chat_answer(text: str) -> int | None:
    """The number after the last '=' (answers read "a + b = c."), else the last number."""
    tail = text.rsplit("=", 1)[-1]
    found = _NUMBER.findall(tail) or _NUMBER.findall(text)
    return int(found[-1]) if found else None


def plain_answer(text: str) -> int | None:
    """The first number of the continuation's first line (the base model continues "a + b =")."""
    found = _NUMBER.findall(text.split("\n", 1)[0])
    return int(found[0]) if found else None


@torch.no_grad()
def arithmetic_accuracy(model, tok, n: int = 200, seed: int = 0, chat: bool = True,
                        examples: int = 3) -> dict:
    """Greedy decoding; → {"accuracy", "n", "examples": [(question, output, correct)]}."""
    correct, shown = 0, []
    stop = [tok.end_id, tok.bos_id] if chat else [tok.bos_id, tok.eos_id]
    for a, op, b, c, q in builtin_chat.eval_questions(n, seed):
        if chat:
            ids, _ = tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        else:
            q = f"{a} {op} {b} ="
            ids = tok.encode(q, add_bos=True)
        out = []
        # chat answers to sums carry column steps (~30 tokens); the plain continuation is a number
        for t in generate(model, ids, 48 if chat else 16, temperature=0.0, stop_ids=stop):
            out.append(t)
            if not chat and "\n" in tok.decode(out):
                break
        text = tok.decode(out)
        got = chat_answer(text) if chat else plain_answer(text)
        ok = got == c
        correct += ok
        if len(shown) < examples:
            shown.append((q, text.strip(), ok))
    return {"accuracy": correct / n, "n": n, "examples": shown}
