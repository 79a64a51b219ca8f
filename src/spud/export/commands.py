"""The `spud export hf|gguf` and `spud import hf` verbs: call the stage, print what was written."""

from __future__ import annotations

from pathlib import Path


def _which(args) -> str:
    return "base" if args.base else "chat" if args.chat else "auto"


def cmd_export_hf(args) -> int:
    from spud.export.hf import DEFAULT_SHARD_BYTES, export_hf

    shard = int(args.max_shard_size * 2**20) if args.max_shard_size else DEFAULT_SHARD_BYTES
    s = export_hf(args.run, args.out, which=_which(args), checkpoint=args.checkpoint, dtype=args.dtype,
                  force=args.force, max_shard_bytes=shard)
    print(f"wrote {s['out']}: {s['architecture']} ({s['params']:,} parameters, {s['dtype']}, "
          f"{len(s['weight_files'])} weight file(s)) from the {s['model']} model, {s['checkpoint']}")
    if s["dropped"]:
        print("left out the multi-token-prediction heads (training only; inference is unchanged)")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(Path(s['out']))!r}) · "
          f"serve it with: vllm serve {s['out']}")
    return 0


def cmd_export_gguf(args) -> int:
    from spud.export.gguf import export_gguf

    s = export_gguf(args.run, args.out, which=_which(args), checkpoint=args.checkpoint,
                    outtype=args.outtype, force=args.force)
    print(f"wrote {s['out']}: GGUF arch {s['arch']}, {s['outtype']}, {s['tensors']} tensors, "
          f"{s['bytes'] / 2**20:.1f} MiB, from the {s['model']} model, {s['checkpoint']}")
    print(f"serve it with: llama-server -m {s['out']}")
    return 0


def cmd_import_hf(args) -> int:
    from spud.export.hf_import import import_hf

    s = import_hf(args.src, args.out, force=args.force)
    print(f"wrote {s['out']}: {s['model_type']} model, {s['params']:,} parameters, vocabulary "
          f"{s['vocab_size']}, one checkpoint (step 0)")
    if s["added_tokens"]:
        grew = f"; embedding grew by {s['grown_rows']} rows" if s["grown_rows"] else ""
        print(f"added Spud's control tokens {', '.join(s['added_tokens'])} to the tokenizer{grew}. "
              f"They are untrained: run `spud sft {s['out']}` before chatting with the model.")
    return 0


def add_parsers(verbs) -> None:
    """`spud export hf|gguf` and `spud import hf` on the CLI's verb parser."""
    ex = verbs.add_parser("export", help="export a run to Hugging Face transformers or GGUF (llama.cpp)")
    kinds = ex.add_subparsers(dest="action", metavar="FORMAT")
    kinds.required = True
    for name, helptext in (("hf", "a transformers model directory (loads without trust_remote_code)"),
                           ("gguf", "one GGUF file for llama.cpp (llama and qwen3 architectures)")):
        p = kinds.add_parser(name, help=helptext)
        p.add_argument("run", help="run directory")
        p.add_argument("out", help="output directory" if name == "hf" else "output .gguf file")
        which = p.add_mutually_exclusive_group()
        which.add_argument("--base", action="store_true", help="export the pretrained model")
        which.add_argument("--chat", action="store_true", help="export the chat model of `spud sft` "
                           "(default: the chat model when the run has one, else the base model)")
        p.add_argument("--checkpoint", default=None, help="step number or directory name (default: latest)")
        p.add_argument("--force", action="store_true", help="replace an existing non-empty output")
        if name == "hf":
            p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype")
            p.add_argument("--max-shard-size", type=float, default=None, metavar="MiB",
                           help="split weights into shards of at most this size (default 5 GiB)")
            p.set_defaults(func=cmd_export_hf)
        else:
            p.add_argument("--outtype", choices=["f32", "f16", "q8_0"], default="f16",
                           help="tensor type of the matrices (norms stay f32)")
            p.set_defaults(func=cmd_export_gguf)
    im = verbs.add_parser("import", help="import a local Hugging Face model into a spud run directory")
    kinds = im.add_subparsers(dest="action", metavar="FORMAT")
    kinds.required = True
    p = kinds.add_parser("hf", help="a transformers model directory (llama, qwen3, arcee, apertus)")
    p.add_argument("src", help="local model directory (or a hub name already in the local cache)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty run directory")
    p.set_defaults(func=cmd_import_hf)
