"""Where scalevec writes: output paths checked before anything is written, whole or nothing writes,
disk-full errors as one line, and advisory locks released by the kernel when their holder dies.

The rule every writer follows: scalevec replaces only what it wrote itself. A directory it writes
carries a manifest listing its files; an existing non-empty path that is not such a directory
(or holds anything the manifest does not list) is refused unless the user passes --overwrite, and
a path that is a file is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import BadInput, RunStopped

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# torch's zip writer and safetensors' Rust writer raise RuntimeError-like errors, not OSError, on a full disk
DISK_FULL_MESSAGES = ("unexpected pos", "No space left", "os error 28", "file write failed", "Disk quota",
                      "File too large")
LOCK_NAME = ".lock"


class OutputError(BadInput):
    """An output path that cannot be used as asked (exit 2); one line naming the path and the fix."""


class WriteFailed(RunStopped):
    """A write failed part way (full disk, quota); what existed before is intact (exit 1)."""


def first_line(err: BaseException) -> str:
    text = str(err.strerror if isinstance(err, OSError) and err.strerror else err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    return not isinstance(err, OSError) and any(m in str(err) for m in DISK_FULL_MESSAGES)


@contextlib.contextmanager
def writing(what: str, then: str = "run the command again", kept: str = "",
            error: type[Exception] = WriteFailed) -> Iterator[None]:
    """Turn a failed write inside the block (an OSError, or a serializer's disk-full error) into one line,
    `writing <what> failed (<reason>); [<kept>; ]<remedy> and <then>`, raised as `error`. The remedy follows the
    reason: free space for a full disk or quota, a writable path for anything else (permissions, a read-only or
    special file system)."""
    try:
        yield
    except (WriteFailed, OutputError):
        raise
    except Exception as err:
        if not isinstance(err, OSError) and not is_disk_full(err):
            raise
        remedy = "free space" if is_disk_full(err) else "make the path writable (or choose another)"
        reason = first_line(err) if isinstance(err, OSError) else f"the disk is full or over quota: {first_line(err)}"
        kept = f"{kept}; " if kept else ""
        raise error(f"writing {what} failed ({reason}); {kept}{remedy} and {then}") from None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks: the integrity record of checkpoints and data manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(path: Path, flag: str) -> None:
    """Refuse, before anything is written, a directory path that cannot be created or written by this user."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a directory; choose a directory path")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {path}: {ancestor} is a file, so nothing can be created under it; choose "
                          "another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: {ancestor} is not writable; choose a path you can write to")


def contains(outer: Path, inner: Path) -> bool:
    """Whether `inner` is `outer` or lies under it (symlinks resolved)."""
    outer, inner = Path(outer).resolve(), Path(inner).resolve()
    return inner == outer or outer in inner.parents


def foreign_entries(directory: Path, own: Iterable[str]) -> list[str]:
    """Entries under `directory` that are neither a file of `own` (paths relative to it) nor a folder holding one."""
    own = set(own)
    folders = {str(parent) for name in own for parent in Path(name).parents}
    return [name for name in (str(p.relative_to(directory)) for p in sorted(directory.rglob("*")))
            if name not in own and name not in folders]


def claim_directory(path: Path, own: Iterable[str] | None, overwrite: bool, flag: str,
                    fix: str = "choose another path or pass --overwrite to replace it") -> None:
    """Refuse to replace `path` unless it is empty, holds only `own` (the files a manifest says this command
    wrote there; None when it holds no manifest), or the user passed --overwrite. Never a file."""
    check_output_path(path, flag)
    if not path.is_dir() or overwrite or not any(path.iterdir()):
        return
    if own is None:
        raise OutputError(f"{flag} {path} is a non-empty directory scalevec did not write; {fix}")
    extra = foreign_entries(path, own)
    if extra:
        raise OutputError(f"{flag} {path} holds {extra[0]}, which scalevec did not write there; move it away, or {fix}")


def replace_directory(tmp: Path, out: Path) -> None:
    """Put the finished directory `tmp` at `out`, replacing what is there (already claimed) whole."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists():
            old.rename(out)
        raise
    remove_tree(old)


@contextlib.contextmanager
def new_directory(out: Path, what: str) -> Iterator[Path]:
    """A temporary directory to fill; on success it replaces `out` whole (already claimed), on any failure it is
    removed and `out` stays as it was. A failed write is one line naming `what`."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with writing(what, "run it again", kept="nothing was changed"):
            tmp.mkdir(parents=True)
            yield tmp
            replace_directory(tmp, out)
    finally:
        remove_tree(tmp)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` then rename onto `path`: `path` holds its old content or the whole new one, never a part."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def append_line(path: Path, line: str) -> None:
    """Append one whole line; a failed write is rolled back so the file never ends in a torn line."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _in_use(directory: Path, what: str, lock_file) -> OutputError:
    lock_file.seek(0)
    holder = lock_file.read().strip() or "unknown"
    return OutputError(f"{what} {directory} is in use by another scalevec process (pid {holder}); wait for it to "
                       "finish or choose another directory")


class DirectoryLock:
    """An exclusive advisory lock on DIR/.lock, holding the holder's pid.

    flock(2) belongs to the open file, so the kernel releases it when the holder exits or is killed:
    a killed run never leaves a stale lock (the file may stay; the next holder takes it over).
    """

    def __init__(self, directory: Path, what: str):
        self.path = Path(directory) / LOCK_NAME
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = _in_use(directory, what, fh)
                fh.close()
                raise error from None
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()  # the previous holder removed the file between our open and our lock: take the new one
        self._file = fh
        with contextlib.suppress(OSError):  # the pid is a courtesy; a full disk must not stop the lock
            fh.truncate(0)
            fh.write(f"{os.getpid()}\n")
            fh.flush()

    @staticmethod
    def check_free(directory: Path, what: str) -> None:
        """Refuse, with the lock's own error, a directory another process holds; takes and writes nothing (a dry
        run's check: a shared lock for an instant, which conflicts only with a holder's exclusive one)."""
        try:
            fh = open(Path(directory) / LOCK_NAME)
        except OSError:  # no lock file: no holder
            return
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use(directory, what, fh) from None
            fcntl.flock(fh, fcntl.LOCK_UN)

    def release(self) -> None:
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)
        self._file.close()
        self._file = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def parent_lock(path: Path) -> Iterator[None]:
    """Serialize writers of `path` on an flock of its parent directory itself: nothing is created beside it."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
