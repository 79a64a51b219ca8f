"""Shared fixtures for the data tests: one small tokenizer for the whole session, and helpers to
make configs and run directories that already hold it (so builds skip tokenizer training)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from spud.config import TokenizerConfig
from spud.data.builtin import generated_documents
from spud.tokenizer import Tokenizer, train_tokenizer

PROSE = (
    "The quick brown fox jumps over the lazy dog. A tokenizer splits text into pieces. "
    "Every document starts with a separator token so the model knows where text begins.\n"
)


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A ~512-token BPE trained on generated arithmetic/reasoning text plus some prose."""
    texts = [PROSE * 20]
    for name in ("arithmetic", "reasoning"):
        texts += list(itertools.islice(generated_documents(name, 0), 300))
    tok = train_tokenizer(iter(texts), TokenizerConfig(vocab_size=512, train_bytes=1_000_000))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file) -> Tokenizer:
    return Tokenizer.load(tokenizer_file)


@pytest.fixture
def run_dir(tmp_path, tokenizer_file) -> Path:
    """An empty run directory holding the session tokenizer."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tokenizer_file, run / "tokenizer.json")
    return run
