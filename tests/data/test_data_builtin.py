"""Built-in sources: deterministic per seed, correct arithmetic, stdlib read without importing."""

from __future__ import annotations

import itertools
import re
import sys

import pytest
from data_helpers import read_source

from spud.data.builtin import (
    docstring_documents,
    generated_documents,
    stdlib_files,
    stdlib_root,
)

# A chain like "8 + 5 + 1 = 14" or "1296 / 27 = 48" (the leftmost number starts the chain).
EQUATION = re.compile(r"(?<![\d.])((?:\d+ [-+*/] )+\d+) = (\d+)")
QA = re.compile(r"Q: (\d+) ([-+*/]) (\d+)\nA: (\d+)")
WORDS = re.compile(r"(\d+) (plus|minus|times|divided by) (\d+) equals (\d+)")


def _first(name: str, seed: int, n: int = 40) -> list[str]:
    return list(itertools.islice(generated_documents(name, seed), n))


@pytest.mark.parametrize("name", ["arithmetic", "reasoning"])
def test_generators_are_deterministic_per_seed(name):
    assert _first(name, 7) == _first(name, 7)
    assert _first(name, 7) != _first(name, 8)


@pytest.mark.parametrize("name", ["arithmetic", "reasoning"])
def test_source_seed_combines_config_seed_and_name(name):
    src = {"name": "s", "type": "builtin", "builtin": name, "max_documents": 5}
    same, _ = read_source(src, seed=1)
    assert read_source(src, seed=1)[0] == same
    assert read_source(src, seed=2)[0] != same
    assert read_source({**src, "name": "other"}, seed=1)[0] != same


@pytest.mark.parametrize("name", ["arithmetic", "reasoning"])
def test_documents_are_paragraphs_of_several_examples(name):
    docs = _first(name, 0, 50)
    assert all(d.count("\n") >= 4 for d in docs)
    assert sum(map(len, docs)) / len(docs) > 400
    assert len(set(docs)) == len(docs)


def test_every_worked_answer_is_correct():
    text = "\n".join(_first("arithmetic", 3, 300) + _first("reasoning", 3, 300))
    checked = 0
    for expr, answer in EQUATION.findall(text):
        assert eval(expr) == int(answer), expr  # only digits and + - * /
        checked += 1
    for a, op, b, c in QA.findall(text):
        assert eval(f"{a} {op} {b}") == int(c)
        checked += 1
    ops = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}
    for a, op, b, c in WORDS.findall(text):
        assert eval(f"{a} {ops[op]} {b}") == int(c)
        checked += 1
    assert checked > 2000
    numbers = [int(n) for n in re.findall(r"\d+", "\n".join(_first("arithmetic", 3, 300)))]
    assert min(numbers) >= 0


def test_arithmetic_has_all_formats():
    text = "\n".join(_first("arithmetic", 0, 200))
    for needle in ("What is ", "Q: ", "Compute (", "column by column", "Multiplication table",
                   " equals ", " / "):
        assert needle in text


def test_reasoning_has_all_kinds():
    text = "\n".join(_first("reasoning", 0, 200))
    for needle in ("How many", "Which is larger", "appear in", "What comes next", "If today is",
                   "All ", "If "):
        assert needle in text


def test_stdlib_files_skip_tests_and_third_party():
    files = stdlib_files()
    rel = [f.relative_to(stdlib_root()).as_posix() for f in files]
    assert rel == sorted(rel) and "json/decoder.py" in rel
    dirs = {part for r in rel for part in r.split("/")[:-1]}
    assert not dirs & {"test", "tests", "idlelib", "site-packages"}
    assert "unittest" in dirs


def test_stdlib_is_read_without_importing():
    sys.modules.pop("antigravity", None)  # importing it would open a web browser
    docs, stats = read_source({"name": "c", "type": "builtin", "builtin": "stdlib_code",
                               "max_documents": 25})
    assert "antigravity.py" in stats.files
    assert "antigravity" not in sys.modules
    assert any("import webbrowser" in d for d in docs)


def test_stdlib_docs_are_docstrings_with_headings():
    docs, _ = read_source({"name": "d", "type": "builtin", "builtin": "stdlib_docs",
                           "max_documents": 5})
    assert len(docs) == 5
    assert any("\ndef " in d or d.startswith("def ") for d in docs)
    assert not any("    return " in d for d in docs)  # no code bodies


def test_docstring_documents_structure():
    source = '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self, x=1):\n' \
             '        """Method doc."""\n        return x\ndef g():\n    pass\n'
    source += 'def h(y):\n    """Function doc."""\n'
    docs = docstring_documents(source, "pkg.mod")
    assert docs == ["Module pkg.mod\n\nModule doc.",
                    "class pkg.mod.A\n\nClass doc.\n\n\ndef pkg.mod.A.f(self, x=1)\n\nMethod doc.",
                    "def pkg.mod.h(y)\n\nFunction doc."]
    assert docstring_documents("def broken(:\n", "m") is None
    assert docstring_documents("x = 1\n", "m") == []
