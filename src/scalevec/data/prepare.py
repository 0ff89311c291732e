"""`scalevec data prepare`: documents -> train/validation split -> byte-level BPE -> token shards.

The output directory holds `meta.json`, `tokenizer.json` and memmap shards (`train_000.bin`, ...,
`val_000.bin`, ...). It is built in a temporary directory and renamed into place, so a failure
leaves nothing partial; re-running with the same inputs is a no-op (the fingerprint matches).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from ..config import DataConfig
from .sources import DataError, SourceFile, read_documents, resolve_sources

FORMAT = 2  # 2: splits record their bytes (bits per byte)
END_OF_TEXT = "<|endoftext|>"
ENCODE_BATCH = 64  # documents per call into the Rust encoder


def file_sha256(path: Path) -> str:
    return SourceFile(path, str(path)).sha256()


def train_tokenizer(texts: list[str], vocab_size: int, progress: bool) -> Tokenizer:
    """Byte-level BPE: every byte sequence encodes, and decode(encode(text)) == text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for missing and malformed files
        raise DataError(f"cannot load tokenizer {path}: {str(err).splitlines()[0]}; give a tokenizers "
                        "tokenizer.json") from None


def fingerprint(data: DataConfig, files: list[SourceFile]) -> dict:
    """Everything the output depends on."""
    return {
        "format": FORMAT,
        "sources": [{"name": f.name, "sha256": f.sha256()} for f in files],
        "tokenizer": file_sha256(Path(data.tokenizer)) if data.tokenizer else None,
        "vocab_size": None if data.tokenizer else data.vocab_size,
        "val_fraction": data.val_fraction,
        "split_seed": data.split_seed,
        "shard_tokens": data.shard_tokens,
        "jsonl_field": data.jsonl_field,
        "parquet_column": data.parquet_column,
    }


def split_documents(sizes: list[int], val_fraction: float, seed: int) -> set[int]:
    """Indices of validation documents: a seeded shuffle, taken until val_fraction of the text."""
    if val_fraction <= 0:
        return set()
    if len(sizes) < 2:
        raise DataError("need at least 2 documents to split train/validation; add data or set "
                        "data.val_fraction=0")
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    budget, val, taken = val_fraction * sum(sizes), set(), 0
    for index in order[:-1]:  # the last one always stays in train
        if taken >= budget:
            break
        val.add(index)
        taken += sizes[index]
    return val


def write_shards(tokenizer: Tokenizer, texts: list[str], out: Path, split: str, dtype, shard_tokens: int,
                 eos_id: int | None, progress) -> dict:
    shards, current, current_len, total, total_bytes = [], [], 0, 0, 0

    def flush():
        nonlocal current, current_len
        if current_len:
            name = f"{split}_{len(shards):03d}.bin"
            np.concatenate(current).astype(dtype).tofile(out / name)
            shards.append({"file": name, "tokens": current_len})
        current, current_len = [], 0

    for start in range(0, len(texts), ENCODE_BATCH):
        batch = texts[start:start + ENCODE_BATCH]
        for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
            ids = encoding.ids + ([eos_id] if eos_id is not None else [])
            array = np.asarray(ids, dtype=np.int64)
            while len(array):
                piece, array = array[:shard_tokens - current_len], array[shard_tokens - current_len:]
                current.append(piece)
                current_len += len(piece)
                total += len(piece)
                if current_len == shard_tokens:
                    flush()
        batch_bytes = sum(len(t.encode()) for t in batch)
        total_bytes += batch_bytes
        progress.update(batch_bytes)
    flush()
    return {"tokens": total, "documents": len(texts), "bytes": total_bytes, "shards": shards}


def prepare(data: DataConfig, progress: bool | None = None, log=print) -> Path:
    """Build (or find up to date) the token shards of `data` in `data.dir`; returns the directory."""
    out = Path(data.dir)
    files = resolve_sources(data.sources, data.inputs)
    if data.tokenizer and not Path(data.tokenizer).is_file():
        raise DataError(f"data.tokenizer {data.tokenizer} not found; give an existing tokenizer.json or leave it empty")
    inputs = fingerprint(data, files)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs of a sweep prepare the same data once
        if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()).get("fingerprint") == digest:
            log(f"data in {out} is up to date")
            return out
        _build(data, files, inputs, digest, out, progress, log)
    return out


def _build(data, files, inputs, digest, out: Path, progress, log) -> None:
    started = time.perf_counter()
    texts, per_source = [], []
    for source in files:
        docs = [t for t in read_documents(source, data.jsonl_field, data.parquet_column) if t]
        if not docs:
            raise DataError(f"input {source.name} holds no text; remove it or fill it")
        per_source.append({"name": source.name, "sha256": inputs["sources"][len(per_source)]["sha256"],
                           "documents": len(docs), "bytes": sum(len(t.encode()) for t in docs)})
        texts.extend(docs)
    val = split_documents([len(t) for t in texts], data.val_fraction, data.split_seed)
    train_texts = [t for i, t in enumerate(texts) if i not in val]
    val_texts = [t for i, t in enumerate(texts) if i in val]

    if data.tokenizer:
        tokenizer = load_tokenizer(data.tokenizer)
    else:
        log(f"training a byte-level BPE tokenizer (vocab {data.vocab_size}) on {len(train_texts)} documents")
        tokenizer = train_tokenizer(train_texts, data.vocab_size, sys.stderr.isatty() if progress is None else progress)
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab < 2**16 else np.uint32
    eos_id = tokenizer.token_to_id(END_OF_TEXT)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer.save(str(tmp / "tokenizer.json"))
        total_bytes = sum(p["bytes"] for p in per_source)
        encode_started = time.perf_counter()
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                  disable=None if progress is None else not progress) as bar:
            splits = {name: write_shards(tokenizer, split_texts, tmp, name, dtype, data.shard_tokens, eos_id, bar)
                      for name, split_texts in (("train", train_texts), ("val", val_texts))}
        encode_seconds = time.perf_counter() - encode_started
        meta = {
            "format": FORMAT,
            "fingerprint": digest,
            "inputs": inputs,
            "sources": per_source,
            "tokenizer_sha256": file_sha256(tmp / "tokenizer.json"),
            "vocab_size": vocab,
            "eos_id": eos_id,
            "dtype": np.dtype(dtype).name,
            **splits,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} validation tokens, "
        f"vocab {vocab}, tokenized {total_bytes / 1e6 / encode_seconds:.1f} MB/s, "
        f"{time.perf_counter() - started:.0f}s in all")
