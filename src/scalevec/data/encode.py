"""Tokenizing on every core: worker processes, each with its own copy of the tokenizer, take batches of documents
in order, with a bounded number of batches in flight, so memory does not grow with the corpus.

The workers start before the preparation reads anything (each loads the tokenizer when its first batch names it):
forked later, every worker would share, and copy as it writes near them, the pages of whatever the parent holds
by then (the document index grows with the corpus).

As Megatron's preprocess_data.py and datatrove's tokenizer step do: processes, not threads (one core each, the
tokenizer's own thread pool off), fed whole batches into the Rust batch encoder.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Iterable, Iterator

import numpy as np

BATCH_DOCUMENTS = 64  # documents per call into the Rust encoder
BATCH_BYTES = 1 << 20  # ... or fewer, once they hold this much text (a worker's memory grows with its batch)
PARALLELISM = "TOKENIZERS_PARALLELISM"
IN_FLIGHT = 2  # batches queued per worker: enough to keep every worker busy, few enough to bound memory

_tokenizer: tuple[str, object] | None = None  # (path, tokenizer) of this worker


def _start_worker() -> None:
    os.environ[PARALLELISM] = "false"  # the processes are the parallelism: one core each


def encode_texts(tokenizer, texts: list[str], eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(the documents' ids one after another, each followed by eos_id; each document's token count)."""
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    tail = [] if eos_id is None else [eos_id]
    pieces = [np.asarray(e.ids + tail, dtype=np.uint32) for e in encodings]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)), lengths


def _encode(tokenizer_path: str, texts: list[str], eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    global _tokenizer
    if _tokenizer is None or _tokenizer[0] != tokenizer_path:
        from tokenizers import Tokenizer

        _tokenizer = tokenizer_path, Tokenizer.from_file(tokenizer_path)
    return encode_texts(_tokenizer[1], texts, eos_id)


def batches(documents: Iterable) -> Iterator[list]:
    """Consecutive groups of (..., text) items, bounded in count and bytes."""
    batch, size = [], 0
    for item in documents:
        batch.append(item)
        size += len(item[-1])
        if len(batch) == BATCH_DOCUMENTS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class Encoder:
    """`encode(batches, tokenizer_path, eos_id)` yields (batch, ids, lengths) in input order, tokenized by `workers`
    processes started at construction."""

    def __init__(self, workers: int):
        # fork where there is fork (spawn would run an unguarded caller's script again in every worker); the
        # setting tells the tokenizer, at the fork, that its workers go single-threaded on purpose (no warning)
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        before = os.environ.get(PARALLELISM)
        os.environ[PARALLELISM] = "false"
        try:
            self.pool = context.Pool(workers, _start_worker)
        finally:
            if before is None:
                del os.environ[PARALLELISM]
            else:
                os.environ[PARALLELISM] = before
        self.limit = IN_FLIGHT * workers

    def encode(self, groups: Iterable[list], tokenizer_path: str, eos_id: int | None
               ) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
        pending: collections.deque = collections.deque()
        for batch in groups:
            texts = [item[-1] for item in batch]
            pending.append((batch, self.pool.apply_async(_encode, (tokenizer_path, texts, eos_id))))
            if len(pending) >= self.limit:
                batch, result = pending.popleft()
                yield batch, *result.get()
        while pending:
            batch, result = pending.popleft()
            yield batch, *result.get()

    def close(self) -> None:
        """End the workers; closing again does nothing."""
        self.pool.terminate()
        self.pool.join()

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
