import pytest

from spud.eval.math_norm import (
    extract_gsm8k,
    extract_math,
    first_number,
    last_boxed,
    math_equal,
    normalize_math,
)


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
def test_math_equivalent(pred, gold):
    assert math_equal(pred, gold), (normalize_math(pred), normalize_math(gold))


@pytest.mark.parametrize("pred,gold", [("3", "4"), ("\\frac{1}{3}", "0.33"), ("", "0"), (None, "1"),
                                       ("x + 1", "x + 2")])
def test_math_not_equivalent(pred, gold):
    assert not math_equal(pred, gold)


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
