"""Reading token shards: contiguous windows of seq_len+1 tokens, in a seeded order, per rank.

A loader's whole state is the global position in an endless stream of epochs, each a fresh seeded
permutation of the windows; the ranks' micro-batches take the next slots of it together, rank r
of w every w-th, so ranks never overlap and a run resumes on another number of ranks.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..outputs import first_line
from .sources import DataError


def read_meta(directory: Path) -> dict:
    """A prepared data directory's meta.json, its fields checked: a hand-edited or truncated one is one DataError."""
    meta_path = Path(directory) / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{directory} holds no prepared data (no meta.json); run `scalevec data prepare "
                        f"--out {directory}`")
    try:
        meta = json.loads(meta_path.read_text())
        problem = _meta_problem(meta)
    except (OSError, ValueError) as err:
        problem = f"unreadable: {first_line(err)}"
    if problem:
        raise DataError(f"{meta_path} is not a valid scalevec data record ({problem}); delete {directory} and run "
                        "`scalevec data prepare` (or `data import`) again")
    return meta


def _meta_problem(meta) -> str | None:
    """What is wrong with the fields of meta.json that readers use, or None."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return "dtype is not uint16 or uint32"
    if not count(meta.get("vocab_size")) or not meta["vocab_size"]:
        return "vocab_size is not a positive integer"
    if not isinstance(meta.get("tokenizer_sha256"), str):
        return "tokenizer_sha256 is missing"
    for split in ("train", "val"):
        part = meta.get(split)
        if not isinstance(part, dict) or not isinstance(part.get("shards"), list) \
                or not all(count(part.get(key)) for key in ("tokens", "documents", "bytes")):
            return f"{split} is not a split summary (shards, tokens, documents, bytes)"
        if not all(isinstance(s, dict) and isinstance(s.get("file"), str) and count(s.get("tokens"))
                   and count(s.get("offset", 0)) for s in part["shards"]):
            return f"a {split} shard is not a record of file and tokens"
        if not isinstance(part.get("sources", []), list) or not all(
                isinstance(s, dict) and isinstance(s.get("name"), str) and count(s.get("tokens"))
                for s in part.get("sources", [])):
            return f"a {split} source is not a record of name and tokens"
    return None


def shard_tokens(directory: Path, shard: dict, dtype: str) -> np.ndarray:
    """A shard of meta.json as a memory-mapped token array: its file (relative to the data directory, or an
    absolute path where an import referenced it in place) holds `tokens` ids after `offset` bytes (an imported
    .npy file's header; 0 otherwise)."""
    path, offset = Path(directory) / shard["file"], shard.get("offset", 0)
    expected = offset + shard["tokens"] * np.dtype(dtype).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise DataError(f"shard {path} is missing or not {expected} bytes as meta.json says; delete {directory} and "
                        "run `scalevec data prepare` (or `data import`) again")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(shard["tokens"],))


class TokenWindows:
    """The windows of one split (`train` or `val`) of a prepared data directory."""

    def __init__(self, directory: str | Path, split: str, seq_len: int):
        self.directory = directory = Path(directory)
        self.meta = read_meta(directory)
        self.window = seq_len + 1
        self.shards, self.starts, self.offsets, total, offset = [], [], [], 0, 0
        for shard in self.meta[split]["shards"]:
            tokens = shard_tokens(directory, shard, self.meta["dtype"])
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


def split_global_batch(global_batch: int, world_size: int, max_micro_batch: int) -> tuple[int, int]:
    """(micro-batch per rank, micro-batches per step) that make `global_batch` sequences per optimizer step on
    `world_size` ranks, the micro-batch as large as divides the rank's share without exceeding `max_micro_batch`."""
    if global_batch % world_size:
        sizes = ", ".join(str(n) for n in range(1, global_batch + 1) if global_batch % n == 0)
        raise ConfigError(f"a world size of {world_size} cannot divide the run's global batch of {global_batch} "
                          f"sequences per step; resume on {sizes} ranks")
    per_rank = global_batch // world_size
    micro = max(n for n in range(1, min(per_rank, max_micro_batch) + 1) if per_rank % n == 0)
    return micro, per_rank // micro


class Loader:
    """Training batches for one data-parallel rank; `state_dict()` is the global position, so a run resumes on
    any number of ranks.

    The data are one endless stream of slots, epoch e being a seeded permutation of all windows. The ranks'
    micro-batches of `b` sequences together take the next `w·b` slots, rank r every w-th of them: the same
    windows, in the same steps, whatever the split into ranks and micro-batches.
    """

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.windows, self.seed, self.rank, self.world_size = windows, seed, rank, world_size
        self.per_rank = len(windows) // world_size  # windows of an epoch for each rank
        self.batch_size = batch_size
        self.position = 0  # slots taken by all ranks together
        self._epoch, self._order = -1, None

    @property
    def batch_size(self) -> int:
        """Sequences per micro-batch of this rank."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, size: int) -> None:
        if self.per_rank < size:  # one window would come twice in the ranks' micro-batch
            raise DataError(f"{len(self.windows)} training windows are too few for batches of {size} on "
                            f"{self.world_size} rank(s); use more data, a smaller batch or a shorter seq_len")
        self._batch_size = size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.windows), generator=gen)
        return self._order

    def slot_window(self, slot: int) -> int:
        epoch, i = divmod(slot, len(self.windows))
        return int(self.epoch_order(epoch)[i])

    def window_index(self, position: int) -> int:
        """This rank's `position`-th window of the stream (its micro-batches take them in order)."""
        return self.slot_window(position * self.world_size + self.rank)

    def batch_indices(self) -> list[int]:
        """The windows of this rank's next micro-batch; the position moves on by all ranks' micro-batches."""
        indices = [self.slot_window(self.position + j * self.world_size + self.rank) for j in range(self.batch_size)]
        self.position += self.batch_size * self.world_size
        return indices

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows.batch(self.batch_indices())

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        expected = self.state_dict()
        for key in ("seed", "windows"):
            if state[key] != expected[key]:
                raise DataError(f"the checkpoint's data loader had {key}={state[key]}, this run has {expected[key]}; "
                                "resume with the same data and seed")
        if "world_size" in state:  # before scalevec 0.2, a position per rank: rank r of w took every w-th window
            # of epochs of (windows // w) · w slots
            epoch, i = divmod(state["position"], state["windows"] // state["world_size"])
            self.position = epoch * state["windows"] + i * state["world_size"]
        else:
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
                       world_size: int = 1) -> Iterator[tuple[list[str | None], torch.Tensor, torch.Tensor]]:
    """(window sources, inputs, targets) of the fixed validation set, rank r taking every w-th window, so the set is
    the same on any number of ranks. Every rank runs as many batches (a sharded forward is collective): a rank
    short of a window fills its row with the first window, its source None (not counted)."""
    chosen = validation_windows(windows, budget_tokens)
    mine: list[int | None] = chosen[rank::world_size]
    mine += [None] * (-(-len(chosen) // world_size) - len(mine))
    for start in range(0, len(mine), batch_size):
        rows = mine[start:start + batch_size]
        yield ([None if i is None else windows.source(i) for i in rows],
               *windows.batch([chosen[0] if i is None else i for i in rows]))
