"""`scalevec data prepare`: documents -> train/validation split -> byte-level BPE -> token shards.

The output directory holds `meta.json`, `tokenizer.json` and memmap shards (`train_000.bin`, ...,
`val_000.bin`, ...). It is built in a temporary directory and renamed into place, so a failure
leaves nothing partial; re-running with the same inputs is a no-op (the fingerprint matches).
`meta.json` is the manifest: a stale directory is rebuilt only if it holds nothing but the files
meta.json lists; any other existing path needs `--overwrite`, and a file is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import random
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from ..config import DataConfig
from ..outputs import (
    OutputError,
    check_output_path,
    claim_directory,
    contains,
    file_sha256,
    first_line,
    new_directory,
    parent_lock,
    writing,
)
from .sources import DataError, SourceFile, read_documents, resolve_sources

FORMAT = 3  # 2: splits record their bytes (bits per byte); 3: a split stratified by source, spans per source
END_OF_TEXT = "<|endoftext|>"
ENCODE_BATCH = 64  # documents per call into the Rust encoder


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


def split_documents(sources: list[str], sizes: list[int], val_fraction: float, seed: int) -> set[int]:
    """Indices of validation documents, stratified by source: each source of two or more documents gives
    about val_fraction of its text (at least one document, never all), from a seeded shuffle; single-document
    sources (e.g. a folder of .txt files) are split as one pool. So every source the split can hold is in it."""
    if val_fraction <= 0:
        return set()
    if len(sizes) < 2:
        raise DataError("need at least 2 documents to split train/validation; add data or set "
                        "data.val_fraction=0")
    groups: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        groups.setdefault(source, []).append(index)
    pool = [i for members in groups.values() if len(members) == 1 for i in members]
    strata = [members for members in groups.values() if len(members) > 1] + ([pool] if len(pool) > 1 else [])
    rng, val = random.Random(seed), set()
    for members in strata:
        order = list(members)
        rng.shuffle(order)
        budget, taken = val_fraction * sum(sizes[i] for i in members), 0
        for index in order[:-1]:  # the last one always stays in train
            if taken >= budget:
                break
            val.add(index)
            taken += sizes[index]
    return val


def write_shards(tokenizer: Tokenizer, docs: list[tuple[str, str]], out: Path, split: str, dtype, shard_tokens: int,
                 eos_id: int | None, progress) -> dict:
    """Encode (source, text) documents, grouped by source, into shards; the split's summary for meta.json,
    with each source's consecutive token span (`sources`, in shard order) for per-source evaluation."""
    shards, current, current_len, total, total_bytes = [], [], 0, 0, 0
    sources: list[dict] = []

    def flush():
        nonlocal current, current_len
        if current_len:
            name = f"{split}_{len(shards):03d}.bin"
            np.concatenate(current).astype(dtype).tofile(out / name)
            shards.append({"file": name, "tokens": current_len})
        current, current_len = [], 0

    for start in range(0, len(docs), ENCODE_BATCH):
        batch = docs[start:start + ENCODE_BATCH]
        encodings = tokenizer.encode_batch_fast([text for _, text in batch], add_special_tokens=False)
        for (source, text), encoding in zip(batch, encodings, strict=True):
            ids = encoding.ids + ([eos_id] if eos_id is not None else [])
            if not sources or sources[-1]["name"] != source:
                sources.append({"name": source, "tokens": 0, "bytes": 0, "documents": 0})
            sources[-1]["tokens"] += len(ids)
            sources[-1]["bytes"] += len(text.encode())
            sources[-1]["documents"] += 1
            array = np.asarray(ids, dtype=np.int64)
            while len(array):
                piece, array = array[:shard_tokens - current_len], array[shard_tokens - current_len:]
                current.append(piece)
                current_len += len(piece)
                total += len(piece)
                if current_len == shard_tokens:
                    flush()
        batch_bytes = sum(len(text.encode()) for _, text in batch)
        total_bytes += batch_bytes
        progress.update(batch_bytes)
    flush()
    return {"tokens": total, "documents": len(docs), "bytes": total_bytes, "shards": shards, "sources": sources}


@contextlib.contextmanager
def reading_inputs():
    """An input that exists but cannot be read (permissions, a broken archive) as one DataError line."""
    try:
        yield
    except (OSError, EOFError, lzma.LZMAError) as err:
        where = getattr(err, "filename", None) or "an input"
        raise DataError(f"cannot read {where} ({first_line(err)}); check the file and its permissions") from None


def own_files(out: Path) -> list[str] | None:
    """The files a previous `prepare` wrote in `out`, from its meta.json; None if `out` holds no readable one."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        shards = [shard["file"] for split in ("train", "val") for shard in meta[split]["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ["meta.json", "tokenizer.json", *shards]


def _inputs(data: DataConfig) -> tuple[list[SourceFile], dict, str]:
    """(source files, what the output depends on, its digest) of a [data] section."""
    files = resolve_sources(data.sources, data.inputs)
    if data.tokenizer and not Path(data.tokenizer).is_file():
        raise DataError(f"data.tokenizer {data.tokenizer} not found; give an existing tokenizer.json or leave it empty")
    with reading_inputs():
        inputs = fingerprint(data, files)
    return files, inputs, hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _up_to_date(out: Path, digest: str) -> bool:
    return own_files(out) is not None and json.loads((out / "meta.json").read_text()).get("fingerprint") == digest


def require_prepared(data: DataConfig) -> Path:
    """data.dir, once it holds the shards of exactly this [data] section (a run reads, never builds, its data)."""
    out = Path(data.dir)
    if not _up_to_date(out, _inputs(data)[2]):
        raise DataError(f"data.dir {out} does not hold the shards of this config's [data] (missing or stale); "
                        f"run `scalevec data prepare` with this config first (`scalevec train` does)")
    return out


def prepare(data: DataConfig, progress: bool | None = None, log=print, overwrite: bool = False,
            protect: Path | None = None, flag: str = "data.dir") -> Path:
    """Build (or find up to date) the token shards of `data` in `data.dir`; returns the directory.

    An existing data.dir that another prepare did not write is replaced only with `overwrite`.
    `protect`: a directory (the run being started) that data.dir must not be or contain.
    """
    out = Path(data.dir)
    if protect is not None and contains(out, protect):
        raise DataError(f"{flag} {out} is or contains the run directory {protect}; preparing data there would "
                        f"replace the run: choose another {flag}")
    fix = ("choose another path or pass --overwrite to replace it" if flag == "--out" else
           f"choose another {flag}, or replace it with `scalevec data prepare --out {out} --overwrite`")
    try:
        check_output_path(out, flag)  # a file, or a path that cannot be written: refuse now
    except OutputError as err:
        raise DataError(str(err)) from None
    files, inputs, digest = _inputs(data)
    with writing(f"the data directory {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
    with parent_lock(out):  # concurrent runs of a sweep prepare the same data once
        if _up_to_date(out, digest):
            log(f"data in {out} is up to date")
            return out
        try:
            claim_directory(out, own_files(out), overwrite, flag, fix)
        except OutputError as err:
            raise DataError(str(err)) from None
        _build_shards(data, files, inputs, digest, out, progress, log)
    return out


def _build_shards(data, files, inputs, digest, out: Path, progress, log) -> None:
    started = time.perf_counter()
    texts, per_source = [], []  # texts: (source name, document), grouped by source
    for source in files:
        with reading_inputs():
            docs = [t for t in read_documents(source, data.jsonl_field, data.parquet_column) if t]
        if not docs:
            raise DataError(f"input {source.name} holds no text; remove it or fill it")
        per_source.append({"name": source.name, "sha256": inputs["sources"][len(per_source)]["sha256"],
                           "documents": len(docs), "bytes": sum(len(t.encode()) for t in docs)})
        texts.extend((source.name, doc) for doc in docs)
    val = split_documents([name for name, _ in texts], [len(t) for _, t in texts], data.val_fraction,
                          data.split_seed)
    train_texts = [t for i, t in enumerate(texts) if i not in val]
    val_texts = [t for i, t in enumerate(texts) if i in val]

    if data.tokenizer:
        tokenizer = load_tokenizer(data.tokenizer)
    else:
        log(f"training a byte-level BPE tokenizer (vocab {data.vocab_size}) on {len(train_texts)} documents")
        tokenizer = train_tokenizer([text for _, text in train_texts], data.vocab_size,
                                    sys.stderr.isatty() if progress is None else progress)
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab < 2**16 else np.uint32
    eos_id = tokenizer.token_to_id(END_OF_TEXT)

    with new_directory(out, f"the data directory {out}") as tmp:
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
    log(f"wrote {out}: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} validation tokens, "
        f"vocab {vocab}, tokenized {total_bytes / 1e6 / encode_seconds:.1f} MB/s, "
        f"{time.perf_counter() - started:.0f}s in all")
