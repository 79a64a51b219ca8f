import importlib.util
import sys
import threading

import pytest

from spud.errors import SpudError
from spud.eval import math_norm
from spud.eval.math_norm import (
    extract_gsm8k,
    extract_math,
    first_number,
    last_boxed,
    math_equal,
    normalize_math,
)

# Both checkers run on the same cases. math-verify is in the `test` extra, so CI runs both; a
# checkout without it skips only the math-verify half.
HAVE_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None  # without importing SymPy yet
CHECKERS = ["builtin", pytest.param("math-verify", marks=pytest.mark.skipif(
    not HAVE_MATH_VERIFY, reason="math-verify not installed (pip install 'spud[math]')"))]


@pytest.mark.parametrize("checker", CHECKERS)
@pytest.mark.parametrize("pred,gold", [
    ("\\frac12", "0.5"),
    ("\\left(3\\right)", "(3)"),
    ("10\\text{ cm}", "10"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("1/2", "\\frac12"),
    ("10^\\circ", "10"),
    ("10^{\\circ}", "10"),
    ("x = 5", "5"),
    ("5.", "5"),
    ("\\$5", "5"),
    ("1,000", "1000"),
    ("12 inches", "12"),
    ("\\!3", "3"),
    ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("-\\frac{3}{4}", "-0.75"),
])
def test_math_equivalent(pred, gold, checker):
    assert math_equal(pred, gold, checker), (normalize_math(pred), normalize_math(gold))


@pytest.mark.parametrize("checker", CHECKERS)
@pytest.mark.parametrize("pred,gold", [("3", "4"), ("\\frac{1}{3}", "0.33"), ("", "0"), (None, "1"),
                                       ("x + 1", "x + 2"), ("0.5", "\\frac{1}{3}"), ("-3", "3"),
                                       ("\\$5", "6")])
def test_math_not_equivalent(pred, gold, checker):
    assert not math_equal(pred, gold, checker)


# What the symbolic checker adds over the normaliser (the reason to prefer it when installed).
@pytest.mark.parametrize("pred,gold", [
    ("1 + x", "x + 1"),
    ("\\frac{\\sqrt{8}}{2}", "\\sqrt{2}"),
    ("\\{2, 1\\}", "\\{1, 2\\}"),
    ("2\\pi", "\\pi \\cdot 2"),
    ("50\\%", "50"),
])
def test_math_verify_is_symbolic(pred, gold):
    pytest.importorskip("math_verify")
    assert math_equal(pred, gold, "math-verify")
    assert not math_equal(pred, "7", "math-verify")


def test_default_checker_is_math_verify_when_installed_else_builtin(monkeypatch):
    symbolic_only = ("1 + x", "x + 1")
    math_norm._math_verify.cache_clear()
    monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` now fails
    try:
        assert math_norm.math_checker() == "builtin"
        assert not math_equal(*symbolic_only)  # the fallback decided
        assert math_equal("\\frac12", "0.5")
        with pytest.raises(SpudError, match=r"pip install 'spud\[math\]'"):
            math_equal("1", "1", "math-verify")
    finally:
        monkeypatch.undo()
        math_norm._math_verify.cache_clear()
    if math_norm._math_verify() is not None:
        assert math_norm.math_checker() == "math-verify" and math_equal(*symbolic_only)
    with pytest.raises(SpudError, match="unknown answer checker 'sympy'"):
        math_equal("1", "1", "sympy")


def test_math_verify_works_off_the_main_thread():
    """Its SIGALRM timeout only works on the main thread; eval workers and the server are not."""
    pytest.importorskip("math_verify")
    out = []
    t = threading.Thread(target=lambda: out.append(math_equal("\\dfrac{2}{4}", "0.5", "math-verify")))
    t.start()
    t.join()
    assert out == [True]


def test_boxed_extraction_balances_braces():
    text = "so the answer is $\\boxed{\\frac{1}{\\sqrt{2}}}$. Also \\boxed{wrong} earlier? no"
    assert last_boxed(text) == "wrong"
    assert last_boxed("First \\boxed{1}, finally \\boxed{\\frac{a}{b}}.") == "\\frac{a}{b}"
    assert last_boxed("\\boxed 7$") == "7"
    assert last_boxed("unfinished \\boxed{\\frac{1}{2}") is None
    assert extract_math("We get \\boxed{\\dfrac{1}{2}}.") == "\\dfrac{1}{2}"
    assert extract_math("So the answer is 42.") == "42"


def test_gsm8k_extraction():
    assert extract_gsm8k("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == "7"
    assert extract_gsm8k("#### 1,234") == "1234"
    assert extract_gsm8k("#### -5") == "-5"
    assert extract_gsm8k("first 3 then 12 and finally 18.") == "18"  # no marker: last number
    assert extract_gsm8k("$2.50 each, total $7.50.") == "7.5"
    assert extract_gsm8k("no numbers") is None
    assert first_number(" 42.\n17 + 1 = 18") == "42"


def test_results_name_the_answer_checker(monkeypatch):
    from spud.eval.runner import task_metrics
    from spud.eval.tasks import Task

    rows = [{"correct": True}, {"correct": False}]
    math_task = Task("m", "gen", [], answer="math")
    assert task_metrics(math_task, rows, 1.0, 0)["answer_checker"] == math_norm.math_checker()
    assert "answer_checker" not in task_metrics(Task("g", "gen", [], answer="gsm8k"), rows, 1.0, 0)
    math_norm._math_verify.cache_clear()
    monkeypatch.setitem(sys.modules, "math_verify", None)
    try:
        assert task_metrics(math_task, rows, 1.0, 0)["answer_checker"] == "builtin"
    finally:
        monkeypatch.undo()
        math_norm._math_verify.cache_clear()
