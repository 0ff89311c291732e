"""Documents in: the bundled corpus and the user's .txt, .jsonl and .parquet files."""

from __future__ import annotations

import glob
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import BUNDLED_SOURCES
from ..errors import BadInput
from ..outputs import file_sha256, first_line

CORPUS_DIR = Path(__file__).parent / "corpus"
USER_SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(BadInput):
    """Bad data input; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str  # a bundled source's name, or the user path as given

    def sha256(self) -> str:
        return file_sha256(self.path)


def resolve_sources(sources: list[str], inputs: list[str]) -> list[SourceFile]:
    """Bundled source names plus user files, directories or globs, in a stable order."""
    files = []
    for name in sources:
        if name not in BUNDLED_SOURCES:
            raise DataError(f"unknown bundled source {name!r}; choose from {', '.join(BUNDLED_SOURCES)}")
        files.append(SourceFile(CORPUS_DIR / f"{name}.jsonl.xz", name))
    for pattern in inputs:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix in USER_SUFFIXES and p.is_file())
        elif any(ch in pattern for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        else:
            matches = [path] if path.is_file() else []
        if not matches:
            raise DataError(f"input {pattern!r} matches no file; give an existing file, directory or glob "
                            f"of {', '.join(USER_SUFFIXES)} files")
        for match in matches:
            if match.suffix not in USER_SUFFIXES:
                raise DataError(f"input {match} has unsupported type {match.suffix!r}; use {', '.join(USER_SUFFIXES)}")
            files.append(SourceFile(match, str(match)))
    if not files:
        raise DataError("no data sources; name bundled --sources or give --input files")
    return files


class BadRecords:
    """What `data.on_bad_record` does with a record that cannot be read: `error` stops with a line naming it,
    `skip` counts it (and keeps the first few places, for meta.json) and goes on. `skippable`: the reader has that
    option, so the error offers it (a reader without one, such as `scalevec eval`, offers only the fix)."""

    EXAMPLES = 10

    def __init__(self, policy: str = "error", skippable: bool = True):
        self.policy, self.skippable, self.count, self.examples = policy, skippable, 0, []

    def bad(self, where: str, problem: str, fix: str, records: int = 1) -> None:
        if self.policy == "error":
            skip = ", or set data.on_bad_record=skip" if self.skippable else ""
            raise DataError(f"{where} {problem}; {fix}{skip}")
        self.count += records
        if len(self.examples) < self.EXAMPLES:
            self.examples.append(f"{where} {problem}")


def _jsonl_record(line: bytes | str, where: str, field: str, bad: BadRecords) -> str | None:
    """The text of one JSONL line; None for a blank line or a bad record that is skipped."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            return bad.bad(where, f"is not valid UTF-8 (byte {err.start})", "convert the file to UTF-8 first")
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return bad.bad(where, "is not valid JSON", "fix the line or remove it")
    if not isinstance(record, dict) or field not in record:
        return bad.bad(where, f"has no field {field!r}", "choose the text field with --field")
    if not isinstance(record[field], str):
        return bad.bad(where, f"field {field!r} is not a string", "choose the text field with --field")
    return record[field]


def _jsonl_documents(path: Path, where: str, field: str, bad: BadRecords, start: int) -> Iterator[tuple[int, str]]:
    """(byte offset of the line, text) of a plain .jsonl file, read line by line from byte `start`."""
    with open(path, "rb") as fh:
        fh.seek(start)
        offset, number = start, 1
        for line in fh:
            # a resumed read starts mid-file: its places are byte offsets, a whole read's are line numbers
            text = _jsonl_record(line, f"{where}:{number}" if not start else f"{where} at byte {offset}", field, bad)
            if text is not None:
                yield offset, text
            offset += len(line)
            number += 1


def _parquet_documents(path: Path, where: str, column: str, bad: BadRecords) -> Iterator[tuple[int, str]]:
    """(row group, text) of a .parquet file, one row group in memory at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow; pip install 'scalevec[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{where} is not a readable Parquet file ({first_line(err)}); check or rewrite it") from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise DataError(f"{where} has no column {column!r}; choose the text column with --column "
                        f"(columns: {', '.join(names)})")
    kind = parquet.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{where} column {column!r} holds {kind}, not text; choose the text column with --column")
    for group in range(parquet.num_row_groups):
        try:
            texts = parquet.read_row_group(group, columns=[column]).column(column).to_pylist()
        except (OSError, pa.ArrowException) as err:
            bad.bad(f"{where} row group {group}", f"cannot be read ({first_line(err)})", "rewrite the file",
                    parquet.metadata.row_group(group).num_rows)
            continue
        yield from ((group, text) for text in texts if text)


def located_documents(source: SourceFile, field: str = "text", column: str = "text", bad: BadRecords | None = None,
                      start: int = 0) -> Iterator[tuple[int, str]]:
    """(where, text) of the documents of one source file, streamed: `where` is the byte offset of a plain
    .jsonl record (`start` seeks to one), a .parquet row group, else 0. A .txt file is one document."""
    path, where, bad = source.path, source.name, bad or BadRecords()
    if path.name.endswith(".jsonl.xz"):
        with lzma.open(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                text = _jsonl_record(line, f"{where}:{number}", "text", bad)
                if text is not None:
                    yield 0, text
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path, where, column, bad)
    elif path.suffix == ".txt":
        try:
            yield 0, path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            bad.bad(where, f"is not valid UTF-8 (byte {err.start})", "convert it to UTF-8 first")
    else:
        yield from _jsonl_documents(path, where, field, bad, start)


def read_documents(source: SourceFile, field: str = "text", column: str = "text") -> Iterator[str]:
    """The documents of one source file (a .txt file is one document); a bad record is an error, with no
    data.on_bad_record to skip it."""
    return (text for _, text in located_documents(source, field, column, BadRecords(skippable=False)))
