"""The `spud` command: parses arguments, loads the config, calls one stage. No logic of its own.

Heavy imports (torch, tokenizers) happen inside each verb so `spud --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from spud import __version__
from spud.errors import SpudError

OVERRIDES_HELP = "config overrides as key.sub=value (e.g. model.n_layers=4 train.max_steps=50)"


def resolve_recipe(name: str) -> Path:
    """A path to a YAML file, or the name of a built-in recipe (demo, tiny, gpt2-124m)."""
    p = Path(name)
    if p.is_file():
        return p
    builtin = Path(__file__).parent / "configs" / f"{p.stem if p.suffix == '.yaml' else name}.yaml"
    if builtin.is_file():
        return builtin
    known = sorted(q.stem for q in builtin.parent.glob("*.yaml"))
    raise SpudError(f"config not found: {name} (not a file, nor a built-in recipe: {', '.join(known)})")


def run_dir_arg(path: str) -> Path:
    """--out must be a directory (or not exist yet): fail before any work, not after the data build."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SpudError(f"--out {p} is a file, not a run directory; choose another path")
    return p


def _load(args):
    from spud.config import load_config

    return load_config(resolve_recipe(args.config), args.overrides)


# ------------------------------------------------------------------------------------- verbs
def cmd_train(args) -> int:
    from spud.config import load_config
    from spud.train.trainer import Trainer

    out = run_dir_arg(args.out)
    if args.resume and args.config and "=" in args.config and not Path(args.config).exists():
        # `spud train --resume --out RUN train.max_steps=400`: argparse took the override for CONFIG
        args.overrides, args.config = [args.config, *(args.overrides or [])], None
    if args.config is None:
        from spud.train.checkpoint import config_for_resume

        # --resume without CONFIG continues with the config stored in the checkpoint; config.yaml
        # (a copy for people) is compared with it, and used only while there is no checkpoint.
        cfg = config_for_resume(out, args.overrides or []) if args.resume else None
        if cfg is None:
            if not (args.resume and (out / "config.yaml").is_file()):
                raise SpudError("give a CONFIG (or --resume with a run directory that has config.yaml)")
            cfg = load_config(out / "config.yaml", args.overrides)
    else:
        cfg = _load(args)
    summary = Trainer(cfg, out, resume=args.resume).run()
    if summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 130 if summary["interrupted"] else 0
    val = summary["val"]
    if val:
        print(f"val bpb {val[0]['bpb']:.3f} (step {val[0]['step']}) → {val[-1]['bpb']:.3f} (step {val[-1]['step']})")
    print(f"run directory: {out}")
    return 130 if summary["interrupted"] else 0


def cmd_sample(args) -> int:
    from spud.sample import sample_to_terminal

    sample_to_terminal(args)
    return 0


def cmd_serve(args) -> int:
    from spud.serve.server import serve

    serve(args.run, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, checkpoint=args.checkpoint, device=args.device, model=args.model,
          prefill_chunk=args.prefill_chunk or None, prefix_cache_tokens=args.prefix_cache_tokens,
          speculate=args.speculate if args.speculate is not None else (4 if args.draft else 0),
          draft=args.draft, draft_model_kind=args.draft_model, request_timeout=args.request_timeout,
          decode_kernel=not args.no_decode_kernel)
    return 0


def cmd_chat(args) -> int:
    from spud.serve.chat_cli import chat

    if (args.run is None) == (args.url is None):
        raise SpudError("give either a run directory (local chat) or --url of a server, not both")
    return chat(args.run, args.url, api_key=args.api_key, system=args.system,
                temperature=args.temperature, max_tokens=args.max_tokens, model=args.model,
                checkpoint=args.checkpoint)


def cmd_eval(args) -> int:
    from spud.eval.runner import run_eval

    run_eval(args.run, tasks=args.tasks, limit=args.limit, fewshot=args.fewshot,
             checkpoint=args.checkpoint, device=args.device, seed=args.seed, model=args.model,
             chat=args.chat, force=args.force, samples=args.samples, temperature=args.temperature,
             ks=args.k, decontam_tokens=args.decontam_tokens)
    return 0



def cmd_export_weights(args) -> int:
    from spud.export import export_weights

    path = export_weights(args.run, checkpoint=args.checkpoint, out=args.out)
    print(f"wrote {path} (+ config.yaml beside it)")
    return 0


def cmd_report(args) -> int:
    from spud.eval.report import report_command

    report_command(args.run, samples=args.samples)
    return 0


def cmd_demo(args) -> int:
    from spud.demo import run_demo

    run_demo(run_dir_arg(args.out), quick=args.quick, rl=args.rl)
    return 0


def cmd_info(args) -> int:
    from spud.info import show_info

    show_info(run=args.run, preset=args.model, vocab=args.vocab, seq_len=args.seq_len)
    return 0


# ------------------------------------------------------------------------------------ parser
def _model_arg(p: argparse.ArgumentParser, help: str, default: str | None = None) -> None:
    from spud.model_kinds import MODELS

    p.add_argument("--model", choices=MODELS, default=default, help=help)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,10, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer, e.g. 1,10")
    return values


def _config_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("config", help="YAML recipe path or built-in recipe name (demo, tiny, gpt2-124m)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--out", required=out_required, help="run directory to write into")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spud", description="Spud: build a data mix, train a tokenizer, pretrain and sample a language model."
    )
    parser.add_argument("--version", action="version", version=f"spud {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    from spud import cli_data, cli_posttrain, cli_scaling  # noqa: PLC0415 - they import helpers from here

    cli_data.register(verbs)
    p = verbs.add_parser("train", help="pretrain a model (builds data and tokenizer first if needed)")
    p.add_argument("config", nargs="?", help="YAML recipe or built-in name; optional with --resume")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.set_defaults(func=cmd_train)

    cli_posttrain.register(verbs)

    p = verbs.add_parser("sample", help="stream text from a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="same seed → same text")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--checkpoint", default=None, help="step number or directory name (default: latest)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(func=cmd_sample)

    p = verbs.add_parser("serve", help="OpenAI-compatible API + chat web page for a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SPUD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SPUD_API_KEY)")
    p.add_argument("--max-batch", type=int, default=32, help="max sequences decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="max waiting requests (then 429)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per step between decode steps (0 = whole prompts)")
    p.add_argument("--prefix-cache-tokens", type=int, default=0,
                   help="keep up to N tokens of earlier requests' KV blocks for reuse by prompts "
                        "with the same prefix (0 = off)")
    p.add_argument("--checkpoint", default=None, help="step number or directory name (default: latest)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    from spud.model_kinds import MODELS

    _model_arg(p, "which model to serve (default: chat if RUN has one from spud sft, else base)")
    p.add_argument("--speculate", type=int, default=None, metavar="K",
                   help="speculative decoding: draft K tokens per step, verified in one forward "
                        "(prompt lookup, or --draft's model; default 0 = off, 4 with --draft)")
    p.add_argument("--draft", default=None, metavar="RUN2",
                   help="draft model for speculative decoding: a smaller run with the same tokenizer")
    p.add_argument("--draft-model", default=None, choices=[m for m in MODELS if m != "vlm"],
                   help="which model of RUN2 drafts (default: chat if RUN2 has one, else base)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="fail a request still unfinished S seconds after it arrived (408; default: none)")
    p.add_argument("--no-decode-kernel", action="store_true",
                   help="decode with the model's own forward instead of the lean CPU decode step "
                        "(spud.serve.decode_kernel), e.g. to save the copy of the weights it keeps")
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("chat", help="chat in the terminal with a run (local) or a server (--url)")
    p.add_argument("run", nargs="?", help="run directory (local, no server)")
    p.add_argument("--url", default=None, help="base URL of an OpenAI-compatible server")
    p.add_argument("--api-key", default=os.environ.get("SPUD_API_KEY"), help="default: $SPUD_API_KEY")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=256)
    _model_arg(p, "which model of RUN (default: chat if RUN has one from spud sft, else base)")
    p.add_argument("--checkpoint", default=None, help="step number or directory name (default: latest)")
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("eval", help="benchmark a run on built-in or local-file tasks")
    p.add_argument("run", help="run directory")
    p.add_argument("--tasks", default="arithmetic",
                   help="comma-separated: built-in names, or kind:path.jsonl (e.g. gsm8k:test.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    p.add_argument("--fewshot", type=int, default=0, help="k examples in each prompt")
    p.add_argument("--checkpoint", default=None, help="step number or directory name (default: latest)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--seed", type=int, default=1234)
    _model_arg(p, "which model of RUN: base (the pretrained run, default) or chat (RUN/chat from spud sft)",
               default="base")
    p.add_argument("--chat", action="store_true",
                   help="render prompts with the chat template (needs --model chat unless --force)")
    p.add_argument("--force", action="store_true",
                   help="allow chat prompts on the base model or plain prompts on the chat model")
    p.add_argument("--samples", type=int, default=1, help="completions per generative/code example (pass@k)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature for --samples > 1 (0 = greedy, one sample)")
    p.add_argument("--k", type=_int_list, default=None, metavar="K[,K...]",
                   help="pass@k values to report, each <= --samples (default: 1 and 10 where they fit)")
    p.add_argument("--decontam-tokens", type=int, default=200_000_000, metavar="N",
                   help="scan at most N pretraining tokens for eval examples (13-gram/fact overlap; "
                        "0 = skip the check; default 200M)")
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("export-weights", help="consolidate a checkpoint (also sharded) into one safetensors file")
    p.add_argument("run", help="run directory")
    p.add_argument("--checkpoint", default=None, help="step number or directory name (default: latest)")
    p.add_argument("--out", default=None, help="output file (default RUN/export/model.safetensors)")
    p.set_defaults(func=cmd_export_weights)

    from spud.export.commands import add_parsers as add_interop_parsers  # export hf|gguf, import hf

    add_interop_parsers(verbs)

    p = verbs.add_parser("report", help="write RUN/report.md with plots: curves, throughput, scores, data mix")
    p.add_argument("run", help="run directory")
    p.add_argument("--samples", type=int, default=5, help="how many of the last samples to include")
    p.set_defaults(func=cmd_report)

    verbs.add_parser("lm-eval", help="lm-evaluation-harness with the spud model registered "
                     "(spud lm-eval --model spud --model_args run=RUN --tasks ...)", add_help=False)

    cli_scaling.register(verbs)

    p = verbs.add_parser("demo", help="the whole pipeline on the built-in data, on CPU")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a < 2 minute version")
    p.add_argument("--rl", action="store_true", help="add a short RL stage after SFT (RUN/rl)")
    p.set_defaults(func=cmd_demo)

    p = verbs.add_parser("info", help="facts about a run, or a model preset's size and FLOPs")
    p.add_argument("run", nargs="?", help="run directory")
    p.add_argument("--model", help="preset name (or 'all') to describe")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary size assumed for --model")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: preset's)")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own flags: hand them over untouched
        try:
            from spud.eval.lm_eval_adapter import cli_main
        except ImportError as e:
            print(f"error: lm-eval is not installed ({e}); pip install 'spud[eval]'", file=sys.stderr)
            return 2
        cli_main(argv[1:])
        return 0
    parser = build_parser()
    # Overrides may come after options (`--out RUN model.n_layers=4`): argparse leaves those
    # over, so pick up every leftover key=value and reject anything else.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    try:
        return args.func(args)
    except SpudError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a file where a directory should be, ...
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
