"""Prompts with checkable answers for `spud rl`: built-in generators and user JSONL files.

Built-in tasks need no network and keep train and held-out problems disjoint by construction in
both operands and wording, using the same hash partitions as the chat data and the demo's eval
(spud.data.facts, spud.data.templates): a model that only learned the training wordings, or only
memorised training facts, gets no credit on the held-out split.

- `arithmetic`: multi-step word problems ("3 boxes of 12 eggs and 7 loose eggs") and 2-digit
  sums/differences, in training wordings with training facts; held out: the demo's `multi_step`
  split (eval-only story wordings, each with a held-out fact). Training problems come in three
  difficulty levels (`ARITH_LEVELS`), so a run can start where the model already earns reward
  (`rl.difficulty`, `rl.curriculum_steps`; see spud.posttrain.rl_sampling).
- `program`: "what does this short Python program print" for small straight-line programs, loops
  and branches; program shapes, question wordings and operand tuples are each partitioned by hash.
  The reference output is what the program really prints (run at generation time; the generator's
  own programs are trusted code, never the model's).

A user task is a JSONL file, one problem per line:
  {"prompt": "...", "verifier": "numeric", "reference": "42"}
  {"messages": [{"role": "user", "content": "..."}], "verifier": "code", "reference": "", "tests": "assert f(1) == 2"}
with an optional "split": "train" | "heldout" | "dev" (default train) and an optional "level" (an
integer difficulty ≥ 1 for `rl.difficulty`; problems without one are always drawn). Bad lines are
skipped and counted with file:line; a file with no usable line is an error.

Two evaluation splits: `heldout` (the test split, reported) and `dev` (the same distribution, no
question in common with `heldout`), for choosing settings without tuning on the reported numbers.
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
EVAL_SPLITS = ("heldout", "dev")
DEV_SEED_OFFSET = 1_000_003  # dev draws use another seed (and drop any test question)


@dataclass
class Problem:
    messages: list[dict]
    verifier: str
    reference: str
    tests: str | None = None
    key: str = ""          # wording id + operands: what makes two problems the same problem
    facts: tuple = field(default_factory=tuple)
    program: str | None = None  # for "what does it print" problems: the program itself
    level: int | None = None    # difficulty (1 = easiest); None = not graded, drawn at every level
    wording: str = ""           # id of the question's wording (no distractor id); "" in a user's file


# --------------------------------------------------------------------------------- arithmetic
ARITH_LEVELS = {
    1: "one operation: a 2-digit sum or difference (answered with column steps)",
    2: "two-step word problem, numbers in digits, no distractor sentence",
    3: "two-step word problem with numbers in words (25 %) and distractor sentences (50 %)",
}


def _wording(template_id: str) -> str:
    return template_id.split("+", 1)[0]  # "k3+y10": wording k3 with distractor sentence y10


def _arith_train(rng: random.Random) -> Problem | None:
    # Levels in equal shares: the pool is the same whatever rl.difficulty selects from it.
    level = rng.randint(1, 3)
    if level > 1:
        s = templates.story(rng, held_out=False, words=0.25 if level == 3 else 0.0,
                            distract=0.5 if level == 3 else 0.0)
        if any_held_out(s.facts):
            return None
        return Problem([{"role": "user", "content": s.question}], "numeric", str(s.answer),
                       key=f"{s.template}|{sorted(s.facts)}", facts=tuple(sorted(s.facts)), level=level,
                       wording=_wording(s.template))
    op = rng.choice("+-")
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
    if fact_held_out(op, a, b):
        return None
    tid, q = templates.ask(rng, op, a, b, held_out=False, words=0.1, distract=0.2)
    c = a + b if op == "+" else a - b
    return Problem([{"role": "user", "content": q}], "numeric", str(c), key=f"{tid}|{op}{a},{b}",
                   facts=(canonical(op, a, b),), level=1, wording=_wording(tid))


def _arith_heldout(n: int, seed: int, dev: bool = False) -> list[Problem]:
    from spud.posttrain.chat_eval import eval_items  # noqa: PLC0415 - the demo's own split

    items = eval_items("multi_step", n, seed)
    if dev:  # another draw of the same distribution, minus every question of the test split
        test = {it.question for it in items}
        items = [it for it in eval_items("multi_step", 2 * n, seed + DEV_SEED_OFFSET)
                 if it.question not in test][:n]
    return [Problem([{"role": "user", "content": it.question}], "numeric", str(it.answer),
                    key=f"{it.template}|{it.facts}", facts=it.facts, wording=_wording(it.template))
            for it in items]


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
                   out.getvalue().strip(), key=f"{qid}|{operands}", program=code, wording=qid)


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
    """`split`: train, heldout (test) or dev (held out like the test split, disjoint from it)."""
    if name == "arithmetic":
        if split in EVAL_SPLITS:
            return _arith_heldout(n, seed, dev=split == "dev")
        return _draw(_arith_train, n, f"spud-rl/arithmetic/{seed}")
    if name == "program":
        if split == "dev":
            test = {p.messages[0]["content"] for p in builtin_problems(name, "heldout", n, seed)}
            more = _draw(lambda r: _program_problem(r, True), 2 * n, f"spud-rl/program/dev/{seed}")
            return [p for p in more if p.messages[0]["content"] not in test][:n]
        return _draw(lambda r: _program_problem(r, split == "heldout"), n, f"spud-rl/program/{split}/{seed}")
    raise SpudError(f"unknown built-in RL task {name!r}; built-in tasks: {', '.join(BUILTIN)} "
                    "(or a .jsonl file of problems)")


def load_problem_file(path: str | Path, max_bad_fraction: float = 0.05) -> tuple[dict[str, list[Problem]], dict]:
    """→ ({"train": [...], "heldout": [...]}, summary with skipped lines as file:line: reason)."""
    path = Path(path)
    if not path.is_file():
        raise SpudError(f"RL task file not found: {path}")
    out: dict[str, list[Problem]] = {"train": [], "heldout": [], "dev": []}
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
                    raise ValueError(f"split must be 'train', 'heldout' or 'dev', not {split!r}")
                level = rec.get("level")
                if level is not None and (not isinstance(level, int) or isinstance(level, bool) or level < 1):
                    raise ValueError(f"'level' must be an integer >= 1, not {level!r}")
                tests = rec.get("tests")
                if kind == "code" and not isinstance(tests, str):
                    raise ValueError("a 'code' problem needs a 'tests' string")
                out[split].append(Problem(msgs, kind, str(rec["reference"]), tests, key=f"{path.name}:{lineno}",
                                         level=level))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                skipped.append(f"{path}:{lineno}: {e}")
    bad = sum(1 for s in skipped if not s.endswith("blank line"))
    if not any(out.values()):
        raise SpudError(f"{path}: no usable problem in {lines} lines; first problems: {skipped[:3]}")
    if lines and bad / lines > max_bad_fraction:
        raise SpudError(f"{path}: {bad} of {lines} lines are bad (limit {max_bad_fraction:.0%}); "
                        f"first: {skipped[:3]}")
    return out, {"file": str(path), **{k: len(v) for k, v in out.items()}, "skipped": skipped}


def load_tasks(tasks: list[str], n_train: int, n_heldout: int, seed: int,
               eval_split: str = "heldout") -> tuple[list[Problem], list[Problem], list[dict]]:
    """→ (train problems, evaluation problems of `eval_split` — heldout (test) or dev —, per-task
    summaries). Train problems that also appear in the held-out or dev set (same prompt text) are
    dropped: held out means held out."""
    if not tasks:
        raise SpudError("no RL tasks given (e.g. --tasks arithmetic or --tasks problems.jsonl)")
    if eval_split not in EVAL_SPLITS:
        raise SpudError(f"unknown evaluation split {eval_split!r}: use one of {', '.join(EVAL_SPLITS)}")
    train, evals, held_prompts, summaries = [], [], set(), []
    for t in tasks:
        if t in BUILTIN:
            parts = {s: builtin_problems(t, s, n_train if s == "train" else n_heldout, seed)
                     for s in ("train", *EVAL_SPLITS)}
            summaries.append({"task": t, **{s: len(v) for s, v in parts.items()}})
        elif t.endswith(".jsonl"):
            parts, summary = load_problem_file(t)
            summaries.append({"task": t, **summary})
        else:
            raise SpudError(f"unknown RL task {t!r}: use one of {', '.join(BUILTIN)} or a .jsonl file")
        train += parts["train"]
        evals += parts[eval_split]
        held_prompts |= {json.dumps(p.messages) for s in EVAL_SPLITS for p in parts[s]}
    overlap = [p for p in train if json.dumps(p.messages) in held_prompts]
    train = [p for p in train if json.dumps(p.messages) not in held_prompts]
    summaries.append({"train_heldout_overlap_dropped": len(overlap)})
    if not train:
        raise SpudError(f"the RL tasks {', '.join(tasks)} have no training problems")
    return train, evals, summaries
