"""The planning and scaling verbs: `spud plan`, `ladder`, `fit`, `ablate` (registered by spud.cli)."""

from __future__ import annotations

from spud.cli import OVERRIDES_HELP, resolve_recipe, run_dir_arg


def cmd_plan(args) -> int:
    from spud.plan.planner import plan_cmd

    plan_cmd(budget=args.budget, gpu=args.gpu, gpus=args.gpus, days=args.days, dollars=args.dollars,
             law=args.law, mfu=args.mfu, unique_tokens=args.unique_tokens,
             serve_requests_per_day=args.serve_requests_per_day, serve_prompt_tokens=args.serve_prompt_tokens,
             serve_completion_tokens=args.serve_completion_tokens, serve_latency_ms=args.serve_latency_ms,
             horizon_days=args.horizon_days, hardware=args.hardware, json=args.json, seq_len=args.seq_len,
             vocab_size=args.vocab_size, precision=args.precision, vision_images=args.vision_images,
             vision_config=args.vision_config, vision_text_tokens=args.vision_text_tokens,
             vision_tower_images=args.vision_tower_images, vision_readout_outputs=args.vision_readout_outputs)
    return 0


def cmd_ladder(args) -> int:
    from spud.plan.ladder import ladder_cmd

    ladder_cmd(str(resolve_recipe(args.config)), sizes=args.sizes, tokens=args.tokens, out=args.out,
               overrides=args.overrides)
    return 0


def cmd_fit(args) -> int:
    from spud.plan.fit import fit_cmd

    fit_cmd(args.ladder, out=args.out, bootstrap=args.bootstrap)
    return 0


def cmd_ablate(args) -> int:
    from spud.train.ablate import ablate_cmd

    ablate_cmd(resolve_recipe(args.config), vary=args.vary, variants_file=args.variants, flops=args.flops,
               seeds=args.seeds, heldout=args.heldout, out=run_dir_arg(args.out), overrides=args.overrides,
               evals=args.evals, heldout_tokens=args.heldout_tokens)
    return 0


def register(verbs) -> None:
    p = verbs.add_parser("plan", help="compute-optimal size, tokens, time, cost and serving split")
    g = p.add_argument_group("budget (give one)")
    g.add_argument("--budget", type=float, help="training FLOPs, e.g. 1e21")
    g.add_argument("--dollars", type=float, help="money to spend on accelerator hours")
    g.add_argument("--gpu", help="hardware profile: h100, h200, a100, b200, l4, cpu (default h100)")
    g.add_argument("--gpus", type=int, help="accelerators in the pool")
    g.add_argument("--days", type=float, help="wall-clock days available")
    p.add_argument("--law", help="fit JSON from `spud fit` (default: published Chinchilla law)")
    p.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation (default: profile's)")
    p.add_argument("--unique-tokens", type=float, help="unique tokens in your data (warns on >4 epochs)")
    p.add_argument("--serve-requests-per-day", type=float, help="serving demand to reserve accelerators for")
    p.add_argument("--serve-prompt-tokens", type=int, default=512)
    p.add_argument("--serve-completion-tokens", type=int, default=256)
    p.add_argument("--serve-latency-ms", type=float, help="per-token latency target for serving")
    p.add_argument("--horizon-days", type=float, help="serving horizon (default: --days)")
    p.add_argument("--hardware", help="YAML file adding or overriding hardware profiles")
    p.add_argument("--json", help="also write the plan as JSON to this path")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"])
    v = p.add_argument_group("vision stages (spud vlm)")
    v.add_argument("--vision-images", type=float, help="images the vision stages train on: adds their compute, "
                   "time, cost and memory to the plan")
    v.add_argument("--vision-config", help="YAML with the model.vision section (default: the built-in ViT)")
    v.add_argument("--vision-text-tokens", type=int, default=32, help="question + answer tokens per image")
    v.add_argument("--vision-tower-images", type=float, help="pictures of the tower stage (vlm.tower_steps × "
                   "vlm.tower_batch_size; default: spud vlm's; 0: no tower stage)")
    v.add_argument("--vision-readout-outputs", type=int, help="the tower stage's read-out logits per picture "
                   "(answer positions × classes; default: the built-in pictures with the demo's tokenizer, 475)")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("ladder", help="train a grid of small models × token budgets for a scaling fit")
    p.add_argument("config", help="YAML recipe or built-in name")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--sizes", required=True, help="comma-separated d_model values or preset names")
    p.add_argument("--tokens", required=True, help="comma-separated token budgets (50k,2e5,1M)")
    p.add_argument("--out", required=True, help="ladder directory (ladder.jsonl + one run per rung)")
    p.set_defaults(func=cmd_ladder)

    p = verbs.add_parser("fit", help="fit L(N, D) = E + A/N^α + B/D^β to a ladder")
    p.add_argument("ladder", help="ladder.jsonl (or its directory)")
    p.add_argument("--out", help="output directory (default: <ladder dir>/fit)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for intervals")
    p.set_defaults(func=cmd_fit)

    p = verbs.add_parser("ablate", help="train recipe variants at equal training FLOPs, compare on held-out text")
    p.add_argument("config", help="base YAML recipe or built-in name")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + "; applied to every variant")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values (repeatable: the variants are the cartesian product)")
    p.add_argument("--variants", help="YAML file of named variants (NAME: {key: value, ...}) instead of --vary")
    p.add_argument("--flops", required=True, help="training FLOPs per run, e.g. 2e13 (or a list: 5e12,1e13,2e13)")
    p.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds base, base+1, ...")
    p.add_argument("--heldout", action="append", default=None, metavar="NAME|DIR|NAME=DIR",
                   help="held-out corpus to score on (repeatable; default: stdlib_prose)")
    p.add_argument("--evals", type=int, default=8, help="validation points per run (the plot's curve)")
    p.add_argument("--heldout-tokens", type=int, default=32768, help="tokens scored per held-out corpus")
    p.add_argument("--out", required=True, help="ablation directory (shared data, one run per variant)")
    p.set_defaults(func=cmd_ablate)
