"""lm-evaluation-harness adapter: a spud run as lm-eval model "spud".

    spud lm-eval --model spud --model_args run=runs/demo,device=cpu,batch_size=16 --tasks hellaswag
    spud lm-eval --model spud --model_args run=runs/demo,model=chat --tasks ...   (the SFT model)
    python -m spud.eval.lm_eval_adapter --model spud --model_args run=runs/demo --tasks ...

lm-eval (0.4.x) finds models only through its own registry, filled by importing the module that
defines them; it has no plugin entry points. So `lm_eval --model spud` alone does not know the
name: go through `cli_main` (what `spud lm-eval` and `python -m spud.eval.lm_eval_adapter` run),
or, in Python, `import spud.eval.lm_eval_adapter` before `lm_eval.simple_evaluate(model="spud")`.

Conventions, chosen to match how spud trains and how `spud serve` scores prompts:
- every context starts with BOS (every training document does);
- a context + continuation longer than the model's context is cut from the left;
- `loglikelihood` goes through spud.eval.batch_scorer (the scorer `spud eval` and `spud serve`
  use): longest first, right-padded (causal attention never looks at the padding), and returns
  (sum of continuation log-probs, whether every continuation token was the argmax);
- `loglikelihood_rolling` scores a whole text in disjoint windows of the model's context, each
  conditioned on the tokens just before it (the first on BOS), all texts' windows batched;
- `generate_until` decodes one request at a time with the KV cache; greedy unless `do_sample`
  (or, without `do_sample`, a temperature > 0); stops at any `until` string (cut there), at
  `max_gen_toks`, or at an end/eos/bos token.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import torch

try:
    # lm-eval fills its model registry with the built-in models only when the registry is still
    # empty at the first lookup; registering "spud" first would hide them ("hf",
    # "local-completions", ...), so load them before adding ours.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # optional dependency: say how to get it
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'spud[eval]' "
                      "(or pip install 'lm-eval[api]>=0.4.4,<0.5')") from e

from spud.errors import SpudError
from spud.eval import batch_scorer, scoring

DEFAULT_BATCH = 16
DEFAULT_MAX_GEN_TOKS = 256


def _as_bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(v)


def _batch_size(v) -> int:
    """lm-eval passes ints, strings ("8") or "auto"/"auto:4"; auto has no probing here."""
    if v is None:
        return DEFAULT_BATCH
    if isinstance(v, str) and v.startswith("auto"):
        return DEFAULT_BATCH
    n = int(v)
    if n < 1:
        raise SpudError(f"batch_size must be >= 1, got {v}")
    return n


class SpudLM(TemplateLM):
    """model_args: run=RUN (required), model=base|chat (default base: the pretrained model;
    chat: the `spud sft` model in RUN/chat), checkpoint=NAME|STEP of that model (default: latest),
    device=auto|cpu|cuda|mps, batch_size=N (default 16), max_gen_toks=N (default 256), seed=N.
    Which model and checkpoint were loaded is printed, kept as `model_kind`/`checkpoint`, and
    added to lm-eval's results["config"] (get_model_info).
    In Python, an already loaded model can be passed instead: SpudLM(model=m, tokenizer=tok)."""

    def __init__(self, run: str | None = None, checkpoint: str | None = None, device: str = "auto",
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, seed: int | str = 0,
                 model: torch.nn.Module | str | None = None, tokenizer=None, **unused):
        super().__init__()
        self.step: int | None = None
        if model is not None and not isinstance(model, str):
            if tokenizer is None:
                raise SpudError("SpudLM(model=...) also needs tokenizer=")
            self._model, self._tok = model, tokenizer
            self.checkpoint, self.model_kind = checkpoint, None
        else:
            if not run:
                raise SpudError("lm-eval model 'spud' needs model_args run=RUN_DIR "
                                "(e.g. --model_args run=runs/demo,device=cpu)")
            from spud.runs import choose_model, load_choice

            choice = choose_model(run, (model or "base").strip(), checkpoint)
            self._model, self._tok, _cfg = load_choice(choice, device or "auto")
            self.checkpoint, self.model_kind, self.step = str(choice.checkpoint), choice.model, choice.step
            note = (" (lm-eval's prompts are plain text: the chat template is not applied)"
                    if choice.model != "base" else "")
            print(f"spud lm-eval: {run}: {choice.describe()}{note}", file=sys.stderr, flush=True)
        self._model.eval()
        self.run = run
        self._batch = _batch_size(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self._seed = int(seed)
        self.unused_args = unused  # lm-eval may pass options meant for other backends

    # lm-eval merges its own settings (CLI --device, whose default is "cuda:0", --batch_size,
    # default 1) into model_args with `cls(**model_args, **settings)`, a TypeError when both name
    # the same key. Here model_args win, and lm-eval's default CUDA device on a machine without
    # CUDA becomes "auto" (with a warning) instead of a crash.
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string or ""), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        dev = str(extra.get("device", ""))
        if dev.startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"lm-eval asked for device {dev!r} but CUDA is not available; using "
                          "device=auto (pass device= in model_args to choose)", stacklevel=2)
            extra["device"] = "auto"
        return cls(**dict(arg_dict), **extra)

    def get_model_info(self) -> dict:
        """lm-eval merges this into results["config"]: the results say which model they measure."""
        return {"spud_run": self.run, "spud_model": self.model_kind, "spud_checkpoint": self.checkpoint,
                "spud_step": self.step}

    # ------------------------------------------------------------------------ lm-eval surface
    @property
    def eot_token_id(self) -> int:
        return self._tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._tok.bos_id  # an empty context is BOS, as a training document starts

    @property
    def max_length(self) -> int:
        return int(self._model.cfg.max_seq_len)

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def device(self) -> torch.device:
        try:
            return next(self._model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @property
    def tokenizer_name(self) -> str:
        return f"spud:{self._tok.sha256()[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self._tok.encode(string, add_bos=bool(add_special_tokens))

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self._tok.decode(list(tokens))

    # ---------------------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: [((context, continuation), context_ids, continuation_ids)] →
        [(sum log p(continuation | BOS + context), is_greedy)] in request order."""
        bos = self._tok.bos_id
        pairs = []
        for _key, ctx, cont in requests:
            ctx = list(ctx)
            if not ctx or ctx[0] != bos:
                ctx = [bos, *ctx]
            pairs.append((ctx, list(cont)))
        out = self.score_pairs(pairs)
        for (key, _c, _t), r in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return out

    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) → (sum log-prob of the continuation, is_greedy), through
        spud's batched scorer (longest first, at most batch_size rows per forward); ids are used
        as given (no BOS added)."""
        scores = batch_scorer.score(self._model, pairs, pad_id=self._tok.pad_id, max_rows=self._batch)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: disjoint windows of the model's context, the first
        conditioned on BOS, later ones on the tokens before them (lm-eval's rolling windows);
        the windows of all texts are scored together in one batched pass."""
        texts = [req.args[0] for req in requests]
        out = batch_scorer.score_rolling(self._model, [self.tok_encode(t) for t in texts],
                                         self.prefix_token_id, pad_id=self._tok.pad_id,
                                         max_rows=self._batch)
        for text, total in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # ------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """All requests in one batch through the serving engine (scoring.generate_texts)."""
        prompts, params = [], []
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            prompts.append(self.tok_encode(context, add_special_tokens=True))
            params.append(self.sampling_params(gen_kwargs, seed=self._seed + n))
        out = scoring.generate_texts(self._model, self._tok, prompts, params)
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1] if len(req.args) > 1 else {}), text)
        return out

    def sampling_params(self, gen_kwargs: dict, seed: int = 0):
        """lm-eval's gen_kwargs (until, max_gen_toks, temperature, do_sample, top_p, top_k, seed) as
        the engine's SamplingParams."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_new = int(gen_kwargs.pop("max_gen_toks", gen_kwargs.pop("max_new_tokens", self._max_gen_toks)))
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = gen_kwargs.pop("do_sample", None)
        if do_sample is not None and not _as_bool(do_sample):
            temperature = 0.0  # explicit greedy wins over a temperature
        elif do_sample is not None and temperature <= 0:
            temperature = 1.0  # do_sample without a temperature: sample at 1, as HF does
        top_p = gen_kwargs.pop("top_p", None)
        top_k = gen_kwargs.pop("top_k", None)
        seed = int(gen_kwargs.pop("seed", seed))
        return scoring.gen_params(max_new, until, temperature, seed,
                                  float(top_p) if top_p is not None else None,
                                  int(top_k) if top_k is not None else None)


# `python -m spud.eval.lm_eval_adapter` runs this file as __main__ first; only the importable
# module registers, or "spud" would name two different classes.
if __name__ != "__main__":
    register_model("spud")(SpudLM)


# ------------------------------------------------------------------------------------- CLI
def cli_main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line with model "spud" registered, e.g.
    `spud lm-eval --model spud --model_args run=RUN --tasks hellaswag` (everything after
    `lm-eval` is passed through unchanged; `lm-eval ls tasks` etc. work too)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    from spud.eval.lm_eval_adapter import cli_main as _registered_cli_main

    _registered_cli_main()
