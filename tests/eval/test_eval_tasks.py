import json

import pytest

from spud.errors import SpudError
from spud.eval.builtin_tasks import make_task
from spud.eval.tasks import load_tasks, parse_specs


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_and_math(tmp_path):
    g = write(tmp_path / "g.jsonl", [{"question": "2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}])
    m = write(tmp_path / "m.jsonl", [{"problem": "Half?", "solution": "It is $\\boxed{\\frac12}$."}])
    gsm, math_ = load_tasks(f"gsm8k:{g},math:{m}", 0)
    ex = gsm.examples[0]
    assert ex.prompt == "Question: 2+3?\nAnswer:" and ex.target == "5" and "<<" not in ex.demo
    assert gsm.is_correct(gsm.extract(" 2 + 3 = 5\n#### 5"), ex.target)
    assert math_.examples[0].target == "\\frac12"
    assert math_.is_correct(math_.extract("so \\boxed{0.5}"), math_.examples[0].target)


def test_multiple_choice_formats(tmp_path):
    arc = write(tmp_path / "arc.jsonl", [
        {"question": {"stem": "Sky?", "choices": [{"text": "blue", "label": "A"},
                                                  {"text": "red", "label": "B"}]}, "answerKey": "A"},
        {"question": "Grass?", "choices": {"text": ["red", "green", "pink"], "label": ["1", "2", "3"]},
         "answerKey": "2"},
    ])
    mmlu = write(tmp_path / "mmlu.jsonl", [{"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": 1}])
    gpqa = write(tmp_path / "gpqa.jsonl", [{"Question": "Q?", "Correct Answer": "right",
                                           "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2",
                                           "Incorrect Answer 3": "w3"}])
    hs = write(tmp_path / "hs.jsonl", [{"ctx": "He opens the door [header] and", "activity_label": "Doors",
                                       "endings": ["walks in.", "eats it.", "flies.", "sings."], "label": "0"}])
    a, m, g, h = load_tasks(f"arc:{arc},mmlu:{mmlu},gpqa:{gpqa},hellaswag:{hs}", 0)
    assert [e.label for e in a.examples] == [0, 1]
    assert a.examples[1].choices == [" red", " green", " pink"]
    assert a.baseline == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m.examples[0].prompt.endswith("D. 4\nAnswer:") and m.examples[0].label == 1
    ge = g.examples[0]
    assert ge.prompt.split("\n")[1 + ge.label].endswith("right")  # shuffled, label follows it
    assert load_tasks(f"gpqa:{gpqa}", 0)[0].examples[0].label == ge.label  # deterministic
    assert h.examples[0].prompt == "Doors: He opens the door and" and h.examples[0].label == 0
    assert a.meta["primary"] == "acc_norm"


def test_humaneval_and_mbpp(tmp_path):
    he = write(tmp_path / "he.jsonl", [{"task_id": "T/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
                                       "test": "def check(c):\n    assert c(1) == 1\n", "entry_point": "f"}])
    mb = write(tmp_path / "mb.jsonl", [{"text": "Return x.", "code": "def f(x):\n    return x",
                                       "test_list": ["assert f(1) == 1"]}])
    h, m = load_tasks(f"humaneval:{he},mbpp:{mb}", 0)
    assert h.kind == "code" and h.examples[0].entry_point == "f"
    assert "assert f(1) == 1" in m.examples[0].prompt and m.examples[0].entry_point is None


def test_malformed_lines_name_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "#### 1"}, {"question": "no answer"}])
    with pytest.raises(SpudError, match=r"bad.jsonl:2: missing field 'answer'"):
        load_tasks(f"gsm8k:{bad}", 0)
    broken = write(tmp_path / "broken.jsonl", ['{"question": "x", "answer": "#### 1"}', "{not json"])
    with pytest.raises(SpudError, match=r"broken.jsonl:2: not valid JSON"):
        load_tasks(f"gsm8k:{broken}", 0)
    mm = write(tmp_path / "mm.jsonl", [{"question": "q", "choices": ["a", "b"]}])
    with pytest.raises(SpudError, match=r"mm.jsonl:1: missing field 'answer'"):
        load_tasks(f"mmlu:{mm}", 0)


def test_spec_errors_and_hub_fallback(tmp_path):
    with pytest.raises(SpudError, match="unknown task 'nope'"):
        load_tasks("nope", 0)
    with pytest.raises(SpudError, match="not found"):
        load_tasks(f"gsm8k:{tmp_path / 'missing.jsonl'}", 0)
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(SpudError, match=r"gsm8k:PATH.jsonl"):
            load_tasks("gsm8k", 0)
    assert parse_specs("arithmetic, gsm8k:a.jsonl:b.jsonl") == [
        ("arithmetic", None, None), ("gsm8k", "a.jsonl", "b.jsonl")]


def test_builtin_tasks_are_deterministic_and_correct():
    for name in ("arithmetic", "word_problems", "mc_arithmetic", "code_simple"):
        a, b = make_task(name, 3), make_task(name, 3)
        assert [e.prompt for e in a.examples] == [e.prompt for e in b.examples]
    assert [e.prompt for e in make_task("arithmetic", 4).examples] != [
        e.prompt for e in make_task("arithmetic", 3).examples]
    for ex in make_task("arithmetic", 0).examples[:50]:
        expr = ex.prompt.split("? ")[-1].rstrip(" =").replace("/", "//")
        assert eval(expr) == int(ex.target)
    mc = make_task("mc_arithmetic", 0)
    assert mc.baseline == 0.25 and all(len(set(e.choices)) == 4 for e in mc.examples)
    wp = make_task("word_problems", 0)
    assert all(wp.is_correct(wp.extract(e.demo), e.target) for e in wp.examples)


def test_builtin_code_solutions_pass_in_the_sandbox():
    from spud.eval.sandbox import check_program, run_program

    task = make_task("code_simple", 0)
    for ex in task.examples[:3]:
        assert run_program(check_program(ex.prompt, ex.demo, ex.test, ex.entry_point)).passed


def test_builtin_tasks_sit_below_task_loading():
    """eval/example.py (types) ← builtin_tasks ← tasks: the generated tasks never import the
    file-format loaders, so the two modules no longer import each other."""
    import ast

    import spud.eval.builtin_tasks as bt
    import spud.eval.example as ex
    from spud.eval import tasks

    def imports(module) -> set[str]:
        tree = ast.parse(open(module.__file__, encoding="utf-8").read())
        out = set()
        for node in ast.walk(tree):  # also imports inside functions
            if isinstance(node, ast.ImportFrom):
                out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        return out

    assert "spud.eval.tasks" not in imports(bt) and "spud.eval.tasks" not in imports(ex)
    assert not {m for m in imports(ex) if m.startswith("spud.eval.builtin")}
    assert "spud.eval.builtin_tasks" in imports(tasks)
    assert tasks.Example is ex.Example and tasks.Task is ex.Task  # the old import path still works


def test_builtin_tasks_ask_only_held_out_facts_and_wordings():
    from spud.data.facts import any_held_out, fact_held_out
    from spud.data.templates import story_templates

    for name in ("arithmetic", "mc_arithmetic"):
        task = make_task(name, 0)
        assert len(task.examples) == 500 and all(len(e.facts) == 1 and fact_held_out(*e.facts[0])
                                                 for e in task.examples)
        assert not any(fact_held_out(*e.facts[0]) for e in task.fewshot_pool)  # the pool: training facts
    wp = make_task("word_problems", 0)
    assert len(wp.examples) == 250 and all(any_held_out(e.facts) for e in wp.examples)
    held = {i for i, _, _ in story_templates(True)}
    used = {e.where.split("(wording ")[1].split("+")[0].rstrip(")") for e in wp.examples}
    assert used == held and all(e.split == "multi_step" for e in wp.examples)
    pool = {e.where.split("(wording ")[1].split("+")[0].rstrip(")") for e in wp.fewshot_pool}
    assert pool and not pool & held
