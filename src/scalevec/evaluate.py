"""`scalevec eval`: loss, perplexity and bits per byte of a run or an export on any text.

Inputs: .txt (one document), .jsonl (a text field), .parquet (a text column), or a prepared data
directory (its validation split as stored, which must have been built with the model's tokenizer). Each
input's documents are encoded with the model's own tokenizer and joined into one stream,
`<|endoftext|> doc1 <|endoftext|> doc2 ...`, so every token of every document is predicted, the
separators between documents included. The stream is cut into windows of the model's sequence
length; with a stride below it, windows overlap and each token is scored once, in the window that
gives it the most context (the usual sliding-window perplexity). Bits per byte divide the total
loss in bits by the UTF-8 bytes of the documents, so they compare across tokenizers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from .checkpoint import load_run_model, run_tokenizer
from .data.loader import read_meta, shard_tokens
from .data.prepare import END_OF_TEXT, load_tokenizer
from .data.sources import USER_SUFFIXES, DataError, SourceFile, read_documents
from .model import Decoder
from .outputs import file_sha256
from .rundir import RunDirError


def load_model(source: str | Path) -> tuple[Decoder, Path]:
    """The model of a run directory (newest usable checkpoint) or an export, in eval mode, and its tokenizer.json."""
    from .hf_import import hf_model, read_hf_dir

    source = Path(source)
    if (source / "config.toml").is_file():
        config, model = load_run_model(source)
        tokenizer = run_tokenizer(config)
    elif (source / "config.json").is_file():
        hf, state = read_hf_dir(source)
        model, _ = hf_model(hf, state)  # exactly the checkpoint's function, under its own strategy
        tokenizer = source / "tokenizer.json"
    else:
        raise RunDirError(f"{source} is neither a run directory (config.toml) nor an export (config.json)")
    if tokenizer is None or not tokenizer.is_file():
        raise RunDirError(f"no tokenizer.json found for {source}; the model's tokenizer is needed to encode text")
    return model.eval(), tokenizer


def windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, window length, first scored position) covering targets 1..length-1 of a stream once each."""
    spans, done, start = [], 0, 0  # done: targets 1..done are scored
    while done < length - 1:
        size = min(seq_len, length - 1 - start)
        spans.append((start, size, max(0, done - start)))
        done, start = start + size, start + stride
    return spans


@torch.no_grad()
def stream_loss(model: Decoder, tokens: np.ndarray, seq_len: int, stride: int, batch_size: int, bar=None
                ) -> tuple[float, int]:
    """(sum of next-token losses in nats, number of targets) over a token stream, each target once."""
    device = next(model.parameters()).device
    spans = windows(len(tokens), seq_len, stride)
    total, count = 0.0, 0
    stream = torch.from_numpy(tokens.astype(np.int64))
    for first in range(0, len(spans), batch_size):
        batch = spans[first:first + batch_size]
        for size in dict.fromkeys(size for _, size, _ in batch):  # a batch of equal window lengths at a time
            group = [(start, skip) for start, s, skip in batch if s == size]
            inputs = torch.stack([stream[start:start + size] for start, _ in group]).to(device)
            targets = torch.stack([stream[start + 1:start + size + 1] for start, _ in group]).to(device)
            losses = F.cross_entropy(model(inputs).float().transpose(1, 2), targets, reduction="none").double()
            for row, (_, skip) in enumerate(group):
                total += losses[row, skip:].sum().item()
                count += size - skip
        if bar is not None:
            bar.update(len(batch))
    return total, count


@torch.no_grad()
def windows_loss(model: Decoder, windows: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss in nats over fixed windows (n, length + 1), every target of every window, in fp32."""
    total = 0.0
    for first in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[first:first + batch_size].astype(np.int64))
        logits = model(batch[:, :-1]).float()
        total += F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum").double().item()
    return total / windows[:, 1:].size


def separator_id(source: Path, tokenizer: Tokenizer, vocab_size: int, eos_id: int | None) -> int | None:
    """The token that joins documents: `eos_id` if given, else the tokenizer's <|endoftext|>, else the
    `eos_token_id` an export's config.json declares (Llama 3's <|end_of_text|>, Mistral's </s>); None if none."""
    if eos_id is None:
        eos_id = tokenizer.token_to_id(END_OF_TEXT)
    if eos_id is None and not (source / "config.toml").is_file() and (source / "config.json").is_file():
        declared = json.loads((source / "config.json").read_text()).get("eos_token_id")  # valid: load_model read it
        declared = declared[0] if isinstance(declared, list) and declared else declared
        eos_id = declared if isinstance(declared, int) and not isinstance(declared, bool) else None
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise DataError(f"--eos-id {eos_id} is outside the model's vocabulary (0..{vocab_size - 1}); give the id of "
                        "the token that separates documents")
    return eos_id


def read_input(path: Path, tokenizer: Tokenizer, tokenizer_path: Path, eos: int | None, field: str, column: str
               ) -> tuple[np.ndarray, int, int]:
    """(token stream, documents, UTF-8 bytes) of one input; `eos` joins a file's documents."""
    if path.is_dir():
        if not (path / "meta.json").is_file():
            raise DataError(f"{path} is a directory without meta.json; give a prepared data directory or files")
        meta = read_meta(path)
        if meta["tokenizer_sha256"] != file_sha256(tokenizer_path):
            raise DataError(f"{path} was prepared with another tokenizer than the model's ({tokenizer_path}); "
                            "evaluate its text files instead, which are encoded with the model's tokenizer")
        split = meta["val"]
        tokens = np.concatenate([shard_tokens(path, shard, meta["dtype"]) for shard in split["shards"]]
                                or [np.zeros(0, dtype=np.int64)])
        return tokens, split["documents"], split["bytes"]
    if not path.is_file():
        raise DataError(f"--data {path} not found; give an existing file or prepared data directory")
    if path.suffix not in USER_SUFFIXES:
        raise DataError(f"--data {path} has unsupported type {path.suffix!r}; use {', '.join(USER_SUFFIXES)} "
                        "or a prepared data directory")
    if eos is None:
        raise DataError(f"the model's tokenizer {tokenizer_path} has no {END_OF_TEXT} token to join documents with "
                        "(nor does an export's config.json name an eos_token_id); give the separator's id with "
                        "--eos-id")
    documents = [text for text in read_documents(SourceFile(path, str(path)), field, column) if text]
    ids = [eos]
    for encoding in tokenizer.encode_batch_fast(documents, add_special_tokens=False):
        ids += [*encoding.ids, eos]
    return np.asarray(ids[:-1] if documents else ids, dtype=np.int64), len(documents), \
        sum(len(text.encode()) for text in documents)


def evaluate(source: str | Path, data: list[str | Path], seq_len: int | None = None, stride: int | None = None,
             batch_size: int = 8, jsonl_field: str = "text", parquet_column: str = "text", device: str = "auto",
             progress: bool | None = None, eos_id: int | None = None) -> dict:
    """Loss (nats per token), perplexity, bits per byte and token count of a run or export on each input
    and over all of them, in fp32. seq_len defaults to the model's max_seq_len, stride to seq_len (no overlap);
    `eos_id` (the token that joins documents) to `separator_id`'s choice."""
    from .train.preflight import resolve_device

    if not data:
        raise DataError("no --data given; name at least one .txt, .jsonl or .parquet file or prepared data directory")
    model, tokenizer_path = load_model(source)
    model.to(resolve_device(device))
    limit = model.config.max_seq_len
    seq_len = limit if seq_len is None else seq_len
    stride = seq_len if stride is None else stride
    if not 1 <= seq_len <= limit:
        raise DataError(f"--seq-len {seq_len} must be between 1 and the model's max_seq_len {limit}")
    if not 1 <= stride <= seq_len:
        raise DataError(f"--stride {stride} must be between 1 and the window length {seq_len}")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be at least 1")
    tokenizer = load_tokenizer(tokenizer_path)
    eos = separator_id(Path(source), tokenizer, model.config.vocab_size, eos_id)
    streams = []
    for item in data:
        tokens, documents, num_bytes = read_input(Path(item), tokenizer, tokenizer_path, eos, jsonl_field,
                                                  parquet_column)
        if len(tokens) < 2:
            raise DataError(f"--data {item} holds no text to score (fewer than 2 tokens)")
        if tokens.max() >= model.config.vocab_size:
            raise DataError(f"--data {item} has token ids beyond the model's vocabulary ({model.config.vocab_size})")
        streams.append((str(item), tokens, documents, num_bytes))
    results, total, count, total_bytes = [], 0.0, 0, 0
    with tqdm(total=sum(len(windows(len(t), seq_len, stride)) for _, t, _, _ in streams), unit="window",
              desc="evaluating", disable=None if progress is None else not progress) as bar:
        for name, tokens, documents, num_bytes in streams:
            nats, targets = stream_loss(model, tokens, seq_len, stride, batch_size, bar)
            results.append({"input": name, "documents": documents, "bytes": num_bytes, **_metrics(nats, targets,
                                                                                                 num_bytes)})
            total, count, total_bytes = total + nats, count + targets, total_bytes + num_bytes
    return {"source": str(source), "seq_len": seq_len, "stride": stride, "inputs": results,
            "overall": {"bytes": total_bytes, **_metrics(total, count, total_bytes)}}


def _metrics(nats: float, tokens: int, num_bytes: int) -> dict:
    loss = nats / tokens
    return {"tokens": tokens, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / num_bytes if num_bytes else None}
