"""Answer extraction and normalisation for generative tasks (GSM8K numbers, MATH LaTeX).

Exact string match is far too strict for free-form answers: a model that writes `\\dfrac{1}{2}`,
`1/2` or `0.5` for the reference `\\frac12` is right. MATH-style answers are checked by
Hugging Face's `math-verify` when it is installed (`pip install 'spud[math]'`; also in the `eval`
extra): it parses both sides into SymPy and compares them symbolically, so `x+1` == `1+x`,
`\\sqrt{8}/2` == `\\sqrt2` and sets or intervals work. Without it, the built-in normaliser below
is the fallback: both sides go through the same normalisation (strip presentation-only LaTeX,
units, `x =` prefixes) and, when both parse as numbers, are compared numerically.
`math_checker()` names the checker in use, so results can say which one produced them.
"""

from __future__ import annotations

import functools
import re
import threading
from fractions import Fraction

from spud.errors import SpudError

CHECKERS = ("math-verify", "builtin")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_GSM_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


# ------------------------------------------------------------------------------------ numbers
def normalize_number(s: str) -> str | None:
    """'1,234.50' → '1234.5', '$7' → '7', '3.' → '3'; None when there is no number."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        f = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    if f.denominator == 1:
        return str(f.numerator)
    return format(float(f), "g") if len(str(float(f))) < 18 else str(float(f))


def first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    return normalize_number(m.group()) if m else None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def extract_gsm8k(text: str) -> str | None:
    """The number after `####` (the GSM8K answer marker), else the last number in the text."""
    m = _GSM_ANSWER.search(text)
    if m:
        return normalize_number(m.group(1))
    return last_number(text)


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a == b


# --------------------------------------------------------------------------------------- MATH
def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced, so nested
    `\\frac{1}{2}` inside the box survives; `\\boxed 5` (no braces) takes the next token."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        m = re.match(r"[^\s$]+", text[i:])
        return m.group() if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the model stopped inside the box


def extract_math(text: str) -> str | None:
    """A model's MATH answer: the last \\boxed{}, else what follows 'answer is', else the last
    number (small models rarely box)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    m = re.findall(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s|\.?$|\n)", text)
    if m:
        return m[-1].strip()
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def _fix_fracs(s: str) -> str:
    # \frac12 → \frac{1}{2}, \frac1{x} → \frac{1}{x}, \frac{a}2 → \frac{a}{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    return s


def normalize_math(s: str | None) -> str:
    """Canonical string for comparing MATH answers."""
    if s is None:
        return ""
    s = s.strip().replace("\n", " ")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    # units in \text{...}/\mbox{...} after a number are presentation: "10\text{ cm}" → "10"
    s = re.sub(r"(\d)\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}(\^\{?\d\}?)?", r"\1", s)
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf)\{([^{}]*)\}", r"\1", s)  # other \text: keep words
    # plain-word units after a number: "5 inches", "12 cm^2"
    s = re.sub(r"^(-?[\d.,]+)\s+[A-Za-z]+(?:\s+[A-Za-z]+)*(?:\^\{?\d\}?)?\s*\.?$", r"\1", s)
    # a leading single-variable assignment: "x = 5" → "5" (not "x = y = 2"-style chains)
    m = re.match(r"^\s*[A-Za-z]\s*=\s*(.+)$", s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    s = _fix_fracs(s.replace(" ", ""))
    # "a/b" with integers → \frac{a}{b}, so it meets the LaTeX form as a string too
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if s.startswith("."):
        s = "0" + s
    if s.endswith(".0") and s[:-2].lstrip("-").isdigit():
        s = s[:-2]
    return s


def math_to_number(s: str) -> Fraction | None:
    """Value of a normalised answer when it is a plain number or a numeric fraction."""
    s = s.strip()
    neg = s.startswith("-")
    body = s[1:] if neg else s
    m = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", body)
    try:
        if m:
            v = Fraction(m.group(1)) / Fraction(m.group(2))
        elif re.fullmatch(r"[\d.]+(?:/[\d.]+)?", body):
            v = Fraction(body)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    return -v if neg else v


# ---------------------------------------------------------------------------------- checkers
@functools.cache
def _math_verify():
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def math_checker() -> str:
    """The checker `math_equal` uses by default: "math-verify" when installed, else "builtin"."""
    return "math-verify" if _math_verify() is not None else "builtin"


def math_equal(pred: str | None, gold: str | None, checker: str | None = None) -> bool:
    """Is `pred` the same MATH answer as `gold`? `checker`: "math-verify", "builtin", or None for
    `math_checker()`."""
    if pred is None or gold is None:
        return False
    checker = checker or math_checker()
    if checker == "builtin":
        return builtin_math_equal(pred, gold)
    if checker != "math-verify":
        raise SpudError(f"unknown answer checker {checker!r}; expected one of {list(CHECKERS)}")
    mv = _math_verify()
    if mv is None:
        raise SpudError("the math-verify checker is not installed: pip install 'spud[math]'")
    # math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere (eval
    # worker threads, the server) it runs without one.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    parsed = [mv.parse(_as_latex(s), parsing_timeout=timeout) for s in (gold, pred)]
    return bool(parsed[1]) and mv.verify(parsed[0], parsed[1], timeout_seconds=timeout)


def _as_latex(answer: str) -> str:
    """A bare answer ("\\frac12") as the math-mode text math-verify extracts from."""
    delimited = re.search(r"(?<!\\)\$", answer) or "\\boxed" in answer  # an escaped \$ is a dollar sign
    return answer if delimited else f"${answer}$"


def builtin_math_equal(pred: str | None, gold: str | None) -> bool:
    """Exact match after normalisation, or equal numeric values (1/2 == 0.5 == \\frac12)."""
    if pred is None or gold is None:
        return False
    a, b = normalize_math(pred), normalize_math(gold)
    if a == b and a != "":
        return True
    na, nb = math_to_number(a), math_to_number(b)
    if na is not None and nb is not None:
        return abs(float(na) - float(nb)) <= 1e-6 * max(1.0, abs(float(nb)))
    return False
