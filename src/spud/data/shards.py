"""Token shards on disk and the manifest that describes them.

A shard is a raw little-endian array of token ids (`data/{split}_{NNNNNN}.bin`): no header, so
`np.memmap` maps it directly and any language can read it. uint16 halves disk and page-cache use
whenever the vocabulary fits (ids < 65536), which it does for every tokenizer up to 64k tokens.

A build writes everything (shards, then manifest.json last) into a hidden temporary directory
inside the run directory and renames it to `data/` at the end: a reader either sees a complete
dataset or none, never a half-written one, and a failed or interrupted build leaves the previous
`data/` untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from spud.errors import SpudError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
_STAGING_PREFIX, _OLD_PREFIX = ".data.tmp-", ".data.old-"
_REQUIRED_KEYS = ("format_version", "dtype", "vocab_size", "bos_id", "tokenizer_sha256",
                  "train_tokens", "val_tokens", "shards", "sources", "data_config")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Appends tokens to `{split}_NNNNNN.bin` files of at most `shard_tokens` tokens each,
    hashing as it writes (no second read of what may be gigabytes)."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.directory, self.split = Path(directory), split
        self.shard_tokens, self.dtype = shard_tokens, np.dtype(dtype)
        self.shards: list[dict] = []
        self._file = None
        self._count = 0
        self._hash = hashlib.sha256()

    def write(self, tokens: np.ndarray) -> None:
        start = 0
        while start < len(tokens):
            if self._file is None:
                name = shard_name(self.split, len(self.shards))
                self._file = (self.directory / name).open("wb", buffering=1 << 20)
                self.shards.append({"file": name, "split": self.split, "tokens": 0, "sha256": ""})
            # A document may straddle two shards: loader windows never cross a shard boundary,
            # and a cut document is still a valid token sequence on both sides.
            take = min(len(tokens) - start, self.shard_tokens - self._count)
            data = tokens[start:start + take].astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            start += take
            if self._count == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        self._file.close()
        self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
        self._file, self._count, self._hash = None, 0, hashlib.sha256()

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish_shard()
        return self.shards

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._count


class ShardSet:
    """One writer per split, behind the `write(split, tokens)` callable the mix expects."""

    def __init__(self, directory: Path, shard_tokens: int, vocab_size: int):
        self.dtype = token_dtype(vocab_size)
        self.writers = {s: ShardWriter(directory, s, shard_tokens, self.dtype) for s in SPLITS}

    def __call__(self, split: str, tokens: np.ndarray) -> None:
        self.writers[split].write(tokens)

    def close(self) -> list[dict]:
        return [shard for s in SPLITS for shard in self.writers[s].close()]


# ------------------------------------------------------------------------- atomic publication
@contextmanager
def staged_data_dir(run_dir: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on normal exit it becomes `run_dir/data` (replacing any
    previous one), on an exception it is deleted and `run_dir/data` stays as it was."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Leftovers of builds that were killed (not merely failed) would otherwise pile up;
    # this assumes one build per run directory at a time, which the CLI and trainer follow.
    for stale in [*run_dir.glob(_STAGING_PREFIX + "*"), *run_dir.glob(_OLD_PREFIX + "*")]:
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=run_dir))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final = run_dir / "data"
    if final.exists():
        # Two renames: POSIX has no portable atomic swap of directories. Between them there is
        # briefly no data/ (a reader gets "missing", never a mix of old and new shards).
        old = run_dir / f"{_OLD_PREFIX}{uuid.uuid4().hex[:8]}"
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)


def write_manifest(directory: Path, manifest: dict) -> None:
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- reading, checking
def load_manifest(run_dir: str | Path) -> dict:
    data_dir = Path(run_dir) / "data"
    path = data_dir / MANIFEST
    if not path.is_file():
        raise SpudError(
            f"no dataset in {data_dir}: {MANIFEST} is missing. Build it with "
            f"`spud data build CONFIG --out {run_dir}` (training does this automatically)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SpudError(f"{path} is unreadable or corrupt ({e}); delete {data_dir} and rebuild") from None
    missing = [k for k in _REQUIRED_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise SpudError(f"{path} lacks {', '.join(missing)}; delete {data_dir} and rebuild")
    if manifest["format_version"] != FORMAT_VERSION:
        raise SpudError(
            f"{path} has format version {manifest['format_version']}, this spud reads "
            f"{FORMAT_VERSION}; delete {data_dir} and rebuild"
        )
    return manifest


def verify_shards(run_dir: str | Path) -> int:
    """Check every shard's size and sha256 against the manifest; returns the number checked,
    raises SpudError listing every missing, truncated or altered shard."""
    manifest = load_manifest(run_dir)
    data_dir = Path(run_dir) / "data"
    itemsize = np.dtype(manifest["dtype"]).itemsize
    problems = []
    for shard in manifest["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            problems.append(f"{shard['file']}: missing")
        elif path.stat().st_size != shard["tokens"] * itemsize:
            problems.append(f"{shard['file']}: {path.stat().st_size} bytes, expected "
                            f"{shard['tokens'] * itemsize} ({shard['tokens']} tokens)")
        elif file_sha256(path) != shard["sha256"]:
            problems.append(f"{shard['file']}: sha256 differs from the manifest (file altered)")
    if problems:
        raise SpudError(f"{data_dir}: {len(problems)} bad shard(s):\n  " + "\n  ".join(problems)
                        + f"\nDelete {data_dir} and rebuild it with `spud data build`.")
    return len(manifest["shards"])


def shards_present(run_dir: str | Path, manifest: dict) -> bool:
    """Cheap existence + size check (no hashing) used before reusing a built dataset."""
    data_dir = Path(run_dir) / "data"
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
            return False
    return True
