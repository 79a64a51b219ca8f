"""The decoder-only Transformer shell and Hugging Face Llama weight export (caches: kv_cache.py).

The shell owns what every architecture shares (token embedding, rotary tables, final norm, LM
head, loss, init, cache bookkeeping); the per-layer computation comes from the block registry
(registry.py), so a new architecture never touches this file.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spud.config import ModelConfig
from spud.errors import SpudError
from spud.model.kv_cache import KVCache, SlotKVCache
from spud.model.layers import RMSNorm, Rotary, init_weights, linear_cross_entropy
from spud.model.moe import MoE
from spud.model.mtp import MTPHead, mtp_inputs
from spud.model.registry import get_block

__all__ = ["KVCache", "SlotKVCache", "Transformer"]

IGNORE_INDEX = -1


class Transformer(nn.Module):
    """Token embedding → N registry blocks → RMSNorm → LM head (optionally tied, soft-capped).

    Around the blocks the shell adds the cross-layer options, each a config switch that adds
    parameters only when on (so the default's weight names never change):
    - x0_mix: before block i, x ← resid_lambdas[i]·x + x0_lambdas[i]·x0, where x0 is the
      embedding output (modded-nanogpt); init (1, 0) = the plain residual stream.
    - unet_skips: the outputs of the first n_layers//2 blocks are added, last-in first-out with
      learnable weights skip_weights (init 1), to the inputs of the last n_layers//2 blocks.
    - value_embeds=n: n extra embedding tables; table j, scaled by ve_lambdas, is added to the
      attention values of layer j and of layer n_layers-n+j (modded-nanogpt).
    - mtp_depth: multi-token prediction heads, training only (mtp.py).
    All of them act per position, so cached decoding equals the full forward.
    """

    # Mean loss through layers.linear_cross_entropy; False = plain logits + F.cross_entropy
    # (same numbers, kept as the reference the fused path is tested against).
    fused_loss: bool = True

    def __init__(self, cfg: ModelConfig, blocks: list[nn.Module] | None = None) -> None:
        """blocks: prebuilt blocks, one per layer (flops.py passes shared ones to count fast);
        None builds them from the registry."""
        super().__init__()
        if cfg.vocab_size is None:
            raise SpudError(
                "model.vocab_size is not set; train or load a tokenizer first (the run fills it "
                "in from the tokenizer) or set model.vocab_size explicitly"
            )
        self.cfg = cfg
        block_cls = get_block(cfg.block)
        if cfg.value_embeds and "value_embed" not in inspect.signature(block_cls.forward).parameters:
            raise SpudError(
                f"model.block={cfg.block!r} takes no value_embed argument, so it cannot use "
                "model.value_embeds; set model.value_embeds=0 or add the argument to the block"
            )
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.rotary = Rotary(cfg.dim_head, cfg.max_seq_len, cfg.rope_theta)
        if blocks is None:
            blocks = [block_cls(cfg, i) for i in range(cfg.n_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        n = cfg.n_layers
        if cfg.x0_mix:
            self.resid_lambdas = nn.Parameter(torch.ones(n))
            self.x0_lambdas = nn.Parameter(torch.zeros(n))
        self.n_skips = n // 2 if cfg.unet_skips else 0
        if self.n_skips:
            self.skip_weights = nn.Parameter(torch.ones(self.n_skips))
        # layer → (value-embedding table, its lambda); the first and the last n layers.
        self.ve_of_layer: dict[int, tuple[int, int]] = {}
        if cfg.value_embeds:
            nv = cfg.value_embeds
            kv_dim = cfg.kv_heads * cfg.dim_head
            self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, kv_dim) for _ in range(nv))
            self.ve_lambdas = nn.Parameter(torch.ones(2 * nv))
            for j in range(nv):
                self.ve_of_layer[j] = (j, j)
                self.ve_of_layer[n - nv + j] = (j, nv + j)
        if cfg.mtp_depth:
            self.mtp = nn.ModuleList(MTPHead(cfg, block_cls, k + 1) for k in range(cfg.mtp_depth))
        self.moe_layers = [m for m in self.modules() if isinstance(m, MoE)]
        if not self.embed.weight.is_meta:  # a meta model (flops.py) has no values to set
            init_weights(self, cfg.init_std, cfg.n_layers, cfg.zero_init_residual)
        if cfg.tie_embeddings:
            # Share the Parameter itself so optimizers and state_dict see one tensor.
            self.lm_head.weight = self.embed.weight
        if cfg.vision is not None:  # a VLM (vision.py); a text model has no trace of it
            from spud.model.vision import VisionTower

            self.vision = VisionTower(cfg, meta=self.embed.weight.is_meta)
        self._stats: dict[str, tuple[torch.Tensor, int]] = {}

    # ------------------------------------------------------------------------------ forward
    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
                      image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d_model): everything except the LM head."""
        return self.norm(self._trunk(idx, kv_cache, image_embeds))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) from vision.load_image → (N, tokens_per_image, d_model)."""
        if self.cfg.vision is None:
            raise SpudError("this model has no vision tower (model.vision is not set): it reads "
                            "text only; add one with spud.model.vision.add_vision (spud vlm)")
        return self.vision(pixels)

    def _trunk(self, idx: torch.Tensor, kv_cache: KVCache | None,
               image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the last block (before the final norm). image_embeds
        (M, d_model) replace the embeddings of the M <|image|> ids in idx (vision.py)."""
        if idx.dim() != 2:
            raise SpudError(f"expected token ids of shape (batch, time), got {tuple(idx.shape)}")
        b, t = idx.shape
        if kv_cache is not None:
            kv_cache.check(b, t)
        x = self.embed(idx)
        if image_embeds is not None:
            from spud.model.vision import merge_image_embeds

            image_id = self.cfg.vision.image_token_id if self.cfg.vision is not None else None
            x = merge_image_embeds(x, idx, image_embeds, image_id)
        if self.drop is not None:
            x = self.drop(x)
        x0, skips, n = x, [], len(self.blocks)
        for i, block in enumerate(self.blocks):
            if i >= n - self.n_skips:
                x = x + self.skip_weights[i - (n - self.n_skips)] * skips.pop()
            if self.cfg.x0_mix:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if i in self.ve_of_layer:
                table, lam = self.ve_of_layer[i]
                ve = self.ve_lambdas[lam] * self.value_embeds[table](idx)
                x = block(x, self.rotary, kv_cache, i, value_embed=ve)
            else:
                x = block(x, self.rotary, kv_cache, i)
            if i < self.n_skips:
                skips.append(x)
        if kv_cache is not None:
            kv_cache.advance(t)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(h)
        cap = self.cfg.logit_softcap
        if cap is not None:
            # Soft-capping bounds logits smoothly (Gemma 2), keeping gradients alive at the cap.
            out = torch.tanh(out / cap) * cap
        return out

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_per_token_loss: bool = False,
        image_embeds: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) without targets; with targets the mean cross-entropy (scalar), or
        the (B, T) per-token loss when return_per_token_loss (ignored positions → 0).

        Targets equal to -1 are ignored (padding / document masking). In training mode the
        scalar is the training objective: the cross-entropy plus the enabled auxiliary losses
        (MoE balancing, multi-token prediction); `train_stats` reports the parts.
        Images: image_embeds (M, d_model) for the M <|image|> ids of idx, or images (N, 3, S, S),
        encoded here (encode_images) and placed the same way.
        """
        if images is not None:
            if image_embeds is not None:
                raise SpudError("pass images or image_embeds, not both")
            image_embeds = self.encode_images(images)
        x = self._trunk(idx, kv_cache, image_embeds)
        h = self.norm(x)
        if targets is None:
            return self.logits(h)
        if targets.shape != idx.shape:
            raise SpudError(
                f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}"
            )
        if return_per_token_loss:
            return self._cross_entropy(h, targets, per_token=True)
        loss = self._cross_entropy(h, targets)
        if not self.training or not (self.moe_layers or self.cfg.mtp_depth):
            return loss
        objective = loss
        self._record("lm_loss", loss)
        if self.cfg.mtp_depth:
            mtp = self._mtp_loss(x, targets)
            objective = objective + self.cfg.mtp_weight * mtp
            self._record("mtp_loss", mtp)
        aux = [m.aux_loss for m in self.moe_layers if m.aux_loss is not None]
        if aux:
            moe = torch.stack(aux).mean()
            objective = objective + self.cfg.moe_aux_loss * moe
            self._record("moe_aux_loss", moe)
            self._record("expert_tokens", torch.stack([m.tokens_per_expert for m in self.moe_layers]))
        return objective

    def _cross_entropy(self, h: torch.Tensor, targets: torch.Tensor, per_token: bool = False):
        if self.fused_loss and not per_token:
            # LM head + soft-cap + mean cross-entropy in row chunks, never holding (B·T, V)
            # logits: the largest activation of a small model and the slowest part of its step.
            return linear_cross_entropy(
                h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1),
                self.cfg.logit_softcap, IGNORE_INDEX,
            )
        logits = self.logits(h)
        # One flattened cross_entropy call; .float() is a no-op for fp32 logits (under bf16
        # autocast it is the one copy needed for a stable loss).
        flat = logits.view(-1, logits.shape[-1]).float()
        reduction = "none" if per_token else "mean"
        loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction=reduction)
        return loss.view(targets.shape) if per_token else loss

    def _mtp_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the multi-token-prediction heads (mtp.py)."""
        losses, h = [], x
        for k, head in enumerate(self.mtp, start=1):
            inp, tgt = mtp_inputs(targets, k, IGNORE_INDEX)
            if inp.shape[1] == 0:  # sequence too short for this depth
                break
            h = head(h[:, : inp.shape[1]], self.embed(inp), self.rotary)
            losses.append(self._cross_entropy(self.norm(h), tgt))
        return torch.stack(losses).mean() if losses else x.new_zeros(())

    def _record(self, name: str, value: torch.Tensor) -> None:
        # Running (sum, count): bounded memory however long nobody reads the stats.
        total, n = self._stats.get(name, (0, 0))
        value = value.detach()
        self._stats[name] = (total + (value.float() if value.is_floating_point() else value), n + 1)

    def train_stats(self) -> dict[str, Any]:
        """What the auxiliary objectives did since the last call (then forgets it): mean
        `lm_loss`, `mtp_loss`, `moe_aux_loss` over training forwards, and `expert_tokens`
        [layer][expert], tokens routed to each expert, summed. Empty without MoE / MTP."""
        out: dict[str, Any] = {}
        for name, (total, n) in self._stats.items():
            if name == "expert_tokens":
                out[name] = [[round(v) for v in row] for row in total.tolist()]
            else:
                out[name] = total.item() / n
        self._stats = {}
        return out

    def per_token_loss(self, idx: torch.Tensor, targets: torch.Tensor,
                       image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) float32 cross-entropy in nats per target token (0 where target == -1)."""
        return self.forward(idx, targets, return_per_token_loss=True, image_embeds=image_embeds)

    # ------------------------------------------------------------------------------ helpers
    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache; defaults: max_seq_len positions, the model's device and dtype."""
        return self._new_cache(KVCache, "KV cache", batch_size, max_len, device, dtype)

    def new_slot_cache(
        self,
        n_slots: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SlotKVCache:
        """An empty slot cache for continuous batching (see SlotKVCache)."""
        return self._new_cache(SlotKVCache, "slot cache", n_slots, max_len, device, dtype)

    def _new_cache(self, kind, what: str, rows: int, max_len, device, dtype):
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise SpudError(
                f"{what} max_len={max_len} exceeds model.max_seq_len={self.cfg.max_seq_len} "
                "(rotary tables end there); use a smaller max_len"
            )
        w = self.embed.weight
        return kind(
            self.cfg.n_layers, rows, self.cfg.kv_heads, max_len, self.cfg.dim_head,
            device=device if device is not None else w.device,
            dtype=dtype if dtype is not None else w.dtype,
        )

    def forward_slots(
        self, idx: torch.Tensor, cache: SlotKVCache, slots: list[int], starts: list[int],
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, d) for idx (B, T): row i continues the sequence in
        cache slot slots[i], whose first starts[i] positions are already cached. The LM head is
        left to the caller, which usually needs only the last position's logits."""
        cache.bind(slots, starts, idx.shape[1])
        return self.hidden_states(idx, cache, image_embeds)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; non_embedding leaves out the vocabulary-sized lookup tables (every
        nn.Embedding: the token embedding and any value embeddings) and the LM head when untied,
        the convention of scaling-law parameter counts."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already dedups ties
        if non_embedding:  # the language model's tables (a vision encoder's are not vocabulary)
            n -= sum(m.weight.numel() for name, m in self.named_modules()
                     if isinstance(m, nn.Embedding) and not name.startswith("vision."))
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n
