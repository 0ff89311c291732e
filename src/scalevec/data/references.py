"""Count-based references for a validation loss: unigram and bigram tables estimated on the training
split and scored on exactly the validation windows the models are scored on.

A model that does not beat the bigram table has learned little more than which token follows
which; its differences to another such model say little about what a longer run would show.
The bigram is smoothed toward the unigram (a Dirichlet prior of weight k: p(b|a) = (c(ab) + k·p(b)) /
(c(a) + k)); k is chosen on the last tenth of the training tokens, held out, then the table is
re-estimated on all of them, so nothing of the validation split tunes it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .loader import TokenWindows, validation_windows

SMOOTHING_GRID = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
HELD_OUT = 0.1


class _Tables:
    """Unigram and sparse bigram counts of a token stream."""

    def __init__(self, tokens: np.ndarray, vocab: int):
        self.vocab = vocab
        self.unigram = np.bincount(tokens, minlength=vocab).astype(np.float64)
        self.pairs, self.pair_counts = np.unique(tokens[:-1].astype(np.int64) * vocab + tokens[1:],
                                                 return_counts=True)
        self.context = np.bincount(tokens[:-1], minlength=vocab).astype(np.float64)

    def unigram_p(self, targets: np.ndarray) -> np.ndarray:
        return (self.unigram[targets] + 0.5) / (self.unigram.sum() + 0.5 * self.vocab)

    def bigram_p(self, previous: np.ndarray, targets: np.ndarray, k: float) -> np.ndarray:
        codes = previous.astype(np.int64) * self.vocab + targets
        where = np.minimum(np.searchsorted(self.pairs, codes), len(self.pairs) - 1)
        pair = np.where(self.pairs[where] == codes, self.pair_counts[where], 0)
        return (pair + k * self.unigram_p(targets)) / (self.context[previous] + k)


def _nats(p: np.ndarray) -> float:
    return float(-np.log(p).mean())


def reference_losses(data_dir: str | Path, seq_len: int, val_tokens: int) -> dict:
    """Unigram and bigram validation loss (nats per token), overall and per source, on the validation
    windows of `seq_len` and `val_tokens` (the same as `data.val_tokens` gives a run)."""
    train = TokenWindows(data_dir, "train", seq_len)
    val = TokenWindows(data_dir, "val", seq_len)
    vocab = train.meta["vocab_size"]
    stream = np.concatenate([np.asarray(shard) for shard in train.shards]).astype(np.int64)
    cut = int(len(stream) * (1 - HELD_OUT))
    fit, held = _Tables(stream[:cut], vocab), stream[cut:]
    k = min(SMOOTHING_GRID, key=lambda k: _nats(fit.bigram_p(held[:-1], held[1:], k)))
    tables = _Tables(stream, vocab)

    windows = validation_windows(val, val_tokens)
    chosen = np.stack([val.get(i) for i in windows]).astype(np.int64)
    previous, targets = chosen[:, :-1], chosen[:, 1:]
    sources = np.array([val.source(i) for i in windows], dtype=object)
    result = {"windows": len(windows), "bigram_smoothing": k}
    for name, p in (("unigram", tables.unigram_p(targets)), ("bigram", tables.bigram_p(previous, targets, k))):
        per_window = -np.log(p).mean(axis=1)
        result[name] = {"loss": float(per_window.mean()),
                        "by_source": {s: float(per_window[sources == s].mean()) for s in dict.fromkeys(sources) if s}}
    return result


def bits_per_byte(loss: float, tokens: int, num_bytes: int) -> float:
    """Nats per token to bits per byte, at a split's (or source's) tokens per byte."""
    return loss * tokens / num_bytes / math.log(2)
