"""What the Trainer measures besides the loss: validation loss/bpb, samples, MFU, auxiliary terms."""

from __future__ import annotations

import math
import os

import torch

from spud.hardware import raise_cpu_peak
from spud.runtime import autocast, compute_dtype
from spud.serve.sampling import generate
from spud.train import distributed


class TrainerEval:
    """Mixed into Trainer (trainer.py), whose model, loaders, tokenizer, config and process group
    these methods use; post-training trainers override `sample`."""

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Validation loss (nats/token) and bits per byte on a fixed set of val batches."""
        if not self.has_val:
            return None
        t = self.cfg.train
        loader = self.make_loader("val")
        n = max(1, min(t.eval_batches, loader.windows_per_epoch // (t.micro_batch_size * self.world)))
        self.model.eval()
        total_loss, total_tokens, total_bytes = 0.0, 0, 0.0
        for _ in range(n):
            batch = loader.next_batch()
            x, y = (v.to(self.device) for v in batch[:2])
            extra = self.batch_inputs(batch)
            with autocast(self.device):
                if self.dist.parallel == "fsdp" or extra:  # through __call__: FSDP gathers the weights
                    losses = self.model(x, y, return_per_token_loss=True, **extra).float()
                else:
                    losses = self.model.per_token_loss(x, y).float()
            valid = y >= 0  # -1 = no target (e.g. a prompt position in post-training)
            total_loss += losses.double().sum().item()
            total_tokens += int(valid.sum())
            total_bytes += (self.token_bytes[y.clamp(min=0)] * valid).sum().item()
        self.model.train()
        total_loss, total_tokens, total_bytes = distributed.all_sum(
            self.dist, [total_loss, total_tokens, total_bytes], self.device)
        total_tokens = int(total_tokens)
        loss = total_loss / total_tokens
        bpb = total_loss / (math.log(2) * total_bytes) if total_bytes else float("nan")
        return {"loss": loss, "bpb": bpb, "tokens": total_tokens}

    def sample(self) -> list[dict]:
        out = []
        t = self.cfg.train
        if not self.dist.is_main and self.dist.parallel != "fsdp":  # FSDP: all ranks must forward
            return out
        for prompt in t.sample_prompts:
            ids = self.tokenizer.encode(prompt, add_bos=True)
            new = list(generate(self.model, ids, t.sample_tokens, temperature=0.8, top_k=50,
                                seed=self.cfg.seed, stop_ids=[self.tokenizer.bos_id]))
            out.append({"prompt": prompt, "text": self.tokenizer.decode(new)})
        return out

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOP/s per device over the device's peak. tokens_per_s counts every rank's tokens,
        so it is divided by the world size; on CPU a run faster than the cached peak proves that
        figure was measured under load, and raises it (hardware.raise_cpu_peak)."""
        if not self.peak:
            return float("nan")
        per_device = tokens_per_s * self.flops_per_token / self.world
        if per_device > self.peak and self.device.type == "cpu" and not os.environ.get("SPUD_PEAK_FLOPS"):
            self.peak = raise_cpu_peak(per_device, compute_dtype(self.device))
        return per_device / self.peak

    def _aux_metrics(self) -> dict:
        """The objective's parts this step when it has auxiliary terms (MoE balancing, multi-token
        prediction; Transformer.train_stats): losses averaged and tokens per expert summed over
        ranks. {} for a plain model, whose metrics stay as they were."""
        stats = self.model.train_stats() if hasattr(self.model, "train_stats") else {}
        if not stats or not self.dist.enabled:
            return stats
        keys = sorted(stats)  # the same keys on every rank: one all-reduce, same order
        flat = [float(x) for k in keys
                for x in (sum(stats[k], []) if k == "expert_tokens" else [stats[k]])]
        total, out, i = distributed.all_sum(self.dist, flat, self.device), {}, 0
        for k in keys:
            if k == "expert_tokens":
                e = len(stats[k][0])
                out[k] = [[round(v) for v in total[i + r * e : i + (r + 1) * e]] for r in range(len(stats[k]))]
                i += e * len(stats[k])
            else:
                out[k], i = total[i] / self.world, i + 1
        return out
