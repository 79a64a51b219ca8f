"""The post-training verbs `spud sft`, `spud rl`, `spud dpo` (registered by spud.cli)."""

from __future__ import annotations


def cmd_sft(args) -> int:
    from spud.posttrain.sft import sft_cmd

    summary = sft_cmd(args.run, data=args.data, out=args.out, overrides=args.overrides or [], resume=args.resume)
    return 130 if summary.get("interrupted") else 0


def cmd_rl(args) -> int:
    from spud.posttrain.rl import rl_cmd

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    overrides = list(args.overrides or [])
    for flag, key in ((args.steps, "rl.steps"), (args.group, "rl.group")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    summary = rl_cmd(args.run, source=args.source, tasks=tasks, out=args.out, overrides=overrides,
                     resume=args.resume)
    return 130 if summary.get("interrupted") else 0


def cmd_dpo(args) -> int:
    from spud.posttrain.dpo import dpo_cmd

    summary = dpo_cmd(args.run, source=args.source, data=args.data, out=args.out,
                      overrides=args.overrides or [])
    return 130 if summary.get("interrupted") else 0


def cmd_vlm(args) -> int:
    from spud.posttrain.vlm import vlm_cmd

    overrides = list(args.overrides or [])
    for flag, key in ((args.tower_steps, "vlm.tower_steps"), (args.align_steps, "vlm.align_steps"),
                      (args.steps, "vlm.steps")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    summary = vlm_cmd(args.run, source=args.source, data=args.data, out=args.out, overrides=overrides,
                      resume=args.resume)
    return 130 if summary.get("interrupted") else 0


def register(verbs) -> None:
    p = verbs.add_parser("sft", help="supervised fine-tuning of a pretrained run into a chat model (RUN/chat)")
    p.add_argument("run", help="pretrained run directory")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. sft.max_steps=600 sft.lr_ratio=0.5")
    p.add_argument("--data", action="extend", nargs="+", default=None,
                   help="chat JSONL files as PATH[:WEIGHT], or 'builtin' (default: builtin)")
    p.add_argument("--out", default=None, help="output run directory (default RUN/chat)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted SFT run")
    p.set_defaults(func=cmd_sft)

    p = verbs.add_parser("rl", help="reinforcement learning from verifiable rewards (GRPO family) → RUN/rl")
    p.add_argument("run", help="run directory (with a chat model, or --from base)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. rl.lr=1e-4 rl.kl=0.02")
    p.add_argument("--from", dest="source", choices=["chat", "base"], default="chat",
                   help="which model of RUN to start from (default: chat)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated: arithmetic, program, or problem .jsonl files (default: arithmetic)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (rl.steps)")
    p.add_argument("--group", type=int, default=None, help="completions per prompt (rl.group)")
    p.add_argument("--out", default=None, help="output run directory (default RUN/rl)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted RL run exactly")
    p.set_defaults(func=cmd_rl)

    p = verbs.add_parser("dpo", help="direct preference optimisation from preference pairs → RUN/dpo")
    p.add_argument("run", help="run directory")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. dpo.beta=0.2 dpo.epochs=3")
    p.add_argument("--data", action="extend", nargs="+", default=None,
                   help="preference .jsonl files ({prompt|messages, chosen, rejected} per line) "
                        "and/or verifier:TASK (pairs sampled and judged by the RL verifiers)")
    p.add_argument("--from", dest="source", choices=["chat", "base", "rl"], default="chat",
                   help="which model of RUN to start from (default: chat)")
    p.add_argument("--out", default=None, help="output run directory (default RUN/dpo)")
    p.set_defaults(func=cmd_dpo)

    p = verbs.add_parser("vlm", help="add vision: an image encoder, align then multimodal SFT → RUN/vlm")
    p.add_argument("run", help="run directory (with a chat model, or --from base/rl/dpo)")
    p.add_argument("overrides", nargs="*",
                   help="config overrides, e.g. vlm.text_weight=0.5 model.vision.vit_layers=2")
    p.add_argument("--from", dest="source", choices=["chat", "base", "rl", "dpo"], default=None,
                   help="which model of RUN gets the vision tower (default: chat)")
    p.add_argument("--data", action="extend", nargs="+", default=None,
                   help="image chat files as PATH[:WEIGHT] (.jsonl with image parts, .parquet with image "
                        "bytes) and/or 'builtin' (default: builtin)")
    p.add_argument("--tower-steps", type=int, default=None,
                   help="steps of the tower stage, 0 = none (vlm.tower_steps)")
    p.add_argument("--align-steps", type=int, default=None, help="steps of the align stage (vlm.align_steps)")
    p.add_argument("--steps", type=int, default=None, help="steps of the multimodal SFT stage (vlm.steps)")
    p.add_argument("--out", default=None, help="output run directory (default RUN/vlm)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted spud vlm exactly")
    p.set_defaults(func=cmd_vlm)
