"""The `spud data …`, `spud mix …` and `spud tokenizer …` verbs (registered by spud.cli)."""

from __future__ import annotations

from pathlib import Path

from spud.cli import OVERRIDES_HELP, _config_args, _load, resolve_recipe, run_dir_arg


def cmd_data_build(args) -> int:
    from spud.config import save_config
    from spud.data.build import build_dataset
    from spud.tokenizer import Tokenizer
    from spud.train.trainer import resolve_vocab

    if args.shard:  # a bad spec fails before the config is even read
        from spud.data.merge import parse_shard

        parse_shard(args.shard)
    if args.workers is not None:  # the config field's validation (and message) applies
        args.overrides = [*(args.overrides or []), f"data.workers={args.workers}"]
    cfg, out = _load(args), run_dir_arg(args.out)
    if args.shard:
        from spud.data.merge import build_part

        part = build_part(cfg, out, args.shard)
        print(f"wrote part {part['shard'][0]}/{part['shard'][1]} to {out}/part; join all parts with "
              f"`spud data merge PART_DIRS... --out RUN`")
        return 0
    manifest = build_dataset(cfg, out, progress=not args.no_progress)
    save_config(resolve_vocab(cfg, Tokenizer.load(out / "tokenizer.json")), out / "config.yaml")
    print(f"wrote {args.out}/data/manifest.json: {manifest['train_tokens']:,} train tokens, "
          f"{manifest['val_tokens']:,} val tokens in {len(manifest['shards'])} shards")
    return 0


def cmd_data_merge(args) -> int:
    from spud.data.merge import merge_parts

    out = run_dir_arg(args.out)
    manifest = merge_parts(args.parts, out, progress=not args.no_progress)
    print(f"wrote {args.out}/data/manifest.json: {manifest['train_tokens']:,} train tokens, "
          f"{manifest['val_tokens']:,} val tokens in {len(manifest['shards'])} shards")
    return 0


def cmd_data_inspect(args) -> int:
    from spud.data.inspect import inspect_cmd

    inspect_cmd(args.run, rule=args.rule, n=args.n)
    return 0


def cmd_tokenizer_train(args) -> int:
    from spud.data.build import validate_sources
    from spud.data.mix import sample_texts_for_tokenizer
    from spud.tokenizer import train_tokenizer

    cfg = _load(args)
    validate_sources(cfg)
    out = run_dir_arg(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(sample_texts_for_tokenizer(cfg), cfg.tokenizer)
    tok.save(out / "tokenizer.json")
    print(f"wrote {out / 'tokenizer.json'}: {tok.vocab_size} tokens, sha256 {tok.sha256()[:12]}")
    return 0


def cmd_tokenizer_encode(args) -> int:
    from spud.tokenizer import Tokenizer

    tok = Tokenizer.load(Path(args.run) / "tokenizer.json")
    ids = tok.encode(args.text)
    print(" ".join(str(i) for i in ids))
    print(" | ".join(repr(tok.decode([i])) for i in ids))
    return 0


def cmd_mix_search(args) -> int:
    from spud.data.merge import parse_shard
    from spud.data.mixsearch import run_search
    from spud.plan.ladder import parse_tokens

    worker = parse_shard(args.worker, "--worker") if args.worker else None
    flops = parse_tokens(args.proxy_flops)[0] if args.proxy_flops else None
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    res = run_search(resolve_recipe(args.config), targets, args.proxies, float(flops), run_dir_arg(args.out),
                     overrides=args.overrides, seed=args.seed, worker=worker)
    if worker is not None:
        left = res["missing"]
        print(f"worker {args.worker}: proxies {res['trained']} done; "
              + (f"{len(left)} still missing ({left[:8]}{' …' if len(left) > 8 else ''}); " if left else
                 "every proxy is done; ")
              + "run the same command without --worker to fit the mix once all workers finished")
        return 0
    print(f"searched mix: {res['weights']} (CV Spearman {res['cv_spearman']:.3f}) → {args.out}/mix.yaml")
    return 0


def register(verbs) -> None:
    data = verbs.add_parser("data", help="build the data mix into token shards").add_subparsers(dest="action")
    data.required = True
    p = data.add_parser("build", help="tokenize the mix into RUN/data/ (trains the tokenizer if RUN has none)")
    _config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", metavar="i/N", help="build only part i (from 0) of N into --out; "
                   "join the parts with `spud data merge`")
    p.add_argument("--workers", metavar="N", help="worker processes for the quality rules, dedup hashing "
                   "and tokenization (sets data.workers; 1 = none; default 0 = automatic); same output for any N")
    p.set_defaults(func=cmd_data_build)
    p = data.add_parser("merge", help="join the parts of a sharded build (--shard i/N) into RUN/data/")
    p.add_argument("parts", nargs="+", help="the part directories (each --out of a --shard build)")
    p.add_argument("--out", required=True, help="run directory to write data/ and tokenizer.json into")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_merge)
    mx = verbs.add_parser("mix", help="learn the data mixture from proxy runs (RegMix)").add_subparsers(dest="action")
    mx.required = True
    p = mx.add_parser("search", help="train proxies on sampled mixtures, regress, search → DIR/mix.yaml")
    p.add_argument("config", help="YAML recipe (its sources are the mixture's components)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--target", required=True, help="source name(s) whose validation bpb to minimise, comma-separated")
    p.add_argument("--proxies", type=int, default=64, help="proxy runs (default 64)")
    p.add_argument("--proxy-flops", required=True, help="training FLOPs per proxy, e.g. 2e12")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--worker", metavar="i/N", help="train only the proxies numbered i mod N (numbered from 0, "
                   "e.g. a Slurm array task) and stop before the fit; then run the command without --worker")
    p.set_defaults(func=cmd_mix_search)
    p = data.add_parser("inspect", help="show documents the cleaning rules and dedup dropped (and kept ones)")
    p.add_argument("run", help="run directory with a built data/")
    p.add_argument("--rule", default=None, help="only this reason, e.g. mean_word_length or duplicate:near")
    p.add_argument("--n", type=int, default=5, help="documents per reason (default 5)")
    p.set_defaults(func=cmd_data_inspect)

    tk = verbs.add_parser("tokenizer", help="train or inspect the BPE tokenizer").add_subparsers(dest="action")
    tk.required = True
    p = tk.add_parser("train", help="train byte-level BPE on a sample of the mix → RUN/tokenizer.json")
    _config_args(p)
    p.set_defaults(func=cmd_tokenizer_train)
    p = tk.add_parser("encode", help="show how RUN's tokenizer splits TEXT")
    p.add_argument("run")
    p.add_argument("text")
    p.set_defaults(func=cmd_tokenizer_encode)
