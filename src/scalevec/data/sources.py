"""Documents in: the bundled corpus and the user's .txt, .jsonl and .parquet files."""

from __future__ import annotations

import glob
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import BUNDLED_SOURCES
from ..outputs import file_sha256

CORPUS_DIR = Path(__file__).parent / "corpus"
USER_SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
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


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not valid UTF-8 (byte {err.start}); convert it to UTF-8 first") from None


def _jsonl_documents(lines, where: str, field: str) -> Iterator[str]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{where}:{number} is not valid JSON; fix the line or remove it") from None
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{where}:{number} has no field {field!r}; choose the text field with --field")
        if not isinstance(record[field], str):
            raise DataError(f"{where}:{number} field {field!r} is not a string; choose the text field with --field")
        yield record[field]


def read_documents(source: SourceFile, field: str = "text", column: str = "text") -> Iterator[str]:
    """The documents of one source file (a .txt file is one document)."""
    path, where = source.path, source.name
    if path.name.endswith(".jsonl.xz"):
        with lzma.open(path, "rt", encoding="utf-8") as fh:
            yield from _jsonl_documents(fh, where, "text")
        return
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading .parquet needs pyarrow; pip install 'scalevec[parquet]'") from None
        table = pq.read_table(path)
        if column not in table.column_names:
            raise DataError(f"{where} has no column {column!r}; choose the text column with --column "
                            f"(columns: {', '.join(table.column_names)})")
        yield from (text for text in table.column(column).to_pylist() if text)
        return
    text = _utf8(path.read_bytes(), where)
    if path.suffix == ".txt":
        yield text
    else:
        yield from _jsonl_documents(text.splitlines(), where, field)
