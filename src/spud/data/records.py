"""One record of a source: decoding bytes, taking the text field of a JSON record, telling text
from binary, cutting a long document into pieces, and counting everything that is skipped (and
why, and where) in `SourceStats`.

A record that is not text must not reach the tokenizer: a binary file named `.txt` (an ELF
executable, a zip, an image) decodes to something like 50% U+FFFD and NUL bytes and would be
trained on as if it were prose. `nontext_reason` catches it per document, by the share of
characters that no text file contains: U+FFFD (invalid UTF-8, or text in a legacy encoding that
was read as UTF-8) and C0 control characters other than tab, newlines, form feed and escape.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

# A longer document is read and tokenized in pieces of about this size (cut at a line break):
# memory stays bounded however large a file is, and a source's budget can stop mid-document.
# 1 MiB is ~250k tokens, far beyond any context window, so the BOS between pieces costs nothing.
MAX_DOCUMENT_BYTES = 1 << 20
MAX_LISTED_FILES = 200  # the manifest lists this many files per source, then only a count
MAX_SKIP_EXAMPLES = 20
# Above this share of non-text characters a document is skipped. Real text has ~0 (a stray bad
# byte or two); Latin-1 prose read as UTF-8 stays below ~5%; binary files are at 30-60%.
MAX_NONTEXT_FRACTION = 0.10
_NONTEXT = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f\ufffd]")


@dataclass
class SourceStats:
    """What one pass over a source saw. `records` counts everything that could have been a
    document (files, paragraphs, jsonl lines, parquet rows); `bad_records` the malformed ones;
    `blank_lines` the empty lines of jsonl files (formatting, not records, but counted)."""

    files: list[str] = field(default_factory=list)
    files_count: int = 0
    records: int = 0
    bad_records: int = 0
    blank_lines: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    utf8_replacements: int = 0
    split_documents: int = 0  # documents longer than MAX_DOCUMENT_BYTES, read in pieces

    def file_read(self, name: str) -> None:
        self.files_count += 1
        if len(self.files) < MAX_LISTED_FILES:
            self.files.append(name)

    def skip(self, reason: str, where: str, detail: str, bad: bool = False) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < MAX_SKIP_EXAMPLES:
            self.skipped_examples.append(f"{where}: {detail}")
        if bad:
            self.records += 1
            self.bad_records += 1

    def check_bad_fraction(self, source: str, limit: float) -> None:
        """Raise once a pass is over (never at the first bad line: the message reports the full
        count, so the user learns the size of the problem in one run)."""
        from spud.errors import SpudError

        if not self.records or self.bad_records / self.records <= limit:
            return
        first = "\n    ".join(self.skipped_examples[:5])
        raise SpudError(
            f"source {source!r}: {self.bad_records:,} of {self.records:,} records are bad "
            f"({self.bad_records / self.records:.1%}), more than data.max_bad_fraction={limit}. "
            f"First bad records:\n    {first}\n"
            "Fix the input, or raise data.max_bad_fraction to skip bad records anyway."
        )

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "files_count": self.files_count,
            "records": self.records,
            "bad_records": self.bad_records,
            "blank_lines": self.blank_lines,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": self.skipped_examples,
            "utf8_replacements": self.utf8_replacements,
            "split_documents": self.split_documents,
        }


def decode_utf8(raw: bytes, stats: SourceStats) -> str:
    """Decode with errors="replace", counting only the U+FFFD characters the decoder introduced
    (the encoded U+FFFD already in the bytes is legitimate text)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        stats.utf8_replacements += text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
        return text


def nontext_reason(text: str) -> str | None:
    """Why `text` is not text (too many invalid/control characters), or None if it is."""
    bad = sum(1 for _ in _NONTEXT.finditer(text))
    if bad <= MAX_NONTEXT_FRACTION * len(text):
        return None
    return (f"not text: {bad:,} of {len(text):,} characters ({bad / len(text):.0%}) are invalid UTF-8 "
            f"or control characters, more than {MAX_NONTEXT_FRACTION:.0%} (a binary file, or another encoding?)")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def record_text(obj: object, name: str, where: str, stats: SourceStats) -> str | None:
    """The text field of one jsonl/hf record, or None (counted as bad) when it has none."""
    if not isinstance(obj, dict):
        kind = _JSON_TYPES.get(type(obj), type(obj).__name__)
        stats.skip("not_object", where, f"a JSON {kind}, not an object", bad=True)
        return None
    if name not in obj:
        keys = ", ".join(list(map(str, obj))[:8]) or "none"
        stats.skip("missing_field", where, f"no field {name!r} (keys: {keys})", bad=True)
        return None
    value = obj[name]
    if value is None:
        stats.skip("null", where, f"field {name!r} is null", bad=True)
        return None
    if not isinstance(value, str):
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        stats.skip("not_string", where, f"field {name!r} is {_article(kind)} {kind}, not a string", bad=True)
        return None
    return value


# ------------------------------------------------------------------------ long documents
def _cut_point(block: bytes) -> int:
    """Where to end a piece of a long document: after the last line break in the block's second
    half, else after the last space, else at a UTF-8 character boundary (never inside one)."""
    half = len(block) // 2
    for sep in (b"\n", b" "):
        i = block.rfind(sep, half)
        if i >= 0:
            return i + 1
    i = len(block)
    while i > half and (block[i - 1] & 0xC0) == 0x80:  # continuation bytes of a split character
        i -= 1
    return i - 1 if i > half and block[i - 1] >= 0xC0 else i


def file_pieces(f: BinaryIO, max_bytes: int = MAX_DOCUMENT_BYTES) -> Iterator[bytes]:
    """A file's bytes in consecutive pieces of at most `max_bytes` (one piece if it is smaller)."""
    carry = b""
    while True:
        block = carry + f.read(max_bytes - len(carry))
        if len(block) < max_bytes:
            if block:
                yield block
            return
        cut = _cut_point(block)
        yield block[:cut]
        carry = block[cut:]


def encodable_part(part: str) -> tuple[str, int, int]:
    """(part, its UTF-8 length, replacements): lone surrogates (e.g. from a JSON "\\ud800" escape)
    cannot be encoded, so they become U+FFFD and are counted."""
    try:
        return part, len(part.encode("utf-8")), 0
    except UnicodeEncodeError:
        fixed = part.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed, len(fixed.encode("utf-8")), fixed.count("\ufffd") - part.count("\ufffd")


def text_pieces(text: str, max_chars: int = MAX_DOCUMENT_BYTES) -> Iterator[str]:
    """`text` in consecutive pieces of at most `max_chars`, cut at line breaks where possible."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start + max_chars // 2, end)
        cut = cut + 1 if cut >= 0 else end
        yield text[start:cut]
        start = cut
    yield text[start:]
