"""Prompts with checkable answers for `spud rl`: built-in generators and user JSONL files.

Built-in tasks need no network and keep train and held-out problems disjoint by construction in
both operands and wording, using the same hash partitions as the chat data and the demo's eval
(spud.data.facts, spud.data.templates): a model that only learned the training wordings, or only
memorised training facts, gets no credit on the held-out split.

- `arithmetic`: multi-step word problems ("3 boxes of 12 eggs and 7 loose eggs") and 2-digit
  sums/differences, in training wordings with training facts; held out: the demo's `multi_step`
  split (eval-only story wordings, each with a held-out fact).
- `program`: "what does this short Python program print" for small straight-line programs, loops
  and branches; program shapes, question wordings and operand tuples are each partitioned by hash.
  The reference output is what the program really prints (run at generation time; the generator's
  own programs are trusted code, never the model's).

A user task is a JSONL file, one problem per line:
  {"prompt": "...", "verifier": "numeric", "reference": "42"}
  {"messages": [{"role": "user", "content": "..."}], "verifier": "code", "reference": "", "tests": "assert f(1) == 2"}
with an optional "split": "train" | "heldout" (default train). Bad lines are skipped and counted
with file:line; a file with no usable line is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from spud.data import templates
from spud.data.facts import any_held_out, canonical, fact_held_out
from spud.errors import SpudError
from spud.posttrain.verifiers import KINDS

BUILTIN = ("arithmetic", "program")


@dataclass
class Problem:
    messages: list[dict]
    verifier: str
    reference: str
    tests: str | None = None
    key: str = ""          # wording id + operands: what makes two problems the same problem
    facts: tuple = field(default_factory=tuple)
    program: str | None = None  # for "what does it print" problems: the program itself


# --------------------------------------------------------------------------------- arithmetic
def _arith_train(rng: random.Random) -> Problem | None:
    if rng.random() < 0.6:
        s = templates.story(rng, held_out=False, words=0.1, distract=0.2)
        if any_held_out(s.facts):
            return None
        return Problem([{"role": "user", "content": s.question}], "numeric", str(s.answer),
                       key=f"{s.template}|{sorted(s.facts)}", facts=tuple(sorted(s.facts)))
    op = rng.choice("+-")
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
    if fact_held_out(op, a, b):
        return None
    tid, q = templates.ask(rng, op, a, b, held_out=False, words=0.1, distract=0.2)
    c = a + b if op == "+" else a - b
    return Problem([{"role": "user", "content": q}], "numeric", str(c), key=f"{tid}|{op}{a},{b}",
                   facts=(canonical(op, a, b),))


def _arith_heldout(n: int, seed: int) -> list[Problem]:
    from spud.posttrain.chat_eval import eval_items  # noqa: PLC0415 - the demo's own split

    return [Problem([{"role": "user", "content": it.question}], "numeric", str(it.answer),
                    key=f"{it.template}|{it.facts}", facts=it.facts)
            for it in eval_items("multi_step", n, seed)]


# ------------------------------------------------------------------------------------ program
# (id, source template): straight-line code, loops and branches a reader can trace.
PROGRAMS: list[tuple[str, str]] = [
    ("p01", "x = {a}\ny = x + {b}\nprint(y)"),
    ("p02", "x = {a}\ny = x - {b}\nprint(y)"),
    ("p03", "x = {a}\nx = x * 2\nprint(x + {b})"),
    ("p04", "total = 0\nfor i in range({n}):\n    total += {a}\nprint(total)"),
    ("p05", "a = {a}\nb = {b}\nif a > b:\n    print(a - b)\nelse:\n    print(b - a)"),
    ("p06", "nums = [{a}, {b}, {n}]\nprint(sum(nums))"),
    ("p07", "nums = [{a}, {b}, {n}]\nprint(max(nums))"),
    ("p08", "x = {a}\nfor _ in range({n}):\n    x = x + 1\nprint(x)"),
    ("p09", "count = 0\nfor i in range({a}):\n    if i % 2 == 0:\n        count += 1\nprint(count)"),
    ("p10", "s = 0\nfor i in range(1, {n} + 1):\n    s += i\nprint(s)"),
    ("p11", "a, b = {a}, {b}\na, b = b, a\nprint(a)"),
    ("p12", "x = {a}\nif x % 2 == 0:\n    print(x // 2)\nelse:\n    print(x * 3 + 1)"),
    ("p13", "words = ['{w1}', '{w2}']\nprint(len(words[0]) + len(words[1]))"),
    ("p14", "x = {a}\ny = {b}\nprint(x * 2 + y)"),
    ("p15", "values = [{a}, {b}]\nvalues.append({n})\nprint(len(values) + values[-1])"),
    ("p16", "n = {n}\nresult = 1\nwhile n > 0:\n    result += n\n    n -= 1\nprint(result)"),
]
QUESTIONS: list[tuple[str, str]] = [
    ("q01", "What does this Python program print?\n\n{code}"),
    ("q02", "What is the output of the following code?\n\n{code}"),
    ("q03", "Run this program in your head. What does it print?\n\n{code}"),
    ("q04", "{code}\n\nWhat gets printed?"),
    ("q05", "Here is some Python:\n\n{code}\n\nWhat will it output?"),
    ("q06", "Tell me what this code prints.\n\n{code}"),
    ("q07", "If I run this, what appears on the screen?\n\n{code}"),
    ("q08", "{code}\n\nWhat is printed when this runs?"),
]
WORDS = ["cat", "river", "lamp", "orange", "sky", "pen", "garden", "stone", "book", "wind"]


def _bucket(key: str, shards: int) -> bool:
    return hashlib.sha256(key.encode()).digest()[0] % shards == 0


def _program_problem(rng: random.Random, held_out: bool) -> Problem | None:
    pid, src = rng.choice(templates.split(PROGRAMS, "rl-program", held_out))
    qid, question = rng.choice(templates.split(QUESTIONS, "rl-question", held_out))
    vals = {"a": rng.randint(2, 30), "b": rng.randint(2, 30), "n": rng.randint(2, 9),
            "w1": rng.choice(WORDS), "w2": rng.choice(WORDS)}
    code = src.format(**vals)
    operands = f"{pid}|{vals['a']},{vals['b']},{vals['n']},{vals['w1']},{vals['w2']}"
    if _bucket("spud-rl-operands/" + operands, 4) != held_out:
        return None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<rl-program>", "exec"), {})  # noqa: S102 - our own generated code
    return Problem([{"role": "user", "content": question.format(code=code)}], "output",
                   out.getvalue().strip(), key=f"{qid}|{operands}", program=code)


# ----------------------------------------------------------------------------------- loading
def _draw(make, n: int, seed: str) -> list[Problem]:
    rng = random.Random(seed)
    out, seen, tries = [], set(), 0
    while len(out) < n and tries < n * 200:
        tries += 1
        p = make(rng)
        if p is None or p.key in seen:
            continue
        seen.add(p.key)
        out.append(p)
    return out


def builtin_problems(name: str, split: str, n: int, seed: int) -> list[Problem]:
    if name == "arithmetic":
        if split == "heldout":
            return _arith_heldout(n, seed)
        return _draw(_arith_train, n, f"spud-rl/arithmetic/{seed}")
    if name == "program":
        return _draw(lambda r: _program_problem(r, split == "heldout"), n, f"spud-rl/program/{split}/{seed}")
    raise SpudError(f"unknown built-in RL task {name!r}; built-in tasks: {', '.join(BUILTIN)} "
                    "(or a .jsonl file of problems)")


def load_problem_file(path: str | Path, max_bad_fraction: float = 0.05) -> tuple[dict[str, list[Problem]], dict]:
    """→ ({"train": [...], "heldout": [...]}, summary with skipped lines as file:line: reason)."""
    path = Path(path)
    if not path.is_file():
        raise SpudError(f"RL task file not found: {path}")
    out: dict[str, list[Problem]] = {"train": [], "heldout": []}
    skipped, lines = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                skipped.append(f"{path}:{lineno}: blank line")
                continue
            lines += 1
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                if "messages" in rec:
                    msgs = rec["messages"]
                    if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)):
                        raise ValueError("'messages' must be a list of {role, content} objects")
                elif isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
                    msgs = [{"role": "user", "content": rec["prompt"]}]
                else:
                    raise ValueError("needs a non-empty 'prompt' string or a 'messages' list")
                kind = rec.get("verifier", "numeric")
                if kind not in KINDS:
                    raise ValueError(f"unknown verifier {kind!r} (one of {', '.join(KINDS)})")
                if "reference" not in rec:
                    raise ValueError("missing 'reference'")
                split = rec.get("split", "train")
                if split not in out:
                    raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
                tests = rec.get("tests")
                if kind == "code" and not isinstance(tests, str):
                    raise ValueError("a 'code' problem needs a 'tests' string")
                out[split].append(Problem(msgs, kind, str(rec["reference"]), tests, key=f"{path.name}:{lineno}"))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                skipped.append(f"{path}:{lineno}: {e}")
    bad = sum(1 for s in skipped if not s.endswith("blank line"))
    if not out["train"] and not out["heldout"]:
        raise SpudError(f"{path}: no usable problem in {lines} lines; first problems: {skipped[:3]}")
    if lines and bad / lines > max_bad_fraction:
        raise SpudError(f"{path}: {bad} of {lines} lines are bad (limit {max_bad_fraction:.0%}); "
                        f"first: {skipped[:3]}")
    return out, {"file": str(path), "train": len(out["train"]), "heldout": len(out["heldout"]),
                 "skipped": skipped}


def load_tasks(tasks: list[str], n_train: int, n_heldout: int, seed: int) -> tuple[list[Problem], list[Problem], list[dict]]:
    """→ (train problems, held-out problems, per-task summaries). Train problems that also appear
    in the held-out set (same prompt text) are dropped: held out means held out."""
    if not tasks:
        raise SpudError("no RL tasks given (e.g. --tasks arithmetic or --tasks problems.jsonl)")
    train, heldout, summaries = [], [], []
    for t in tasks:
        if t in BUILTIN:
            tr = builtin_problems(t, "train", n_train, seed)
            ho = builtin_problems(t, "heldout", n_heldout, seed)
            summaries.append({"task": t, "train": len(tr), "heldout": len(ho)})
        elif t.endswith(".jsonl"):
            parts, summary = load_problem_file(t)
            tr, ho = parts["train"], parts["heldout"]
            summaries.append({"task": t, **summary})
        else:
            raise SpudError(f"unknown RL task {t!r}: use one of {', '.join(BUILTIN)} or a .jsonl file")
        train += tr
        heldout += ho
    held_prompts = {json.dumps(p.messages) for p in heldout}
    overlap = [p for p in train if json.dumps(p.messages) in held_prompts]
    train = [p for p in train if json.dumps(p.messages) not in held_prompts]
    summaries.append({"train_heldout_overlap_dropped": len(overlap)})
    if not train:
        raise SpudError(f"the RL tasks {', '.join(tasks)} have no training problems")
    return train, heldout, summaries
