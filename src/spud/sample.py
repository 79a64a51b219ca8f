"""`spud sample`: stream a continuation of a prompt from a trained run to the terminal."""

from __future__ import annotations

import sys

from spud.runs import load_model
from spud.serve.detok import Detokenizer
from spud.serve.sampling import check_sampling_args, generate


def sample_to_terminal(args, out=sys.stdout) -> list[str]:
    check_sampling_args(args.temperature, args.top_k, args.top_p, args.max_tokens)
    model, tok, cfg, ckpt = load_model(args.run, args.checkpoint, args.device, model="base")
    ids = tok.encode(args.prompt, add_bos=True)
    texts = []
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        streamer = Detokenizer(tok.decode)
        out.write(args.prompt)
        pieces = []
        for token in generate(model, ids, args.max_tokens, args.temperature, args.top_k or None,
                              args.top_p, seed, stop_ids=[tok.bos_id]):
            piece = streamer.push(token)
            pieces.append(piece)
            out.write(piece)
            out.flush()
        pieces.append(streamer.flush())
        out.write(pieces[-1] + "\n")
        if args.num_samples > 1 and i < args.num_samples - 1:
            out.write("-" * 40 + "\n")
        texts.append("".join(pieces))
    print(f"[{ckpt.name}]", file=sys.stderr)
    return texts
