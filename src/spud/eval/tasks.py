"""Tasks: the task-spec syntax and loaders for the published JSONL shapes of standard benchmarks
(local files first; the Hugging Face hub when online). The example and task types live in
spud.eval.example; the generated built-in tasks in spud.eval.builtin_tasks.

Spec syntax (comma-separated): `arithmetic` (a built-in), `gsm8k:path/test.jsonl` (a local file),
`gsm8k:test.jsonl:train.jsonl` (with a separate few-shot pool; without it, few-shot examples come
from the same file, never the example being scored), or `gsm8k` alone (the hub, needs `datasets`
and network). Paths may not contain ',' or ':'.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from spud.errors import SpudError
from spud.eval import builtin_tasks, math_norm
from spud.eval.example import CODE_STOP, Example, Task

__all__ = ["CODE_STOP", "Example", "FORMATS", "Task", "load_tasks", "parse_specs"]

LETTERS = "ABCDEFGHIJ"


# ------------------------------------------------------------------------------- JSONL reading
def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise SpudError(f"task file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpudError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise SpudError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            rows.append((where, obj))
    if not rows:
        raise SpudError(f"{path}: no records")
    return rows


def _need(obj: dict, key: str, where: str, fmt: str, types=None):
    if key not in obj or obj[key] is None:
        raise SpudError(
            f"{where}: missing field '{key}' (a {fmt} record needs {', '.join(FIELDS[fmt])})"
        )
    if types and not isinstance(obj[key], types):
        raise SpudError(f"{where}: field '{key}' should be {types}, got {type(obj[key]).__name__}")
    return obj[key]


FIELDS = {
    "gsm8k": ["question", "answer ('... #### N')"],
    "math": ["problem", "solution (with \\boxed{})"],
    "arc": ["question (stem+choices, or text with choices{text,label})", "answerKey"],
    "mmlu": ["question", "choices", "answer (index)"],
    "gpqa": ["Question", "Correct Answer", "Incorrect Answer 1-3"],
    "hellaswag": ["ctx", "endings", "label"],
    "humaneval": ["task_id", "prompt", "test", "entry_point"],
    "mbpp": ["text", "test_list"],
}


def _letters_prompt(question: str, options: list[str]) -> str:
    lines = [question.strip()] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def conv_gsm8k(obj: dict, where: str) -> Example:
    q = _need(obj, "question", where, "gsm8k", str)
    a = _need(obj, "answer", where, "gsm8k", str)
    if "####" not in a:
        raise SpudError(f"{where}: field 'answer' has no '#### N' final-answer line")
    demo = re.sub(r"<<[^>]*>>", "", a)  # calculator annotations: tool markup, not reasoning
    return Example(f"Question: {q.strip()}\nAnswer:", math_norm.extract_gsm8k(a) or "",
                   demo=" " + demo.strip(), where=where)


def conv_math(obj: dict, where: str) -> Example:
    p = _need(obj, "problem", where, "math", str)
    s = _need(obj, "solution", where, "math", str)
    gold = obj.get("answer") if isinstance(obj.get("answer"), str) else math_norm.last_boxed(s)
    if gold is None:
        raise SpudError(f"{where}: field 'solution' has no \\boxed{{...}} answer")
    return Example(f"Problem: {p.strip()}\nSolution:", gold, demo=" " + s.strip(), where=where)


def conv_arc(obj: dict, where: str) -> Example:
    q = _need(obj, "question", where, "arc")
    key = str(_need(obj, "answerKey", where, "arc")).strip()
    if isinstance(q, dict):  # original ARC: question{stem, choices[{text,label}]}
        stem = _need(q, "stem", where, "arc", str)
        ch = _need(q, "choices", where, "arc", list)
        texts, labels = [c.get("text", "") for c in ch], [str(c.get("label", "")) for c in ch]
    else:  # Hugging Face flattened: question str, choices{text[], label[]}
        stem = q
        ch = _need(obj, "choices", where, "arc", dict)
        texts, labels = list(ch.get("text", [])), [str(x) for x in ch.get("label", [])]
    if key not in labels or len(texts) != len(labels) or len(texts) < 2:
        raise SpudError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    i = labels.index(key)
    choices = [" " + t for t in texts]
    return Example(f"Question: {stem.strip()}\nAnswer:", choices[i], demo=choices[i],
                   choices=choices, label=i, where=where)


def _mc_letters(question: str, options: list[str], i: int, where: str) -> Example:
    choices = [" " + LETTERS[j] for j in range(len(options))]
    return Example(_letters_prompt(question, options), choices[i], demo=choices[i],
                   choices=choices, label=i, where=where)


def conv_mmlu(obj: dict, where: str) -> Example:
    q = _need(obj, "question", where, "mmlu", str)
    options = _need(obj, "choices", where, "mmlu", list)
    ans = _need(obj, "answer", where, "mmlu")
    i = LETTERS.index(ans) if isinstance(ans, str) and ans in LETTERS else ans
    if not isinstance(i, int) or not 0 <= i < len(options):
        raise SpudError(f"{where}: field 'answer' must index 'choices' (0..{len(options) - 1})")
    return _mc_letters(q, [str(o) for o in options], i, where)


def conv_gpqa(obj: dict, where: str) -> Example:
    q = _need(obj, "Question", where, "gpqa", str)
    right = str(_need(obj, "Correct Answer", where, "gpqa")).strip()
    wrong = [str(_need(obj, f"Incorrect Answer {j}", where, "gpqa")).strip() for j in (1, 2, 3)]
    # Deterministic shuffle keyed by the question: the right answer's letter must not be fixed
    # (always "A" would be gamed), yet must be the same on every run and machine.
    rng = random.Random(hashlib.sha256(q.encode("utf-8")).hexdigest())
    options = [right, *wrong]
    rng.shuffle(options)
    return _mc_letters(q, options, options.index(right), where)


def conv_hellaswag(obj: dict, where: str) -> Example:
    ctx = obj.get("ctx")
    if ctx is None and "ctx_a" in obj:
        ctx = f"{obj['ctx_a']} {str(obj.get('ctx_b', '')).capitalize()}"
    if ctx is None:
        _need(obj, "ctx", where, "hellaswag")
    endings = _need(obj, "endings", where, "hellaswag", list)
    label = int(_need(obj, "label", where, "hellaswag"))
    if not 0 <= label < len(endings):
        raise SpudError(f"{where}: field 'label' must index 'endings' (0..{len(endings) - 1})")

    def clean(t: str) -> str:  # WikiHow markup like "[header]" is scraping residue
        return re.sub(r"\s+", " ", re.sub(r"\[[^\]]*\]", " ", t)).strip()

    act = obj.get("activity_label")
    prompt = (f"{act}: " if act else "") + clean(ctx)
    choices = [" " + clean(e) for e in endings]
    return Example(prompt, choices[label], demo=choices[label], choices=choices, label=label,
                   where=where)


def conv_humaneval(obj: dict, where: str) -> Example:
    _need(obj, "task_id", where, "humaneval")
    prompt = _need(obj, "prompt", where, "humaneval", str)
    test = _need(obj, "test", where, "humaneval", str)
    entry = _need(obj, "entry_point", where, "humaneval", str)
    return Example(prompt, "", demo=obj.get("canonical_solution") or "", test=test,
                   entry_point=entry, where=where)


def conv_mbpp(obj: dict, where: str) -> Example:
    text = _need(obj, "text", where, "mbpp", str) if "text" in obj else _need(obj, "prompt", where, "mbpp", str)
    tests = _need(obj, "test_list", where, "mbpp", list)
    if not tests:
        raise SpudError(f"{where}: field 'test_list' is empty")
    prompt = f'"""\n{text.strip()}\n{tests[0]}\n"""\n'
    setup = obj.get("test_setup_code") or ""
    return Example(prompt, "", demo=(obj.get("code") or "").replace("\r\n", "\n"),
                   test=setup + "\n" + "\n".join(tests), where=where)


# name → (converter, kind, extraction, stop, max_new_tokens, hub (id, config, split))
FORMATS = {
    "gsm8k": (conv_gsm8k, "gen", "gsm8k", ("\n\nQuestion:", "Question:", "\n\n"), 256,
              ("openai/gsm8k", "main", "test")),
    "math": (conv_math, "gen", "math", ("\n\nProblem:", "Problem:"), 384,
             ("HuggingFaceH4/MATH-500", None, "test")),
    "arc": (conv_arc, "mc", "", (), 0, ("allenai/ai2_arc", "ARC-Challenge", "test")),
    "mmlu": (conv_mmlu, "mc", "", (), 0, ("cais/mmlu", "all", "test")),
    "gpqa": (conv_gpqa, "mc", "", (), 0, ("Idavidrein/gpqa", "gpqa_diamond", "train")),
    "hellaswag": (conv_hellaswag, "mc", "", (), 0, ("Rowan/hellaswag", None, "validation")),
    "humaneval": (conv_humaneval, "code", "", CODE_STOP, 384, ("openai/openai_humaneval", None, "test")),
    "mbpp": (conv_mbpp, "code", "", CODE_STOP, 384, ("google-research-datasets/mbpp", "full", "test")),
}


def _hub_records(fmt: str) -> list[tuple[str, dict]]:
    hub_id, config, split = FORMATS[fmt][5]
    hint = (f"supply a local file instead: --tasks {fmt}:PATH.jsonl, with one JSON object per "
            f"line in the published shape of {hub_id} (fields: {', '.join(FIELDS[fmt])})")
    try:
        import datasets  # optional dependency
    except ImportError:
        raise SpudError(f"task {fmt!r} from the Hugging Face hub needs the `datasets` package "
                        f"(pip install datasets) and network; or {hint}") from None
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, gated, renamed: all end the same way for the user
        raise SpudError(f"could not load {hub_id} ({type(e).__name__}: {e}); {hint}") from None
    return [(f"hf:{hub_id}[{i}]", dict(r)) for i, r in enumerate(ds)]


def load_format_task(fmt: str, path: str | None, fewshot_path: str | None, name: str) -> Task:
    conv, kind, answer, stop, max_new, _hub = FORMATS[fmt]
    rows = read_jsonl(Path(path)) if path else _hub_records(fmt)
    examples = [conv(obj, where) for where, obj in rows]
    pool = [conv(obj, where) for where, obj in read_jsonl(Path(fewshot_path))] if fewshot_path else None
    # full-text choices of different lengths: per-byte normalised accuracy is the fair headline
    meta = {"primary": "acc_norm"} if fmt in ("arc", "hellaswag") else {}
    return Task(name, kind, examples, pool, answer=answer or "number", stop=stop,
                max_new_tokens=max_new, separator="\n\n", source=path or f"hf:{_hub[0]}", meta=meta)


# -------------------------------------------------------------------------------------- specs
def parse_specs(spec: str) -> list[tuple[str, str | None, str | None]]:
    """'arithmetic,gsm8k:a.jsonl,arc:t.jsonl:train.jsonl' → [(name, path, fewshot_path), ...]."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) > 3:
            raise SpudError(f"task spec {item!r}: expected NAME, NAME:FILE or NAME:FILE:FEWSHOT_FILE")
        name = parts[0].strip().lower()
        out.append((name, parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else None))
    if not out:
        raise SpudError("no tasks given; e.g. --tasks arithmetic,mc_arithmetic")
    return out


def load_tasks(spec: str, seed: int) -> list[Task]:
    tasks, seen = [], {}
    for name, path, fewshot in parse_specs(spec):
        key = name
        if name in seen:  # the same format twice (two files): keep both results apart
            seen[name] += 1
            key = f"{name}@{Path(path).stem if path else seen[name]}"
        else:
            seen[name] = 1
        if name in builtin_tasks.BUILTIN_TASKS:
            if path:
                raise SpudError(f"{name!r} is a built-in task and takes no file (got {path!r})")
            tasks.append(builtin_tasks.make_task(name, seed))
        elif name in FORMATS:
            tasks.append(load_format_task(name, path, fewshot, key))
        else:
            known = sorted(builtin_tasks.BUILTIN_TASKS) + sorted(FORMATS)
            raise SpudError(f"unknown task {name!r}; known: {', '.join(known)}")
        tasks[-1].name = key
    return tasks
