"""Storage faults: the one place that turns a failed write (a full disk, a quota, a read-only or forbidden folder,
a file-size limit) into one line naming the path, the reason, the free and needed bytes and what to do.

Every writer of the package goes through :func:`writing` (essential outputs: the error stops the command with
exit code :data:`StorageError.exit_code`) or :func:`best_effort` (previews, tracker files, caches: one warning, the
command goes on). :func:`remove_stale_temporaries` clears what a killed write left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import SimmimError

# what a write can meet that the user fixes on the storage side, not in the command line
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class StorageError(SimmimError):
    """A write failed for lack of room or rights. Exit code 74 (``EX_IOERR`` of sysexits.h), distinct from bad
    input (2) and from crashes (1), so that a job script can tell "free space and resume" from "fix the command"."""

    exit_code = 74


def human_bytes(count: float) -> str:
    """1234567 → '1.2 MB' (decimal units, as ``df -H`` shows them)."""
    if abs(count) < 1000:
        return f"{count:.0f} B"
    for unit in ("kB", "MB", "GB"):
        count /= 1000
        if abs(count) < 1000:
            return f"{count:.1f} {unit}"
    return f"{count / 1000:.1f} TB"


def free_bytes(path: str | Path) -> int | None:
    """Bytes free for this user on the disk that holds ``path`` (or its nearest existing parent); None when
    unknown. Quotas of shared file systems are not seen here: the failed write reports those."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def os_error_in(error: BaseException) -> OSError | None:
    """The storage ``OSError`` behind ``error``: itself, or one it was raised from or while handling (torch.save
    reports a full disk as ``RuntimeError: ... unexpected pos``, raised while handling the file's OSError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def describe(error: OSError, path: str | Path | None, needed: int | None = None, verb: str = "write") -> str:
    """One line: what could not be written (``path``, else the file the error names), why, and what to do."""
    path = Path(path) if path else Path(error.filename) if error.filename else Path.cwd()
    free = free_bytes(path)
    where = f"cannot {verb} {path}"
    if error.errno == errno.ENOSPC:
        sizes = ", ".join(part for part in (f"{human_bytes(free)} free" if free is not None else "",
                                           f"about {human_bytes(needed)} needed" if needed else "") if part)
        return (f"{where}: no space left on its disk{f' ({sizes})' if sizes else ''}; free space there "
                "(old runs, checkpoints beyond the ones you need) or write to another disk")
    if error.errno == errno.EDQUOT:
        return (f"{where}: disk quota exceeded{f' (about {human_bytes(needed)} needed)' if needed else ''}; free "
                "space within your quota (see `quota -s` or your cluster's quota tool), ask for more, or write "
                "elsewhere (node-local scratch)")
    if error.errno == errno.EROFS:
        return f"{where}: the file system is read-only; write to a folder on a writable disk"
    if error.errno == errno.EFBIG:
        return (f"{where}: file too large for this file system or for the process's file-size limit (`ulimit -f`); "
                "raise the limit or write to another file system")
    if verb == "write":
        return (f"{where}: permission denied; write to a folder you own, or have its permissions changed "
                f"(ls -ld {path.parent})")
    return f"{where}: permission denied; have its permissions changed (ls -ld {path})"


def storage_error(error: BaseException, path: str | Path | None, needed: int | None = None, then: str = "",
                  verb: str = "write") -> StorageError | None:
    """``error`` as a :class:`StorageError` when a storage fault is behind it, else None. ``then``: what else to
    say (e.g. the checkpoint to resume from), appended after a semicolon."""
    if isinstance(error, StorageError):  # described already, by the writer nearest to the fault
        return StorageError(f"{error}; {then}") if then else error
    cause = os_error_in(error)
    if cause is None:
        return None
    return StorageError(describe(cause, path, needed, verb) + (f"; {then}" if then else ""))


def unexpected(error: BaseException) -> StorageError | None:
    """A storage fault that no writer caught (the CLI's last resort, so that it is still one line): the path the
    error names, and the reason."""
    if isinstance(error, StorageError):
        return error
    cause = os_error_in(error)
    if cause is None:
        return None
    verb = "access" if cause.errno in (errno.EACCES, errno.EPERM) else "write"  # a read may be refused too
    return StorageError(describe(cause, None, verb=verb))


@contextlib.contextmanager
def writing(path: str | Path | None, needed: int | None = None, temporary: Iterable[Path] | Path = (),
            then: str = "") -> Iterator[None]:
    """Around an essential write of ``path``: any failure removes the ``temporary`` files (a partial file never stays
    behind), and a storage fault becomes a :class:`StorageError` (other errors pass through unchanged)."""
    temporaries = [temporary] if isinstance(temporary, (str, Path)) else list(temporary)
    try:
        yield
    except BaseException as error:
        for tmp in temporaries:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        converted = storage_error(error, path, needed, then) if isinstance(error, Exception) else None
        if converted is None or converted is error:
            raise
        raise converted from error.__cause__ if isinstance(error, StorageError) else error


def write_text(path: str | Path, text: str) -> None:
    """Writes a small text file atomically (a temporary file, then a rename), with :func:`writing`'s handling."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, temporary=tmp):
        tmp.write_text(text)
        tmp.replace(path)


_warned: set[tuple[str, str]] = set()


def move_into_place(tmp: Path, directory: Path, names: Iterable[str]) -> None:
    """A folder written completely in ``tmp`` becomes ``directory``: renamed when new, else its ``names`` each
    replace the old file (other files there are kept), so a reader never sees half an export."""
    if not directory.exists():
        tmp.rename(directory)
        return
    for name in names:
        os.replace(tmp / name, directory / name)


@contextlib.contextmanager
def best_effort(what: str, path: str | Path | None, temporary: Iterable[Path] | Path = (),
                warn: Callable[[str], None] | None = None) -> Iterator[None]:
    """Around a write the command can do without (a preview, a tracker's file, a cache): a storage fault gives one
    warning per kind of output and folder, and the command goes on; other errors pass through. ``path`` None:
    the file the error names."""
    try:
        with writing(path, temporary=temporary):
            yield
    except StorageError as error:
        key = (what, str(Path(path).parent) if path else "")
        if key not in _warned:
            _warned.add(key)
            (warn or _stderr)(f"warning: {error}; going on without the {what}")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_writable(directory: Path) -> None:
    """Writes a probe file in ``directory`` (creating it, and removing what it created), so that a read-only or
    forbidden output fails before the work starts (and before any worker process is launched)."""
    directory = Path(directory).absolute()
    created = [folder for folder in (directory, *directory.parents) if not folder.exists()]
    probe = directory / f".simmim-write-test.{socket.gethostname()}-{os.getpid()}.tmp"
    try:
        with writing(directory, temporary=probe):
            directory.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as file:
                file.write(b"ok")
            probe.unlink()
    finally:
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


TEMPORARY_PATTERNS = (".*.tmp", "metrics.tmp")  # ours: ".<name>.<host>-<pid>.tmp", ".<name>.tmp", older metrics.tmp


def remove_stale_temporaries(directory: Path, patterns: Iterable[str] = TEMPORARY_PATTERNS) -> tuple[int, int]:
    """Deletes temporary files that a killed write (kill -9, a node that died) left in ``directory``; returns
    (files, bytes freed). A temporary file of a process still alive on this host is left alone."""
    if not directory.is_dir():
        return 0, 0
    host = socket.gethostname()
    removed = freed = 0
    for pattern in patterns:
        for path in directory.glob(pattern):
            folder = path.is_dir() and _OWNER.search(path.name) is not None  # a sharded checkpoint's shards
            if not (path.is_file() or folder) or _written_by_live_process(path.name, host):
                continue
            try:
                if folder:
                    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
                    shutil.rmtree(path)
                else:
                    size = path.stat().st_size
                    path.unlink()
            except OSError:
                continue
            removed, freed = removed + 1, freed + size
    return removed, freed


# a checkpoint's: .<name>.pth.<host>-<pid>.tmp, or a sharded one's folder .<name>.dcp.<host of rank 0>-<its pid>.tmp
_OWNER = re.compile(r"\.(?:pth|dcp)\.(?P<host>.+)-(?P<pid>\d+)\.tmp$")


def _written_by_live_process(name: str, host: str) -> bool:
    owner = _OWNER.search(name)
    if owner is None or owner["host"] != host or int(owner["pid"]) == os.getpid():
        return False
    pid = owner["pid"]
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def report_stale_temporaries(directory: Path, patterns: Iterable[str] = TEMPORARY_PATTERNS) -> None:
    """:func:`remove_stale_temporaries`, with one line on stderr when it removed anything."""
    removed, freed = remove_stale_temporaries(directory, patterns)
    if removed:
        _stderr(f"note: removed {removed} temporary file(s) left in {directory} by an interrupted write "
                f"({human_bytes(freed)} freed)")
