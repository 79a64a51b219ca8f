"""`spud export-weights RUN`: any checkpoint (single-file or sharded DCP, saved at any number of
ranks) → one consolidated model.safetensors with the run's config beside it.

Runs in one process without a process group: a DCP checkpoint is read into a full, unsharded
model (DCP reshards on load), so no torchrun is needed to export a run trained on many GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_model

from spud.config import save_config, validate_config
from spud.model.registry import build_model
from spud.train import checkpoint as ckpt_io


def export_weights(run_dir: str | Path, checkpoint: str | int | None = None,
                   out: str | Path | None = None) -> Path:
    """Write the weights of `checkpoint` (default: latest complete) of `run_dir` to `out`
    (default RUN/export/model.safetensors) and the resolved config to config.yaml next to it.
    The safetensors metadata also carries the config (JSON) and the source checkpoint. → out."""
    run = Path(run_dir)
    ckpt = ckpt_io.resolve_checkpoint(run, checkpoint)
    state = ckpt_io.read_state(ckpt)
    cfg = validate_config(state["config"], f"{ckpt}/state.json")
    model = build_model(cfg.model)
    if ckpt_io.is_sharded(ckpt):
        ckpt_io.load_sharded(ckpt, model)
    else:
        ckpt_io.load_weights(ckpt, model, "cpu")
    out = Path(out) if out is not None else run / "export" / "model.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    meta = {"spud_config": json.dumps(cfg.model_dump(mode="json")), "checkpoint": ckpt.name,
            "step": str(state["step"])}
    save_model(model, str(tmp), metadata=meta)
    tmp.replace(out)
    save_config(cfg, out.parent / "config.yaml")
    return out
