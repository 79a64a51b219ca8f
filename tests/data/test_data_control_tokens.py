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
    pieces = []
    for split in ("train", "val"):
        tokens = np.concatenate([np.fromfile(run_dir / "data" / s["file"], dtype="<u2")
                                 for s in manifest["shards"] if s["split"] == split]).tolist()
        # the only control id in the shards is the one BOS the build puts before each document
        controls = {i for i in tokens if i in tokenizer.special_ids}
        assert controls == {tokenizer.bos_id}
        starts = [k for k, t in enumerate(tokens) if t == tokenizer.bos_id]
        assert starts[0] == 0
        pieces += [tokenizer.decode(tokens[a + 1:b]) for a, b in zip(starts, starts[1:] + [len(tokens)])]
    assert len(pieces) > 10
    # whole documents, markers kept as characters; one of them (train's or val's last) is cut at
    # the budget, so it is a prefix of its document
    whole = [p for p in pieces if p in docs]
    assert len(whole) == len(pieces) - 1
    (cut,) = [p for p in pieces if p not in docs]
    assert cut and any(d.startswith(cut) for d in docs)
