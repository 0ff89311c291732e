"""`scalevec data prepare`: documents -> train/validation split -> byte-level BPE -> token shards.

The output directory holds `meta.json`, `tokenizer.json` and memmap shards (`train_000.bin`, ...,
`val_000.bin`, ...). `meta.json` is the manifest: a stale directory is rebuilt only if it holds nothing but the
files meta.json lists; any other existing path needs `--overwrite`, and a file is never touched. Re-running with the
same inputs is a no-op (the fingerprint matches).

At any corpus size, in bounded memory: a first streaming pass indexes every document's size (the split, the
tokenizer's sample and the parts need sizes, not text), then the documents stream again through worker processes
into shards written as they fill. The work happens in `.<out>.prepare-<fingerprint>/` beside the output, in parts
(`--part i/n`: a contiguous range of documents, by file and within a file by byte range at a document boundary);
a part checkpoints as its shards fill, so a killed preparation resumes from its finished shards. The last part to
finish joins the parts into the shards one process would have written and renames the whole into place: the output
never exists half-written. A failed preparation (bad input, full disk) removes its work; an interrupted one (Ctrl-C,
SIGTERM, SIGKILL) leaves it to resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..config import DataConfig
from ..outputs import (
    DirectoryLock,
    OutputError,
    check_output_path,
    claim_directory,
    contains,
    file_sha256,
    first_line,
    parent_lock,
    remove_tree,
    replace_directory,
    write_atomic,
    write_text_atomic,
    writing,
)
from .encode import Encoder, batches
from .index import DocumentIndex, build_index, documents_from
from .progress import Progress, duration
from .shards import ShardWriter, StaleState, join_parts
from .sources import DataError, SourceFile, resolve_sources

FORMAT = 3  # 2: splits record their bytes (bits per byte); 3: a split stratified by source, spans per source
END_OF_TEXT = "<|endoftext|>"
CHECKPOINT_SECONDS = 30.0  # a part also checkpoints whenever a shard fills
DEFAULTS = DataConfig()


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_part(text: str) -> tuple[int, int]:
    """`i/n` (0 <= i < n) as (i, n)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise DataError(f"--part {text!r} is not i/n with 0 <= i < n; e.g. --part 0/4 (SLURM: "
                        "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(match[1]), int(match[2])


def train_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool, length: int | None = None) -> Tokenizer:
    """Byte-level BPE: every byte sequence encodes, and decode(encode(text)) == text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for missing and malformed files
        raise DataError(f"cannot load tokenizer {path}: {str(err).splitlines()[0]}; give a tokenizers "
                        "tokenizer.json") from None


def fingerprint(data: DataConfig, files: list[SourceFile]) -> dict:
    """Everything the output depends on (settings at their defaults left out, so older outputs stay current)."""
    inputs = {
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
    if data.on_bad_record != DEFAULTS.on_bad_record:
        inputs["on_bad_record"] = data.on_bad_record
    if not data.tokenizer and data.tokenizer_sample_bytes != DEFAULTS.tokenizer_sample_bytes:
        inputs["tokenizer_sample_bytes"] = data.tokenizer_sample_bytes
    return inputs


def split_documents(files: list[tuple[str, int]], sizes, val_fraction: float, seed: int) -> np.ndarray:
    """Indices of validation documents, given (source name, document count) per file and each document's size,
    stratified by source: each source of two or more documents gives about val_fraction of its text (at least one
    document, never all), from a seeded shuffle; single-document sources (e.g. a folder of .txt files) are split
    as one pool. So every source the split can hold is in it. A sorted int64 array: 8 bytes a validation document
    (a set of Python ints costs some 60)."""
    if val_fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) < 2:
        raise DataError("need at least 2 documents to split train/validation; add data or set "
                        "data.val_fraction=0")
    groups: dict[str, list[np.ndarray]] = {}
    start = 0
    for name, count in files:
        groups.setdefault(name, []).append(np.arange(start, start + count, dtype=np.int64))
        start += count
    members = {name: np.concatenate(ranges) for name, ranges in groups.items()}
    singles = [m for m in members.values() if len(m) == 1]
    pool = np.concatenate(singles) if singles else np.zeros(0, dtype=np.int64)
    strata = [m for m in members.values() if len(m) > 1] + ([pool] if len(pool) > 1 else [])
    rng, val = random.Random(seed), []
    for stratum in strata:
        order = stratum.copy()
        rng.shuffle(order)  # the same permutation as of a list: shuffle depends only on the length
        budget = val_fraction * int(sizes[stratum].sum())
        taken_before = np.concatenate([[0], np.cumsum(sizes[order[:-2]])])  # before each of order[:-1]
        full = np.flatnonzero(taken_before >= budget)  # the last one always stays in train
        val.append(order[:full[0] if len(full) else len(order) - 1])
    return np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)


def is_member(numbers: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Which of `numbers` are in the sorted array `members`."""
    if not len(members):
        return np.zeros(len(numbers), dtype=bool)
    return members[np.minimum(np.searchsorted(members, numbers), len(members) - 1)] == numbers


@contextlib.contextmanager
def reading_inputs():
    """An input that exists but cannot be read (permissions, a broken archive) as one DataError line."""
    try:
        yield
    except (OSError, EOFError, lzma.LZMAError) as err:
        where = getattr(err, "filename", None) or "an input"
        raise DataError(f"cannot read {where} ({first_line(err)}); check the file and its permissions") from None


def own_files(out: Path) -> list[str] | None:
    """The files a previous `prepare` or `import` wrote in `out`, from its meta.json; None if `out` holds no
    readable one. Shards an import references in place (absolute paths) are not in `out`."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        shards = [shard["file"] for split in ("train", "val") for shard in meta[split]["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ["meta.json", "tokenizer.json", *(s for s in shards if not Path(s).is_absolute())]


def _inputs(data: DataConfig) -> tuple[list[SourceFile], dict, str]:
    """(source files, what the output depends on, its digest) of a [data] section."""
    files = resolve_sources(data.sources, data.inputs)
    if data.tokenizer and not Path(data.tokenizer).is_file():
        raise DataError(f"data.tokenizer {data.tokenizer} not found; give an existing tokenizer.json or leave it empty")
    with reading_inputs():
        inputs = fingerprint(data, files)
    return files, inputs, hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _meta(out: Path) -> dict | None:
    try:
        return json.loads((out / "meta.json").read_text()) if own_files(out) is not None else None
    except (OSError, ValueError):
        return None


def imported_from(out: Path) -> dict | None:
    """The `imported` record of a directory `scalevec data import` wrote (its tokens came from elsewhere, so no
    [data] section describes them), else None."""
    meta = _meta(out)
    return meta.get("imported") if meta else None


def _up_to_date(out: Path, digest: str) -> bool:
    meta = _meta(out)
    return meta is not None and meta.get("fingerprint") == digest


def require_prepared(data: DataConfig) -> Path:
    """data.dir, once it holds the shards of exactly this [data] section, or tokens imported with `scalevec data
    import` (a run reads, never builds, its data)."""
    out = Path(data.dir)
    if imported_from(out) is None and not _up_to_date(out, _inputs(data)[2]):
        raise DataError(f"data.dir {out} does not hold the shards of this config's [data] (missing or stale); "
                        f"run `scalevec data prepare` with this config first (`scalevec train` does)")
    return out


def prepare(data: DataConfig, progress: bool | None = None, log=print, overwrite: bool = False,
            protect: Path | None = None, flag: str = "data.dir", workers: int | None = None,
            part: tuple[int, int] = (0, 1)) -> Path:
    """Build (or find up to date) the token shards of `data` in `data.dir`; returns the directory.

    An existing data.dir that another prepare did not write is replaced only with `overwrite`.
    `protect`: a directory (the run being started) that data.dir must not be or contain.
    `workers`: tokenizer processes (default: the cores available). `part` (i, n): prepare only part i of n; the
    last of the n to finish writes data.dir (n processes, or nodes sharing a filesystem, prepare it together).
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
    imported = imported_from(out)
    if imported is not None and not overwrite:
        log(f"data in {out} was imported ({imported['tokens']:,} tokens from elsewhere); the [data] inputs are not "
            "used")
        return out
    files, inputs, digest = _inputs(data)
    with writing(f"the data directory {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
    if _up_to_date(out, digest):  # checked again under the lock; a no-op starts no workers
        log(f"data in {out} is up to date")
        return out
    preparation = Preparation(data, files, inputs, digest, out, progress, log)
    # the tokenizer workers start first, while this process is small and holds no lock (see encode.py)
    with Encoder(workers or default_workers()) as encoder:
        with parent_lock(out):  # concurrent runs of a sweep prepare the same data once
            if _up_to_date(out, digest):
                log(f"data in {out} is up to date")
                return out
            _claim(out, overwrite, flag, fix)
            if part[1] == 1:
                preparation.run(encoder, part, overwrite, flag, fix)
                return out
        # the parts of a preparation run side by side: none holds the output's lock while it works
        preparation.run(encoder, part, overwrite, flag, fix)
    return out


def _claim(out: Path, overwrite: bool, flag: str, fix: str) -> None:
    try:
        claim_directory(out, own_files(out), overwrite, flag, fix)
    except OutputError as err:
        raise DataError(str(err)) from None


class Preparation:
    """One [data] section's preparation in its work directory: index, split, tokenizer, parts, join."""

    def __init__(self, data: DataConfig, files: list[SourceFile], inputs: dict, digest: str, out: Path, progress,
                 log):
        self.data, self.files, self.inputs, self.digest, self.out = data, files, inputs, digest, out
        self.progress, self.log = progress, log
        self.work = out.parent / f".{out.name}.prepare-{digest[:16]}"
        self.started, self.rate = time.perf_counter(), None

    def run(self, encoder: Encoder, part: tuple[int, int], overwrite: bool, flag: str, fix: str) -> None:
        index, count = part
        part_dir = self.work / f"part-{index:05d}-of-{count:05d}"
        what = f"the data directory {self.out}"
        with writing(what, "run it again"):
            part_dir.mkdir(parents=True, exist_ok=True)
        with DirectoryLock(part_dir, "the data preparation part"):  # refused before anything could be removed
            try:
                with writing(what, "run it again"):
                    self._shared()
                    self._part(encoder, part_dir, index, count)
                    encoder.close()  # the workers' memory is not needed by the join
                    # one process runs inside prepare's lock of the output already; a part takes it to join
                    with parent_lock(self.out) if count > 1 else contextlib.nullcontext():
                        self._join(count, overwrite, flag, fix)
            except Exception:
                remove_tree(self.work if count == 1 else part_dir)  # a failure leaves nothing; a kill resumes
                with contextlib.suppress(OSError):
                    self.work.rmdir()  # once no other part is in it
                raise

    def _shared(self) -> None:
        """The index, the split and the tokenizer, made once in the work directory for every part."""
        with parent_lock(self.work / "index.npz"):  # an flock of the work directory: one part builds, others wait
            path = self.work / "index.npz"
            if path.is_file():
                self.index = DocumentIndex.load(path)
            else:
                total = sum(f.path.stat().st_size for f in self.files)
                with reading_inputs(), Progress("indexing", total, self.progress, self.log) as bar:
                    self.index = build_index(self.files, self.data.jsonl_field, self.data.parquet_column,
                                             self.data.on_bad_record, bar)
                write_atomic(path, self.index.save)
            self.val = split_documents([(f.name, int(n)) for f, n in zip(self.files, self.index.file_documents,
                                                                           strict=True)],
                                       self.index.chars, self.data.val_fraction, self.data.split_seed)
            self.tokenizer_path = self.work / "tokenizer.json"
            if not self.tokenizer_path.is_file():
                tokenizer = load_tokenizer(self.data.tokenizer) if self.data.tokenizer else self._train_tokenizer()
                write_atomic(self.tokenizer_path, lambda tmp: tokenizer.save(str(tmp)))
        tokenizer = load_tokenizer(self.tokenizer_path)
        self.vocab = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(END_OF_TEXT)
        self.dtype = np.dtype(np.uint16 if self.vocab < 2**16 else np.uint32)

    def _train_tokenizer(self) -> Tokenizer:
        """A byte-level BPE trained on the training split, or a seeded sample of its documents when it is larger
        than data.tokenizer_sample_bytes."""
        index, data = self.index, self.data
        train = np.ones(len(index.bytes), dtype=bool)
        train[self.val] = False
        train_bytes = int(index.bytes[train].sum())
        if train_bytes > data.tokenizer_sample_bytes:
            share = data.tokenizer_sample_bytes / train_bytes
            train &= np.random.default_rng(data.split_seed).random(len(train)) < share
        count = int(train.sum())
        if not count:  # an empty sample trains no merge: a tokenizer of bytes alone, whatever the vocab asked
            raise DataError(f"data.tokenizer_sample_bytes={data.tokenizer_sample_bytes:,} samples no training "
                            f"document (their mean size is {train_bytes // max(1, len(train) - len(self.val)):,} "
                            "bytes); raise it, or give a --tokenizer")
        self.log(f"training a byte-level BPE tokenizer (vocab {data.vocab_size}) on {count} documents "
                 f"({int(index.bytes[train].sum()) / 1e6:.1f} MB)")
        texts = (text for number, _, text in documents_from(self.files, index, 0, len(train), data.jsonl_field,
                                                             data.parquet_column, data.on_bad_record)
                 if train[number])
        with reading_inputs():
            return train_tokenizer(texts, data.vocab_size, sys.stderr.isatty() if self.progress is None
                                   else self.progress, length=count)

    def part_range(self, index: int, count: int) -> tuple[int, int]:
        """Documents [start, stop) of part `index` of `count`: equal shares of the text's bytes, cut at documents."""
        ends = np.cumsum(self.index.bytes)
        total = int(ends[-1])
        start, stop = (int(np.searchsorted(ends, total * k // count, side="right")) if k else 0
                       for k in (index, index + 1))
        return start, stop

    def _part(self, encoder: Encoder, part_dir: Path, index: int, count: int) -> None:
        """Tokenize this part's documents into its shards, resuming from its last checkpoint."""
        done, state_path = part_dir / "done.json", part_dir / "state.json"
        if done.is_file():
            return
        start, stop = self.part_range(index, count)
        sha = file_sha256(self.tokenizer_path)
        state = json.loads(state_path.read_text()) if state_path.is_file() else None
        if state and (state["range"] != [start, stop] or state["tokenizer_sha256"] != sha):
            state = None
        try:
            writers = {split: ShardWriter(part_dir, split, self.dtype, self.data.shard_tokens,
                                          state and state[split]) for split in ("train", "val")}
        except StaleState as err:
            self.log(f"cannot resume part {index}/{count} ({err}): starting it again")
            state = None
            writers = {split: ShardWriter(part_dir, split, self.dtype, self.data.shard_tokens)
                       for split in ("train", "val")}
        first = state["next"] if state else start
        if first > start:
            self.log(f"resuming part {index}/{count} at document {first:,} of {start:,}..{stop:,}")
        self._encode(encoder, writers, first, stop, lambda next_document: write_text_atomic(state_path, json.dumps({
            "range": [start, stop], "tokenizer_sha256": sha, "next": next_document,
            **{split: writer.checkpoint() for split, writer in writers.items()}})))
        summary = {"range": [start, stop], **{split: writer.finish() for split, writer in writers.items()}}
        write_text_atomic(done, json.dumps(summary))
        state_path.unlink(missing_ok=True)

    def _encode(self, encoder: Encoder, writers: dict[str, ShardWriter], first: int, stop: int, checkpoint
                ) -> None:
        index, data, names = self.index, self.data, [f.name for f in self.files]
        total = int(index.bytes[first:stop].sum())
        documents = documents_from(self.files, index, first, stop, data.jsonl_field, data.parquet_column,
                                   data.on_bad_record)
        last, shards = time.perf_counter(), self._shard_count(writers)
        with Progress("tokenizing", total, self.progress, self.log) as bar:
            for batch, ids, lengths in encoder.encode(batches(documents), str(self.tokenizer_path), self.eos_id):
                ends = np.cumsum(lengths)
                in_val = is_member(np.array([item[0] for item in batch]), self.val)
                for (number, file_number, _), end, length, val in zip(batch, ends, lengths, in_val, strict=True):
                    writers["val" if val else "train"].add(ids[end - length:end], names[file_number],
                                                           int(index.bytes[number]))
                bar.update(int(index.bytes[batch[0][0]:batch[-1][0] + 1].sum()))
                if self._shard_count(writers) != shards or time.perf_counter() - last > CHECKPOINT_SECONDS:
                    checkpoint(batch[-1][0] + 1)
                    last, shards = time.perf_counter(), self._shard_count(writers)
            self.rate = bar.rate()

    @staticmethod
    def _shard_count(writers: dict[str, ShardWriter]) -> int:
        return sum(len(w.summary["shards"]) for w in writers.values())

    def _join(self, count: int, overwrite: bool, flag: str, fix: str) -> None:
        """Once every part is done: the shards one process would have written, with meta.json, put in place."""
        if _up_to_date(self.out, self.digest):  # another part joined first
            return
        parts = [self.work / f"part-{i:05d}-of-{count:05d}" for i in range(count)]
        missing = [i for i, p in enumerate(parts) if not (p / "done.json").is_file()]
        if missing:
            self.log(f"part done; {len(missing)} of {count} parts still to finish (the last one joins them): "
                     f"{', '.join(str(i) for i in missing[:8])}{' ...' if len(missing) > 8 else ''}")
            return
        _claim(self.out, overwrite, flag, fix)
        summaries = [json.loads((p / "done.json").read_text()) for p in parts]
        joined = self.work / "joined"
        remove_tree(joined)  # a join killed part way starts again: it only linked or copied the parts' shards
        joined.mkdir()
        splits = {split: join_parts([(p, s[split]) for p, s in zip(parts, summaries, strict=True)], joined, split,
                                    self.dtype, self.data.shard_tokens) for split in ("train", "val")}
        shutil.copyfile(self.tokenizer_path, joined / "tokenizer.json")
        index = self.index
        meta = {
            "format": FORMAT,
            "fingerprint": self.digest,
            "inputs": self.inputs,
            "sources": [{"name": f.name, "sha256": self.inputs["sources"][i]["sha256"],
                         "documents": int(index.file_documents[i]),
                         "bytes": int(index.bytes[index.file_starts[i]:index.file_starts[i + 1]].sum())}
                        for i, f in enumerate(self.files)],
            "tokenizer_sha256": file_sha256(joined / "tokenizer.json"),
            "vocab_size": self.vocab,
            "eos_id": self.eos_id,
            "dtype": self.dtype.name,
            **splits,
        }
        if self.data.on_bad_record == "skip":
            meta["skipped_records"] = index.skipped
            meta["skipped_examples"] = index.skipped_examples
        (joined / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        replace_directory(joined, self.out)
        remove_tree(self.work)
        rate = f", tokenized {self.rate / 1e6:.1f} MB/s" if self.rate else ""
        skipped = f", skipped {index.skipped:,} bad records" if index.skipped else ""
        self.log(f"wrote {self.out}: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} validation "
                 f"tokens, vocab {self.vocab}{rate}{skipped}, {duration(time.perf_counter() - self.started)} in all")
