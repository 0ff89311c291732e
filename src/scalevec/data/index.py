"""The document index: one streaming pass over the inputs that keeps each document's size and place, never its text.

What must be global in a preparation (the validation split, the tokenizer's sample, the parts' ranges) needs each
document's size, not its text: the index holds 24 bytes per document (characters, UTF-8 bytes, byte offset) and
the later passes stream the documents again, from any document on.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .progress import Progress
from .sources import BadRecords, DataError, SourceFile, located_documents

SEEKABLE = ".jsonl"  # a plain .jsonl file resumes by seeking to a record's byte offset; others read up to it


@dataclass
class DocumentIndex:
    """The non-empty documents of the inputs, in order: per file its count, per document its size and place."""

    file_documents: np.ndarray  # documents per input file
    chars: np.ndarray  # characters per document (the split's size, as before the index existed)
    bytes: np.ndarray  # UTF-8 bytes per document
    offsets: np.ndarray  # byte offset of a plain .jsonl record, else 0
    skipped: int  # bad records skipped (data.on_bad_record = "skip")
    skipped_examples: list[str]

    @property
    def file_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.file_documents)])

    def save(self, path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, file_documents=self.file_documents, chars=self.chars, bytes=self.bytes,
                     offsets=self.offsets, skipped=np.array([self.skipped]),
                     skipped_examples=np.array(self.skipped_examples, dtype=str))

    @classmethod
    def load(cls, path: Path) -> DocumentIndex:
        with np.load(path) as npz:
            return cls(npz["file_documents"], npz["chars"], npz["bytes"], npz["offsets"], int(npz["skipped"][0]),
                       npz["skipped_examples"].tolist())


def build_index(files: list[SourceFile], field: str, column: str, on_bad_record: str, progress: Progress
                ) -> DocumentIndex:
    """Read every input once, keeping only sizes: an input without a document is an error."""
    counts, chars, sizes, offsets = [], array.array("q"), array.array("q"), array.array("q")
    bad = BadRecords(on_bad_record)
    for source in files:
        before, seen = len(chars), 0
        for offset, text in located_documents(source, field, column, bad):
            if not text:
                continue
            chars.append(len(text))
            sizes.append(len(text.encode()))
            offsets.append(offset)
            if source.path.suffix == SEEKABLE and offset - seen > 1 << 24:
                progress.update(offset - seen)
                seen = offset
        counts.append(len(chars) - before)
        progress.update(source.path.stat().st_size - seen)
        if not counts[-1]:
            raise DataError(f"input {source.name} holds no text; remove it or fill it")
    return DocumentIndex(np.array(counts, dtype=np.int64), np.frombuffer(chars, dtype=np.int64),
                         np.frombuffer(sizes, dtype=np.int64), np.frombuffer(offsets, dtype=np.int64),
                         bad.count, bad.examples)


def documents_from(files: list[SourceFile], index: DocumentIndex, start: int, stop: int, field: str, column: str,
                   on_bad_record: str) -> Iterator[tuple[int, int, str]]:
    """(document number, file number, text) of documents start..stop-1, seeking where the format allows."""
    starts = index.file_starts
    number = start
    first = int(np.searchsorted(starts, start, side="right")) - 1
    for file_number in range(first, len(files)):
        if number >= stop:
            return
        source, skip = files[file_number], number - int(starts[file_number])
        seek = int(index.offsets[number]) if source.path.suffix == SEEKABLE and skip else 0
        texts = (text for _, text in located_documents(source, field, column, BadRecords(on_bad_record), seek) if text)
        if not seek:
            texts = itertools.islice(texts, skip, None)
        for text in itertools.islice(texts, min(stop, int(starts[file_number + 1])) - number):
            yield number, file_number, text
            number += 1
