"""Reading token shards: contiguous windows of seq_len+1 tokens, in a seeded order, per rank.

A loader's whole state is its position in an endless stream of epochs, each a fresh seeded
permutation of the windows; rank r of w takes every w-th window of it, so ranks never overlap.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .sources import DataError


class TokenWindows:
    """The windows of one split (`train` or `val`) of a prepared data directory."""

    def __init__(self, directory: str | Path, split: str, seq_len: int):
        self.directory = directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{directory} holds no prepared data (no meta.json); run `scalevec data prepare "
                            f"--out {directory}`")
        self.meta = json.loads(meta_path.read_text())
        self.window = seq_len + 1
        self.shards, self.starts, self.offsets, total, offset = [], [], [], 0, 0
        for shard in self.meta[split]["shards"]:
            path = directory / shard["file"]
            expected = shard["tokens"] * np.dtype(self.meta["dtype"]).itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"shard {path} is missing or not {expected} bytes as meta.json says; "
                                f"delete {directory} and run `scalevec data prepare` again")
            tokens = np.memmap(path, dtype=self.meta["dtype"], mode="r")
            count = len(tokens) // self.window
            if count:
                self.shards.append(tokens)
                self.starts.append(total)
                self.offsets.append(offset)
                total += count
            offset += shard["tokens"]
        self.count = total
        # each source's documents are consecutive in a split (prepare keeps them grouped): its span of tokens
        spans = self.meta[split].get("sources", [])
        self.source_names = [s["name"] for s in spans]
        self.source_ends = np.cumsum([s["tokens"] for s in spans]).tolist()

    def __len__(self) -> int:
        return self.count

    def get(self, index: int) -> np.ndarray:
        shard = bisect.bisect_right(self.starts, index) - 1
        offset = (index - self.starts[shard]) * self.window
        return self.shards[shard][offset:offset + self.window]

    def source(self, index: int) -> str:
        """The source a window starts in ("" for data prepared before sources were recorded)."""
        if not self.source_names:
            return ""
        shard = bisect.bisect_right(self.starts, index) - 1
        start = self.offsets[shard] + (index - self.starts[shard]) * self.window
        return self.source_names[min(bisect.bisect_right(self.source_ends, start), len(self.source_names) - 1)]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (len(indices), seq_len)."""
        tokens = torch.from_numpy(np.stack([self.get(int(i)) for i in indices]).astype(np.int64))
        return tokens[:, :-1], tokens[:, 1:]


def check_compatible(windows: TokenWindows, tokenizer: str, model_vocab: int) -> None:
    """Refuse shards built with another tokenizer than the run's, or a vocabulary the model cannot embed."""
    if tokenizer:
        from ..outputs import file_sha256

        if file_sha256(Path(tokenizer)) != windows.meta["tokenizer_sha256"]:
            raise DataError(f"the shards in {windows.directory} were built with another tokenizer than {tokenizer}; "
                            "re-run `scalevec data prepare` with this tokenizer or point data.dir elsewhere")
    if windows.meta["vocab_size"] > model_vocab:
        raise DataError(f"the tokenizer's vocabulary ({windows.meta['vocab_size']}) is larger than "
                        f"model.vocab_size={model_vocab}; set model.vocab_size >= {windows.meta['vocab_size']}")


class Loader:
    """Training batches for one data-parallel rank; `state_dict()` is its exact position."""

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = len(windows) // world_size
        if self.per_rank < batch_size:
            raise DataError(f"{len(windows)} training windows are too few for batch_size={batch_size} on "
                            f"{world_size} rank(s); use more data, a smaller batch or a shorter seq_len")
        self.position = 0
        self._epoch, self._order = -1, None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.windows), generator=gen)
        return self._order

    def window_index(self, position: int) -> int:
        epoch, i = divmod(position, self.per_rank)
        return int(self.epoch_order(epoch)[i * self.world_size + self.rank])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices = [self.window_index(p) for p in range(self.position, self.position + self.batch_size)]
        self.position += self.batch_size
        return self.windows.batch(indices)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "world_size": self.world_size,
                "windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        expected = self.state_dict()
        for key in ("seed", "world_size", "windows"):
            if state[key] != expected[key]:
                raise DataError(f"the checkpoint's data loader had {key}={state[key]}, this run has {expected[key]}; "
                                "resume with the same data, seed and world size")
        self.position = state["position"]


def validation_windows(windows: TokenWindows, budget_tokens: int) -> list[int]:
    """The fixed validation set: windows adding up to `budget_tokens`, each source's share of them its share
    of the training tokens, evenly spaced within the source (the first windows of the split would be one or two
    works); every window when the budget covers the split."""
    count = min(len(windows), budget_tokens // windows.window)
    if count == len(windows) or not windows.source_names:
        return [i * len(windows) // count for i in range(count)]
    by_source: dict[str, list[int]] = {}
    for index in range(len(windows)):
        by_source.setdefault(windows.source(index), []).append(index)
    train = {s["name"]: s["tokens"] for s in windows.meta["train"]["sources"]}
    total = sum(train.get(name, 0) for name in by_source)
    chosen = []
    for name, members in by_source.items():
        share = round(count * train.get(name, 0) / total) if total else len(members)
        take = min(len(members), max(1, share))
        chosen += [members[i * len(members) // take] for i in range(take)]
    return sorted(chosen)


def validation_batches(windows: TokenWindows, batch_size: int, budget_tokens: int, rank: int = 0,
                       world_size: int = 1) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(window sources, inputs, targets) of the fixed validation set, rank r taking every w-th window."""
    chosen = validation_windows(windows, budget_tokens)
    mine = chosen[rank:len(chosen) - len(chosen) % world_size:world_size]
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        yield [windows.source(i) for i in indices], *windows.batch(indices)
