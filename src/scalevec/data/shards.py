"""Token shards written as a stream: each split's tokens go straight to disk, in shards of exactly
`shard_tokens` (the last may be shorter), so memory holds neither the corpus nor a shard.

A shard is written as `<split>.partial` and renamed to `<split>_NNN.bin` once full and synced: a shard under its
final name is always whole. `checkpoint()` syncs the partial one and returns the writer's state, from which a
killed preparation resumes (`ShardWriter(..., state)`). `join_parts` puts the parts of a preparation together into
the shards one process would have written, linking every shard that lines up (all of them, for one part) and copying
the rest with plain reads (a memory map would add the pages it reads to the process's resident set).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import BadInput

COPY_TOKENS = 1 << 22  # tokens per read when a join copies a part's shard


class StaleState(BadInput):
    """A resume state that does not match the files beside it: the part starts again."""


class ShardWriter:
    """The shards of one split (`train` or `val`) in `directory`, and its summary for meta.json."""

    def __init__(self, directory: Path, split: str, dtype, shard_tokens: int, state: dict | None = None):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, np.dtype(dtype), shard_tokens
        self.partial_path = directory / f"{split}.partial"
        state = copy.deepcopy(state) if state else {
            "summary": {"tokens": 0, "documents": 0, "bytes": 0, "shards": [], "sources": []}, "partial": 0}
        self.summary, self.partial = state["summary"], state["partial"]
        self._restore()
        self._file = open(self.partial_path, "ab")

    def _shard_path(self, number: int) -> Path:
        return self.directory / f"{self.split}_{number:03d}.bin"

    def _restore(self) -> None:
        """Match the files to the state: listed shards whole, later ones removed, the partial one cut back."""
        shards = self.summary["shards"]
        for shard in shards:
            path = self.directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * self.dtype.itemsize:
                raise StaleState(f"{path} is not as the resume state says")
        number = len(shards)
        while self._shard_path(number).exists():  # finished after the last checkpoint: written again
            self._shard_path(number).unlink()
            number += 1
        size = self.partial * self.dtype.itemsize
        if self.partial_path.exists() and self.partial_path.stat().st_size >= size:
            os.truncate(self.partial_path, size)
        elif size:
            raise StaleState(f"{self.partial_path} is shorter than the resume state says")

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens, closing each shard as it fills."""
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            room = self.shard_tokens - self.partial
            piece, tokens = tokens[:room], tokens[room:]
            self._file.write(piece.tobytes())
            self.partial += len(piece)
            self.summary["tokens"] += len(piece)
            if self.partial == self.shard_tokens:
                self._close_shard()

    def add(self, ids: np.ndarray, source: str, text_bytes: int) -> None:
        """One document's tokens, counted in its source's span (a source's documents are consecutive)."""
        sources = self.summary["sources"]
        if not sources or sources[-1]["name"] != source:
            sources.append({"name": source, "tokens": 0, "bytes": 0, "documents": 0})
        sources[-1]["tokens"] += len(ids)
        sources[-1]["bytes"] += text_bytes
        sources[-1]["documents"] += 1
        self.summary["documents"] += 1
        self.summary["bytes"] += text_bytes
        self.write(ids)

    def adopt(self, path: Path, tokens: int) -> None:
        """Take a shard written elsewhere as the next one: a hard link where the filesystem allows, else a copy (the
        original stays, so a join killed part way can start again)."""
        name = self._shard_path(len(self.summary["shards"]))
        try:
            os.link(path, name)
        except OSError:
            shutil.copyfile(path, name)
        self.summary["shards"].append({"file": name.name, "tokens": tokens})
        self.summary["tokens"] += tokens

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def _close_shard(self) -> None:
        self._sync()
        self._file.close()
        name = self._shard_path(len(self.summary["shards"]))
        os.replace(self.partial_path, name)
        self.summary["shards"].append({"file": name.name, "tokens": self.partial})
        self.partial = 0
        self._file = open(self.partial_path, "ab")

    def checkpoint(self) -> dict:
        """The state to resume from, once everything written so far is on disk."""
        self._sync()
        return {"summary": copy.deepcopy(self.summary), "partial": self.partial}

    def finish(self) -> dict:
        """Close the last shard; the split's summary for meta.json."""
        if self.partial:
            self._close_shard()
        self._file.close()
        self.partial_path.unlink(missing_ok=True)
        return self.summary


def join_parts(parts: list[tuple[Path, dict]], out: Path, split: str, dtype, shard_tokens: int) -> dict:
    """The summaries of one split of consecutive parts (directory, summary), as one process's shards in `out`."""
    writer = ShardWriter(out, split, dtype, shard_tokens)
    summary = writer.summary
    last = next(((d, p["shards"][-1]["file"]) for d, p in reversed(parts) if p["shards"]), None)
    for directory, part in parts:
        for shard in part["shards"]:
            path = directory / shard["file"]
            # a shard lines up when it starts a shard here and is whole, or ends the split
            if writer.partial == 0 and (shard["tokens"] == shard_tokens or (directory, shard["file"]) == last):
                writer.adopt(path, shard["tokens"])
                continue
            with open(path, "rb") as fh:
                while len(tokens := np.fromfile(fh, dtype=dtype, count=COPY_TOKENS)):
                    writer.write(tokens)
        for key in ("documents", "bytes"):
            summary[key] += part[key]
        for source in part["sources"]:
            if summary["sources"] and summary["sources"][-1]["name"] == source["name"]:
                for key in ("tokens", "bytes", "documents"):
                    summary["sources"][-1][key] += source[key]
            else:
                summary["sources"].append(dict(source))
    return writer.finish()
