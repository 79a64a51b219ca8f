"""Visual question answering on the held-out built-in pictures (`spud eval RUN --model vlm --tasks vqa`).

Every picture comes from the held-out split of spud.data.images: its fact (the number and its
font, the count with its shape and colour, the bar heights, ...) is one no training picture
shows, and before scoring the eval regenerates the model's training pictures and checks by image
hash that none of the eval's is among them (`image_overlap`, 0 by construction).

Two task specs:
- `vqa`: questions in the training wordings, one task per question type (`vqa/number`,
  `vqa/count`, ...), exact match of the answer;
- `vqa_new_wordings`: the same question types asked in wordings no training conversation uses.

An answer is compared after light normalisation (first line, lower case, surrounding spaces,
quotes and a final full stop removed): "47." matches 47, "The number is 47" does not.
Generation is greedy, batched through the model directly (prompts of equal length share a KV
cache), with the image embeddings placed at the prompt's <|image|> ids.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from spud.data import images
from spud.errors import SpudError
from spud.eval import scoring

SPECS = ("vqa", "vqa_new_wordings")
QUESTION_TYPES = ("number", "count", "word", "locate", "bar", "arithmetic", "colour", "shape")
PER_TYPE = 200
MAX_NEW_TOKENS = 8


@dataclass
class VQAItem:
    qtype: str
    question: str
    answer: str
    image: object  # PIL image
    fact: str
    kind: str


def split_specs(tasks: str) -> tuple[list[str], str]:
    """'vqa,arithmetic' → (['vqa'], 'arithmetic'): the vqa specs are run here, the rest by spud.eval.tasks."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    return [t for t in names if t in SPECS], ",".join(t for t in names if t not in SPECS)


def vqa_items(size: int, per_type: int, seed: int, new_wordings: bool = False,
              fonts: tuple[str, ...] | None = None, held_out: bool = True) -> list[VQAItem]:
    """per_type questions of each type about held-out pictures (or, held_out=False, new pictures
    of training-split facts: benchmarks/vlm_dev.py's tuning set), deterministic in the arguments."""
    samples = images.generate(per_type * len(images.KINDS), seed, held_out=held_out, size=size, fonts=fonts,
                              held_out_wordings=new_wordings)
    by_type: dict[str, list[VQAItem]] = {t: [] for t in QUESTION_TYPES}
    for s in samples:
        for qtype, q, a in s.qa:
            if len(by_type[qtype]) < per_type:
                by_type[qtype].append(VQAItem(qtype, q, a, s.image, s.fact, s.kind))
    return [it for t in QUESTION_TYPES for it in by_type[t]]


def normalise(text: str) -> str:
    line = text.strip().split("\n", 1)[0].strip().lower()
    return line.strip("\"'").rstrip(".").strip().strip("\"'")


def prompt_ids(tok, question: str, tokens_per_image: int) -> list[int]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return tok.render_chat(msgs, add_generation_prompt=True, image_tokens=tokens_per_image)[0]


def greedy_answers(model, tok, questions: list[str], pictures: list, max_new_tokens: int = MAX_NEW_TOKENS,
                   batch: int = 64) -> list[str]:
    """Greedy answers, one picture per question, through the serving engine (spud.serve.batch:
    the path `spud serve --model vlm` answers image requests by), `batch` sequences at a time."""
    from spud.model.vision import load_image
    from spud.serve.batch import complete_many
    from spud.serve.engine_types import SamplingParams
    from spud.serve.prompt_images import PromptImages

    vcfg = model.cfg.vision
    prompts = [prompt_ids(tok, q, vcfg.tokens_per_image) for q in questions]
    images = [PromptImages(load_image(p, vcfg)[None], tok.image_id, vcfg.tokens_per_image) for p in pictures]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0) for _ in prompts]
    return [c.text for c in complete_many(model, tok, prompts, params, max_batch=batch, images=images)]


def answer_rows(model, tok, items: list[VQAItem]) -> dict[str, list[dict]]:
    """Greedy answers to the items, scored: {question type: one row per question}."""
    outputs = greedy_answers(model, tok, [it.question for it in items], [it.image for it in items])
    rows_by_type: dict[str, list[dict]] = {}
    for it, text in zip(items, outputs):
        rows_by_type.setdefault(it.qtype, []).append({
            "qtype": it.qtype, "kind": it.kind, "fact": it.fact, "question": it.question,
            "target": it.answer, "output": text, "correct": normalise(text) == it.answer,
            "image_sha256": images.image_hash(it.image)})
    return rows_by_type


def training_overlap(cfg, eval_items: list[VQAItem]) -> dict:
    """Regenerate the built-in training pictures of the model's `spud vlm` stages and count
    eval pictures among them by image hash."""
    v = getattr(cfg, "vlm", None)
    if v is None or not v.base_checkpoint or "builtin" not in [s.split(":")[0] for s in v.data]:
        return {"checked": False, "reason": "the model did not train on the built-in pictures"}
    size = cfg.model.vision.image_size
    kinds = tuple(v.builtin_kinds)
    train = images.generate(v.builtin_images, cfg.seed, held_out=False, size=size, kinds=kinds)
    train += images.generate(v.val_images, cfg.seed + 1, held_out=False, size=size, kinds=kinds)
    seen = {images.image_hash(s.image) for s in train}
    hits = sum(images.image_hash(it.image) in seen for it in eval_items)
    return {"checked": True, "training_images": len(seen), "eval_images": len(eval_items), "overlap": hits}


def run_vqa(model, tok, cfg, specs: list[str], limit: int | None, seed: int, out_dir: Path, console) -> dict:
    """→ {task name: metrics in spud.eval.runner's shape}; rows written to out_dir/<task>.jsonl."""
    if getattr(model.cfg, "vision", None) is None or tok.image_id is None:
        raise SpudError("the vqa tasks need a model that reads images (a vision tower and an <|image|> "
                        "token); evaluate --model vlm, made by: spud vlm RUN")
    results = {}
    for spec in specs:
        per_type = min(limit or PER_TYPE, PER_TYPE)
        items = vqa_items(model.cfg.vision.image_size, per_type, seed, new_wordings=spec == "vqa_new_wordings")
        start = time.monotonic()
        rows_by_type = answer_rows(model, tok, items)
        seconds = time.monotonic() - start
        overlap = training_overlap(cfg, items)
        if overlap.get("overlap"):
            console.print(f"[red]warning: {overlap['overlap']} eval pictures occur among the training pictures")
        for qtype, rows in rows_by_type.items():
            name = f"{spec}/{qtype}"
            n, value = len(rows), sum(r["correct"] for r in rows) / len(rows)
            results[name] = {"kind": "gen", "n": n, "seconds": round(seconds * n / len(items), 3),
                             "baseline": 0.0, "source": "builtin held-out pictures",
                             "metrics": {"exact_match": value}, "metric": "exact_match", "value": value,
                             "stderr": scoring.binomial_stderr(value, n), "stderr_method": "binomial",
                             "centered": scoring.centered(value, 0.0), "image_overlap": overlap,
                             "generation": "greedy through the model (batched by prompt length)"}
            with (out_dir / f"{spec}_{qtype}.jsonl").open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return results
