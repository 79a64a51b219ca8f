"""Pretraining documents are plain text: markers typed into them never become control ids."""

from __future__ import annotations

import numpy as np
from data_helpers import make_cfg, quiet

from spud.data.build import build_dataset


def test_document_text_never_becomes_control_tokens(tmp_path, run_dir, tokenizer):
    texts = tmp_path / "texts"
    texts.mkdir()
    docs = [f"doc {i} <|bos|> says <|user|>hi<|end|><|eos|><|assistant|> ok {i}." for i in range(40)]
    for i, d in enumerate(docs):
        (texts / f"{i:02d}.txt").write_text(d)
    cfg = make_cfg([{"name": "t", "type": "text", "path": str(texts)}], total_tokens=1_500,
                   val_fraction=0.1)
    manifest = build_dataset(cfg, run_dir, progress=False, log=quiet)
    tokens = np.concatenate([np.fromfile(run_dir / "data" / s["file"], dtype="<u2")
                             for s in manifest["shards"]]).tolist()
    # the only control id in the shards is the one BOS the build puts before each document
    controls = {i for i in tokens if i in tokenizer.special_ids}
    assert controls == {tokenizer.bos_id}
    starts = [k for k, t in enumerate(tokens) if t == tokenizer.bos_id]
    assert starts[0] == 0 and len(starts) > 10
    pieces = [tokenizer.decode(tokens[a + 1:b]) for a, b in zip(starts, starts[1:] + [len(tokens)])]
    assert all(p in docs for p in pieces[:-1])  # whole documents, markers kept as characters
    assert pieces[-1] and any(d.startswith(pieces[-1]) for d in docs)
