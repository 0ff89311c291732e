"""`scalevec data import`: tokens prepared elsewhere as a data directory the loader reads.

Flat token arrays, uint16 or uint32, documents separated by an end-of-text id: nanoGPT's `train.bin`/`val.bin`,
Megatron's `.bin`, dolma's headerless `.npy` memmaps, or a NumPy `.npy` file; plus the `tokenizer.json` they were
made with. One streaming pass checks every id against the vocabulary and counts documents and text bytes (a
token's bytes, exact for byte-level BPE); the arrays are then hard-linked into the directory, or referenced where
they are when the filesystem cannot link, never copied (a `.npy` file's shard records where its tokens start, past
its header).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import decoders

from ..outputs import OutputError, check_output_path, claim_directory, file_sha256, new_directory, parent_lock
from .prepare import END_OF_TEXT, FORMAT, load_tokenizer, own_files
from .progress import Progress
from .sources import DataError

CHECK_TOKENS = 1 << 24  # tokens per read of the checking pass
DTYPES = ("uint16", "uint32")


@dataclass
class TokenFile:
    path: Path
    dtype: np.dtype
    offset: int  # bytes before the tokens: a .npy header, else 0
    guessed: bool = False  # headerless, its dtype taken from the vocabulary's size (no --dtype)

    @property
    def tokens(self) -> int:
        return (self.path.stat().st_size - self.offset) // self.dtype.itemsize

    def array(self) -> np.ndarray:
        if not self.tokens:  # numpy cannot map an empty file
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.tokens,))


def _open(path: Path, dtype: str | None, vocab: int) -> TokenFile:
    """A token file's layout: a .npy header if it has one, else the given (or the vocabulary's) dtype."""
    with open(path, "rb") as fh:
        if fh.read(6) == b"\x93NUMPY":
            fh.seek(0)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(fh))
            if read_header is None:
                raise DataError(f"{path} has a .npy header of an unknown version; save it with numpy.save")
            shape, _, kind = read_header(fh)
            if len(shape) != 1 or kind.name not in DTYPES or kind.byteorder == ">":
                raise DataError(f"{path} holds a {kind} array of shape {shape}; import a flat uint16 or uint32 "
                                "array (little-endian)")
            return TokenFile(path, np.dtype(kind.name), fh.tell())
    kind = np.dtype(dtype or ("uint16" if vocab < 2**16 else "uint32"))
    if path.stat().st_size % kind.itemsize:
        raise DataError(f"{path} is {path.stat().st_size} bytes, not a whole number of {kind.name} tokens; give "
                        "the --dtype it was written with")
    return TokenFile(path, kind, 0, guessed=dtype is None)


def _expand(patterns: list[str], flag: str) -> list[Path]:
    paths = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"{flag} {pattern!r} matches no file; give token files (.bin or .npy) or a glob of them")
        paths += matches
    return paths


def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for (special tokens none): exact for byte-level BPE, whose token strings hold one
    character per byte; otherwise the bytes of the token decoded alone."""
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    if isinstance(tokenizer.decoder, decoders.ByteLevel):
        lengths = [len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.get_vocab_size())]
    else:
        lengths = [len(tokenizer.decode([i]).encode()) for i in range(tokenizer.get_vocab_size())]
    return np.array([0 if i in special else n for i, n in enumerate(lengths)], dtype=np.int64)


def _check(files: list[TokenFile], vocab: int, eos_id: int, lengths: np.ndarray, tokenizer: str, bar) -> dict:
    """One split's tokens, documents and bytes, every id checked against the vocabulary."""
    tokens = documents = text_bytes = 0
    for file in files:
        array, last, odd_ids = file.array(), None, 0
        for start in range(0, len(array), CHECK_TOKENS):  # (an even step: odd positions stay odd)
            chunk = np.asarray(array[start:start + CHECK_TOKENS])
            odd_ids += int(np.count_nonzero(chunk[1::2]))
            if len(chunk) and int(chunk.max()) >= vocab:
                where = start + int(np.argmax(chunk >= vocab))
                raise DataError(f"{file.path}: token {where:,} is id {int(array[where])}, outside the vocabulary of "
                                f"{tokenizer} ({vocab} ids); import the tokens with the tokenizer they were made with")
            documents += int(np.count_nonzero(chunk == eos_id))
            text_bytes += int(lengths[chunk].sum())
            last = int(chunk[-1]) if len(chunk) else last
            bar.update(chunk.nbytes)
        if file.guessed and file.dtype.itemsize == 2 and len(array) >= 16 and not odd_ids:
            # little-endian uint32 ids below 65,536 read as uint16: each id, then its zero high half
            raise DataError(f"{file.path}: every second uint16 id is 0, as in uint32 tokens read as uint16; give "
                            "--dtype uint32 (or --dtype uint16 if they are uint16)")
        tokens += len(array)
        documents += last is not None and last != eos_id  # a last document without its separator
    return {"tokens": tokens, "documents": documents, "bytes": text_bytes}


def import_tokens(train: list[str], val: list[str], tokenizer_path: str, out: Path, dtype: str | None = None,
                  eos_id: int | None = None, source: str = "imported", overwrite: bool = False,
                  progress: bool | None = None, log=print) -> Path:
    """Make `out` a data directory of the given token files (train and validation) and their tokenizer."""
    out = Path(out)
    try:
        check_output_path(out, "--out")
    except OutputError as err:
        raise DataError(str(err)) from None
    if not Path(tokenizer_path).is_file():
        raise DataError(f"--tokenizer {tokenizer_path} not found; give the tokenizer.json the tokens were made with")
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id(END_OF_TEXT) if eos_id is None else eos_id
    if eos_id is None:
        raise DataError(f"{tokenizer_path} has no {END_OF_TEXT} token; give the document separator's id with --eos-id")
    if not 0 <= eos_id < vocab:
        raise DataError(f"--eos-id {eos_id} is outside the vocabulary of {tokenizer_path} (0..{vocab - 1})")
    splits = {"train": _expand(train, "--train"), "val": _expand(val, "--val")}
    files = {split: [_open(p, dtype, vocab) for p in paths] for split, paths in splits.items()}
    kinds = {f.dtype.name for group in files.values() for f in group}
    if len(kinds) > 1:
        raise DataError(f"the token files mix {' and '.join(sorted(kinds))}; convert them to one dtype first")
    kind = np.dtype(kinds.pop())
    if kind.itemsize == 2 and vocab > 2**16:
        raise DataError(f"uint16 tokens cannot hold the {vocab} ids of {tokenizer_path}; give --dtype uint32")
    inputs = {"format": FORMAT, "tokenizer": file_sha256(Path(tokenizer_path)), "eos_id": eos_id, "source": source,
              **{split: [[str(f.path.resolve()), f.path.stat().st_size, f.path.stat().st_mtime_ns] for f in group]
                 for split, group in files.items()}}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    out.parent.mkdir(parents=True, exist_ok=True)
    with parent_lock(out):
        try:
            if json.loads((out / "meta.json").read_text()).get("fingerprint") == digest:
                log(f"data in {out} is up to date")
                return out
        except (OSError, ValueError):
            pass
        try:
            claim_directory(out, own_files(out), overwrite, "--out")
        except OutputError as err:
            raise DataError(str(err)) from None
        lengths = token_bytes(tokenizer)
        total = sum(f.tokens * kind.itemsize for group in files.values() for f in group)
        with Progress("checking", total, progress, log) as bar:
            summaries = {split: _check(group, vocab, eos_id, lengths, tokenizer_path, bar)
                         for split, group in files.items()}
        for split, summary in summaries.items():
            if not summary["tokens"]:
                raise DataError(f"--{split} holds no tokens (its files are empty); give the {split} split's token "
                                "files")
        with new_directory(out, f"the data directory {out}") as tmp:
            ways = set()
            for split, group in files.items():
                summaries[split]["shards"] = [_place(f, tmp, f"{split}_{i:03d}.bin", ways) for i, f in enumerate(group)
                                              if f.tokens]
                summaries[split]["sources"] = [{"name": source, **{k: summaries[split][k] for k in
                                                                   ("tokens", "bytes", "documents")}}]
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")  # byte for byte: a run's data.tokenizer matches
            meta = {"format": FORMAT, "fingerprint": digest, "inputs": inputs,
                    "imported": {"tokens": sum(s["tokens"] for s in summaries.values()), "placed": sorted(ways)},
                    "sources": [{"name": source, "documents": sum(s["documents"] for s in summaries.values()),
                                 "bytes": sum(s["bytes"] for s in summaries.values())}],
                    "tokenizer_sha256": file_sha256(tmp / "tokenizer.json"), "vocab_size": vocab, "eos_id": eos_id,
                    "dtype": kind.name, **summaries}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    log(f"imported {out}: {summaries['train']['tokens']:,} train and {summaries['val']['tokens']:,} validation "
        f"tokens, vocab {vocab}, ids checked; arrays {', '.join(sorted(ways))}")
    return out


def _place(file: TokenFile, directory: Path, name: str, ways: set) -> dict:
    """A token file as a shard of `directory`: hard-linked, else referenced in place; a .npy file's tokens start
    past its header (the shard's `offset`)."""
    shard = {"tokens": file.tokens, **({"offset": file.offset} if file.offset else {})}
    try:
        os.link(file.path, directory / name)
    except OSError:
        ways.add("referenced in place")
        return {"file": str(file.path.resolve()), **shard}
    ways.add("hard-linked")
    return {"file": name, **shard}
