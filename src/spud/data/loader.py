"""`TokenLoader`: (x, y) batches from memory-mapped token shards, deterministic and resumable.

Each shard is cut into windows of seq_len+1 tokens starting every seq_len tokens (x =
window[:-1], y = window[1:]): consecutive windows share one token, so every token in the shard is
a prediction target exactly once. Windows never cross a shard boundary, so a shard's few leftover
tokens are unused.
Every epoch visits all windows in a permutation drawn from `seed + epoch`, so the order depends
only on (seed, epoch) and the position is fully described by (epoch, batch index): resuming from
`state_dict()` replays exactly the batches an uninterrupted run would have seen.

Data parallel: a global batch is `batch_size * world_size` consecutive entries of the
permutation and rank r takes the r-th contiguous slice of it, so ranks never share a window and
together cover exactly what one rank would with the global batch size. The last incomplete
global batch of an epoch is dropped so that every rank runs the same number of steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spud.data.shards import SPLITS, load_manifest
from spud.errors import SpudError


class TokenLoader:
    def __init__(
        self, run_dir: str | Path, split: str, batch_size: int, seq_len: int, seed: int,
        rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
    ):
        if split not in SPLITS:
            raise SpudError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if batch_size < 1 or seq_len < 1:
            raise SpudError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SpudError(f"rank {rank} is not in range for world_size {world_size}")
        self.run_dir, self.split = Path(run_dir), split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.window = seq_len + 1
        self.global_batch = batch_size * world_size

        manifest = load_manifest(self.run_dir)
        data_dir = self.run_dir / "data"
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")  # shards are little-endian
        self._shards: list[np.memmap] = []
        counts = []
        self.tokens = 0
        for shard in manifest["shards"]:
            if shard["split"] != split:
                continue
            self.tokens += shard["tokens"]
            if shard["tokens"] < self.window:
                continue  # too short for one window (np.memmap also rejects empty files)
            path = data_dir / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise SpudError(
                    f"{path} is missing or not {expected} bytes as the manifest says; "
                    f"delete {data_dir} and rebuild with `spud data build`"
                )
            self._shards.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
            counts.append((shard["tokens"] - 1) // self.seq_len)
        # Window w lives in shard s where starts[s] <= w < starts[s+1].
        self._starts = np.cumsum([0, *counts], dtype=np.int64)
        self.windows_per_epoch = int(self._starts[-1])
        self.batches_per_epoch = self.windows_per_epoch // self.global_batch
        if self.batches_per_epoch == 0:
            self._too_small(len(counts))

        self._offsets = np.arange(self.window, dtype=np.int64)
        self.epoch, self.batch_index = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _too_small(self, shards: int) -> None:
        need = self.global_batch * self.window
        more = "data.total_tokens" + (" or data.val_fraction" if self.split == "val" else "")
        raise SpudError(
            f"the {self.split} split of {self.run_dir / 'data'} has {self.tokens:,} tokens "
            f"({self.windows_per_epoch} windows of seq_len+1 = {self.window} tokens in {shards} "
            f"usable shard(s)); one batch needs {self.global_batch} windows (batch_size "
            f"{self.batch_size} x world_size {self.world_size}) = {need:,} tokens. Lower "
            f"train.seq_len or train.micro_batch_size, or raise {more} and rebuild the data."
        )

    # --------------------------------------------------------------------------------- order
    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng((self.seed + epoch) % (1 << 64))  # seed must be >= 0
            self._perm = rng.permutation(self.windows_per_epoch)
            self._perm_epoch = epoch
        return self._perm

    def window_ids(self) -> np.ndarray:
        """The window ids of the next batch for this rank (advances the position)."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        start = self.batch_index * self.global_batch + self.rank * self.batch_size
        ids = self._permutation(self.epoch)[start:start + self.batch_size]
        self.batch_index += 1
        return ids

    # ------------------------------------------------------------------------------- batches
    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Windows `ids` as an int64 array (len(ids), seq_len+1), one fancy-index per shard."""
        out = np.empty((len(ids), self.window), dtype=np.int64)
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            starts = (ids[rows] - self._starts[s]) * self.seq_len
            out[rows] = self._shards[s][starts[:, None] + self._offsets]
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.gather(self.window_ids())
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
        if self.device.type == "cuda":  # pinned host memory → asynchronous copy
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        if self.device.type != "cpu":
            return x.to(self.device), y.to(self.device)
        return x, y

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()  # endless: epochs follow each other; the caller counts steps

    # -------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """JSON-serializable position, plus what it is only valid for."""
        return {
            "split": self.split, "epoch": self.epoch, "batch_index": self.batch_index,
            "seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch,
            "windows_per_epoch": self.windows_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        checks = {"seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch,
                  "windows_per_epoch": self.windows_per_epoch}
        wrong = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in checks.items()
                 if state.get(k) != v]
        if wrong:
            raise SpudError(
                "cannot resume the data loader exactly: " + "; ".join(wrong) + ". Resume with the "
                "same seed, seq_len, batch_size x world_size and dataset, or start a new run."
            )
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])
