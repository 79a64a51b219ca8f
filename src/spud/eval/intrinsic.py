"""Intrinsic metrics: validation loss and bits per byte, overall and per data source.

Overall: up to `max_windows` evenly spaced windows of the val shards (the same windows the
trainer's val loss is drawn from, so the numbers are comparable with metrics.jsonl).

Per source: the shards do not record where one source ends and the next begins, so each source's
documents are re-read from its definition in the run's config, only validation documents are
kept (`is_val_document`, the same hash the build used: they were never trained on), and a bounded
sample of them is scored. Sources that cannot be re-read here (an `hf` source offline, a moved
file) report an error string instead of numbers; the rest still count.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from spud.data.loader import TokenLoader
from spud.data.mix import is_val_document
from spud.data.sources import open_sources
from spud.errors import SpudError

MAX_DOCS_SCANNED = 5000  # per source: the val share is small, but infinite generators must end
MAX_SCAN_SECONDS = 30.0


@torch.no_grad()
def score_windows(model, windows: np.ndarray, token_bytes: torch.Tensor, batch: int = 8) -> dict:
    """windows: (N, L+1) token ids → summed nats, target tokens and target bytes."""
    device = next(model.parameters()).device
    nats, tokens, nbytes = 0.0, 0, 0.0
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(np.ascontiguousarray(windows[i:i + batch])).long().to(device)
        x, y = w[:, :-1].clamp(min=0), w[:, 1:]  # padded inputs only feed ignored targets
        loss = model.per_token_loss(x, y)  # (B, T) nats, 0 where y == -1
        valid = y >= 0
        nats += float(loss[valid].double().sum())
        tokens += int(valid.sum())
        nbytes += float(token_bytes[y.clamp(min=0)][valid].sum())
    return _summary(nats, tokens, nbytes)


def _summary(nats: float, tokens: int, nbytes: float) -> dict:
    return {
        "loss": nats / tokens if tokens else float("nan"),
        "bpb": nats / (math.log(2) * nbytes) if nbytes else float("nan"),
        "tokens": tokens,
        "bytes": int(nbytes),
    }


def val_split_metrics(run_dir, model, cfg, token_bytes, max_windows: int = 64) -> dict:
    seq_len = min(cfg.seq_len, model.cfg.max_seq_len)
    loader = TokenLoader(run_dir, "val", 1, seq_len, cfg.seed)
    n = min(max_windows, loader.windows_per_epoch)
    ids = np.unique(np.linspace(0, loader.windows_per_epoch - 1, n).astype(np.int64))
    return score_windows(model, loader.gather(ids), token_bytes) | {"windows": len(ids)}


def _doc_windows(tokens: list[int], seq_len: int, pad: int = -1) -> np.ndarray:
    """Pack a token stream into windows of seq_len+1 sharing one token, like the loader does;
    the tail window is padded with -1 (ignored targets)."""
    w = seq_len + 1
    rows = []
    for start in range(0, max(len(tokens) - 1, 1), seq_len):
        chunk = tokens[start:start + w]
        if len(chunk) < 2:
            break
        rows.append(chunk + [pad] * (w - len(chunk)))
    return np.array(rows, dtype=np.int64).reshape(-1, w)


def source_metrics(model, tok, cfg, token_bytes, max_tokens: int = 20_000) -> dict:
    out: dict[str, dict] = {}
    try:
        sources = open_sources(cfg)
    except SpudError as e:
        return {"error": str(e)}
    seq_len = min(cfg.seq_len, model.cfg.max_seq_len)
    for src in sources:
        start = time.monotonic()
        stream: list[int] = []
        docs = scanned = 0
        try:
            for doc in src.documents():
                scanned += 1
                if is_val_document(doc.text, cfg.data.val_fraction):
                    stream += [tok.bos_id, *tok.encode(doc.text)]  # as the mix writes documents
                    docs += 1
                if (len(stream) >= max_tokens or scanned >= MAX_DOCS_SCANNED
                        or time.monotonic() - start > MAX_SCAN_SECONDS):
                    break
        except SpudError as e:
            out[src.name] = {"error": str(e)}
            continue
        if not stream:
            out[src.name] = {"error": f"no validation documents in the first {scanned} documents "
                                      f"(data.val_fraction={cfg.data.val_fraction})"}
            continue
        stream = stream[:max_tokens + 1]
        out[src.name] = score_windows(model, _doc_windows(stream, seq_len), token_bytes) | {
            "documents": docs}
    return out


def intrinsic_metrics(run_dir, model, tok, cfg, max_windows: int = 64,
                      source_tokens: int = 20_000) -> dict:
    token_bytes = torch.tensor(tok.byte_lengths(model.cfg.vocab_size), dtype=torch.float64,
                               device=next(model.parameters()).device)
    result: dict = {}
    if cfg.data.val_fraction > 0:
        try:
            result["val"] = val_split_metrics(run_dir, model, cfg, token_bytes, max_windows)
        except SpudError as e:
            result["val"] = {"error": str(e)}
        result["sources"] = source_metrics(model, tok, cfg, token_bytes, source_tokens)
    else:
        result["val"] = {"error": "data.val_fraction=0: the run has no validation split"}
    return result
