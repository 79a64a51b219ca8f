"""Held-out corpora: English prose that no training run sees, to score a recipe on text it was
never trained or tuned on (`spud ablate`, benchmarks/recipe_efficiency.py, docs/recipe.md).

- `stdlib_prose` (built in): the docstrings of the held-out slice of standard-library modules.
  `builtin.stdlib_files()` leaves those modules out of both built-in stdlib sources, so the slice
  is excluded from every training mix by construction, not by a filter someone must remember.
- A directory of documentation: .txt/.md/.rst/.text files read as they are, .html/.htm files with
  the markup, scripts, styles and navigation bars stripped. docs/recipe.md uses the Debian package
  `gnu-standards` (the GNU Coding Standards and "Information for Maintainers of GNU Software",
  HTML under /usr/share/doc/gnu-standards/): English prose about software, like the built-in mix's
  docstrings, but written by other people in another house style.

Files are split into documents of whole paragraphs (about DOC_CHARS each) so that capping a
corpus at a token budget can take evenly spaced documents from all of it instead of the first
chapter. `ngram_overlap` (the share of a corpus's word 13-grams found in some texts) builds
`stdlib_prose`; a corpus is checked against a built data set by spud.eval.decontam (`spud ablate`
does that before training).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from spud.data import builtin
from spud.errors import SpudError

BUILTIN_HELDOUT = ("stdlib_prose",)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
HTML_SUFFIXES = (".html", ".htm")
DOC_CHARS = 4000
NGRAM = 13
_STDLIB_PROSE_VERSION = 3  # bump when what stdlib_prose keeps changes (invalidates caches)
INSTALL_HINT = (
    "e.g. the Debian documentation package gnu-standards: `apt-get install gnu-standards`, then "
    "--heldout gnu=/usr/share/doc/gnu-standards (see docs/recipe.md)"
)


@dataclass
class HeldoutCorpus:
    name: str
    origin: str  # where the text came from, for reports
    documents: list[str]

    @property
    def nbytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.documents)

    def describe(self) -> dict:
        return {"name": self.name, "origin": self.origin, "documents": len(self.documents),
                "bytes": self.nbytes}


# ----------------------------------------------------------------------------------- built in
@functools.lru_cache(maxsize=1)
def _stdlib_prose() -> tuple[tuple[str, ...], str]:
    """(documents, origin), cached on disk: the 13-gram check reads the whole stdlib (seconds)."""
    from spud.hardware import cache_dir

    held, training = builtin.stdlib_files(heldout=True), builtin.stdlib_files()
    stats = [[str(p), s.st_size, s.st_mtime_ns] for p in held + training for s in [p.stat()]]
    key = hashlib.sha256(json.dumps([_STDLIB_PROSE_VERSION, sys.version, builtin.HELDOUT_FRACTION,
                                     stats]).encode()).hexdigest()[:16]
    cache = cache_dir() / "heldout" / f"stdlib_prose-{key}.json"
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        return tuple(cached["documents"]), cached["origin"]
    except (OSError, ValueError, KeyError):
        pass
    docs: list[str] = []
    for path in held:
        parsed = builtin.docstring_documents(path.read_text(encoding="utf-8", errors="replace"),
                                             builtin.module_name(path))
        docs += [d for d in parsed or [] if d.strip()]
    # The stdlib copies some prose between modules (abc/_py_abc, gzip/bz2/lzma.open, shutil and
    # distutils archives): a held-out docstring that shares any 13-gram with what the built-in
    # sources make of a training module (its source for stdlib_code, its docstring documents, with
    # their `def module.name(args)` headings, for stdlib_docs) is dropped, so the slice is disjoint
    # from the training sources by check, too.
    def training_texts():
        for path in training:
            source = path.read_text(encoding="utf-8", errors="replace")
            yield source
            yield from builtin.docstring_documents(source, builtin.module_name(path)) or []

    shared = ngram_overlap(docs, training_texts())["per_document"]
    kept = tuple(d for d, found in zip(docs, shared) if found == 0)
    origin = (f"docstrings of {len(held)} held-out stdlib modules (Python {sys.version.split()[0]}), "
              f"less {len(docs) - len(kept)} that share a {NGRAM}-gram with the training modules")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"documents": kept, "origin": origin}), encoding="utf-8")
        tmp.replace(cache)
    except OSError:  # a read-only home: no cache, still correct
        pass
    return kept, origin


def stdlib_prose() -> HeldoutCorpus:
    """Docstring documents of the held-out stdlib modules (the same shape stdlib_docs trains on)."""
    docs, origin = _stdlib_prose()
    if not docs:
        raise SpudError(f"held-out corpus stdlib_prose is empty: no held-out stdlib modules with "
                        f"docstrings under {builtin.stdlib_root()}")
    return HeldoutCorpus("stdlib_prose", origin, list(docs))


# ---------------------------------------------------------------------------------- directories
class _HTMLText(HTMLParser):
    """Visible text of an HTML page, with block elements as paragraph breaks. Skips <head>,
    scripts, styles, navigation (texinfo's `div.header` bars repeat on every node), tables of
    contents and index tables: lists of titles, not prose."""

    SKIP_TAGS = frozenset({"head", "script", "style", "nav", "header", "footer"})
    SKIP_CLASSES = frozenset({"header", "nav-panel", "navigation", "contents", "shortcontents"})
    BLOCKS = frozenset({"p", "div", "br", "li", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "dt",
                        "dd", "table", "ul", "ol", "dl", "blockquote", "hr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip: list[str] = []  # open tags of the skipped element (its tag repeated per nesting)
        self._pre = 0

    def handle_starttag(self, tag, attrs) -> None:
        classes = set((dict(attrs).get("class") or "").split())
        if self._skip:
            if tag == self._skip[0]:
                self._skip.append(tag)
            return
        if tag in self.SKIP_TAGS or classes & self.SKIP_CLASSES or any(
                c.startswith("index-") for c in classes):  # texinfo's index tables: term lists
            self._skip.append(tag)
            return
        if tag == "pre":
            self._pre += 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag) -> None:
        if self._skip:
            if tag == self._skip[0]:
                self._skip.pop()
            return
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data) -> None:
        if not self._skip:
            self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        joined = "".join(self.parts)
        paragraphs = (p.strip() for p in re.split(r"\n\s*\n", joined))
        return "\n\n".join(p for p in paragraphs if p)


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return parser.text()


def split_documents(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Whole paragraphs (blank-line separated) grouped into documents of about max_chars."""
    docs, current, size = [], [], 0
    for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not para:
            continue
        if current and size + len(para) > max_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        docs.append("\n\n".join(current))
    return docs


def read_directory(path: str | Path, name: str | None = None) -> HeldoutCorpus:
    """A held-out corpus from a directory (or one file) of text, markdown or HTML files."""
    root = Path(path).expanduser()
    suffixes = TEXT_SUFFIXES + HTML_SUFFIXES
    if not root.exists():
        raise SpudError(f"held-out corpus {name or root}: {root} does not exist ({INSTALL_HINT})")
    files = [root] if root.is_file() else sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes),
        key=lambda p: p.relative_to(root).as_posix())
    if not files or files[0].suffix.lower() not in suffixes:
        raise SpudError(f"held-out corpus {name or root}: no {'/'.join(suffixes)} files in {root}")
    docs: list[str] = []
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise SpudError(f"held-out corpus {name or root}: cannot read {f} ({e.strerror})") from None
        text = html_to_text(raw) if f.suffix.lower() in HTML_SUFFIXES else raw
        docs += split_documents(text)
    if not docs:
        raise SpudError(f"held-out corpus {name or root}: the files in {root} hold no text")
    return HeldoutCorpus(name or root.name, f"{len(files)} files under {root}", docs)


def resolve(spec: str) -> HeldoutCorpus:
    """'stdlib_prose' (built in), 'NAME=PATH' or 'PATH' (named after the directory)."""
    if spec in BUILTIN_HELDOUT:
        return stdlib_prose()
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    if sep and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SpudError(f"--heldout {spec!r}: the name before '=' may only hold letters, digits, _ . -")
    if not path:
        raise SpudError(f"--heldout {spec!r}: give a built-in corpus ({', '.join(BUILTIN_HELDOUT)}), "
                        f"a directory, or NAME=DIRECTORY")
    return read_directory(path, name or None)


def resolve_all(specs: Iterable[str]) -> list[HeldoutCorpus]:
    corpora = [resolve(s) for s in specs]
    names = [c.name for c in corpora]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpudError(f"--heldout: two corpora are named {', '.join(dupes)}; name them with NAME=PATH")
    return corpora


# ------------------------------------------------------------------------------------ utilities
def evenly_spaced(docs: list[str], max_bytes: int) -> list[str]:
    """At most ~max_bytes of documents, evenly spaced through the corpus and in corpus order
    (deterministic: every model in a comparison is scored on the same text)."""
    total = sum(len(d.encode("utf-8")) for d in docs)
    if total <= max_bytes:
        return list(docs)
    keep = max(1, round(len(docs) * max_bytes / total))
    step = len(docs) / keep
    return [docs[int(i * step)] for i in range(keep)]


def document_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _words(text: str) -> list[str]:
    from spud.eval.decontam import words  # one normalisation for every n-gram check

    return words(text)


def ngram_overlap(heldout_docs: Iterable[str], training_texts: Iterable[str], n: int = NGRAM) -> dict:
    """How much of a held-out corpus occurs in training texts, in distinct word n-grams:
    {'ngrams', 'found', 'fraction', 'n', 'per_document': [n-grams found, per held-out document]}.

    Used to build `stdlib_prose` from the stdlib's own files; checking a corpus against a built
    data set is spud.eval.decontam's job, and the words are its words (lowercased runs of letters
    and digits, and single punctuation marks), so both checks agree. The held-out n-grams are
    kept in memory and the training texts streamed past them."""
    per_doc = [set(_ngram_hashes(d, n)) for d in heldout_docs]
    wanted = set().union(*per_doc)
    found: set[int] = set()
    if wanted:
        for text in training_texts:
            found.update(h for h in _ngram_hashes(text, n) if h in wanted)
    return {"ngrams": len(wanted), "found": len(found),
            "fraction": len(found) / len(wanted) if wanted else 0.0, "n": n,
            "per_document": [len(d & found) for d in per_doc]}


def _ngram_hashes(text: str, n: int) -> Iterator[int]:
    w = _words(text)
    return (hash(tuple(w[i:i + n])) for i in range(len(w) - n + 1))

