"""Remote files: the one place that opens a shard URL (``http(s)://``, ``s3://``, ``gs://``, ``pipe:``, or a local
path) and reads it to the end through network faults, and the samples of the tar shards read that way.

A read that fails (a connection cut mid-body, a 5xx, a timeout, a stream that ends early) is retried with
exponential backoff and continues at the byte offset already delivered (an HTTP/S3 range request through fsspec;
``pipe:`` commands are re-run and the bytes already read skipped), so the tar reader above never sees the fault
and no sample is lost or repeated. After ``--io-retries`` failed tries in a row, :class:`RemoteError` names the
URL and the last error. Only transient faults are retried (timeouts, resets, 5xx, 429 after its ``Retry-After``):
a missing file, a refused login or signature (401/403, S3's ``AccessDenied``, ``SignatureDoesNotMatch``,
``ExpiredToken``, ``InvalidAccessKeyId``) and other 4xx answers stop at once.

Credentials and endpoints come from each store's own environment and config files (``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...): nothing here reads, prints or stores them.
Credentials in a URL (``user:password@``, a signed URL's query string) are used to read it and otherwise cut out
by ``redact.py`` wherever the URL is shown or stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from . import tars
from .errors import RemoteError, SimmimError
from .redact import redact, without_credentials
from .remote_faults import describe, raise_if_final, retry_after

DEFAULT_IO_RETRIES = 10  # backoff 0, 0.5, 1, 2, ... 60 s: about 3 minutes of a store not answering
MAX_BACKOFF_S = 60.0
# bytes per range request (a read of READ_SIZE fetches READ_SIZE + BLOCK_SIZE): few requests per shard, little
# memory per open shard; a cut request is fetched again from its start, the bytes delivered before it are not
BLOCK_SIZE = 8 * 2**20
READ_SIZE = 2**20
REMOTE_EXTRA = 'pip install "simmim-cli[remote]"'
DEFAULT_CACHE_SIZE = "100GB"
# set by configure(): inherited by loader workers and launched processes
_RETRIES_ENV, _CACHE_ENV, _CACHE_SIZE_ENV = "SIMMIM_IO_RETRIES", "SIMMIM_SHARD_CACHE", "SIMMIM_SHARD_CACHE_SIZE"


def configure(io_retries: int | None, shard_cache: str | None = None,
              shard_cache_size: str = DEFAULT_CACHE_SIZE) -> None:
    """``--io-retries N`` and ``--shard-cache DIR``/``--shard-cache-size`` for this process and every process it
    starts."""
    if io_retries is not None:
        if io_retries < 0:
            raise SimmimError(f"--io-retries must be 0 or more, got {io_retries}")
        os.environ[_RETRIES_ENV] = str(io_retries)
    parse_size(shard_cache_size)  # checked now, not in a loader worker
    if shard_cache:
        os.environ[_CACHE_ENV] = str(Path(shard_cache).expanduser().resolve())
        os.environ[_CACHE_SIZE_ENV] = shard_cache_size
    else:
        os.environ.pop(_CACHE_ENV, None)


def io_retries() -> int:
    value = os.environ.get(_RETRIES_ENV, "")
    return int(value) if value.isdigit() else DEFAULT_IO_RETRIES


def is_url(name: str) -> bool:
    """A name this module opens remotely (``file://`` and plain paths are local files)."""
    return name.startswith("pipe:") or ("://" in name and not name.startswith("file://"))


def url_path(name: str) -> str:
    """A URL without its query string (``https://host/a.tar?X-Amz-...`` → ``https://host/a.tar``): what its file
    name and folder are read from. Local paths and ``pipe:`` commands come back as they are."""
    return name.split("?", 1)[0] if is_url(name) and not name.startswith("pipe:") else name


def backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): a cut connection is retried at once, a store that keeps
    failing is given exponentially more time (with jitter, so that many workers do not retry in step)."""
    if attempt <= 1:
        return 0.0
    return min(MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 2)) * random.uniform(0.8, 1.2)


def filesystem(url: str):
    """(fsspec filesystem, path) for a URL, with timeouts that turn a stalled connection into a retried fault."""
    try:
        import fsspec
    except ImportError as error:
        raise SimmimError(f"reading {redact(url)} needs fsspec: {REMOTE_EXTRA}") from error
    protocol = url.split("://", 1)[0]
    options: dict = {}
    if protocol in ("http", "https"):
        import aiohttp

        # no total limit (a shard may take long), but a connection that sends nothing for a minute is a fault
        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)}
    elif protocol == "s3":
        options["config_kwargs"] = {"connect_timeout": 30, "read_timeout": 60}
    try:
        fs = fsspec.filesystem(protocol, **options)
    except (ImportError, ValueError) as error:
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(protocol, f"an fsspec backend for {protocol}://")
        raise SimmimError(f"reading {redact(url)} needs {package}: {REMOTE_EXTRA}") from error
    return fs, fs._strip_protocol(url) if protocol not in ("http", "https") else url


class _EarlyEnd(OSError):
    """The stream ended before the size the store announced (or a pipe command failed at its end)."""


class ResumingReader(io.RawIOBase):
    """Bytes of one URL from its start to its end; faults are retried and the read resumes where it stopped."""

    def __init__(self, url: str, retries: int | None = None):
        self.url = url
        self.retries = io_retries() if retries is None else retries
        self.offset = 0  # bytes delivered so far
        self.size: int | None = None
        self._file: IO[bytes] | None = None
        self._process: subprocess.Popen | None = None
        self._skip = 0  # bytes of a re-run pipe command to throw away
        self._call(self._open)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._call(lambda: self._read(len(buffer)))
        buffer[: len(data)] = data
        self.offset += len(data)
        return len(data)

    def close(self) -> None:
        self._close_source()
        super().close()

    # -- one try of each step
    def _open(self) -> None:
        self._close_source()
        if self.url.startswith("pipe:"):
            # its own process group, so that stopping it stops what the shell started; stderr to a file, so that a
            # chatty command never blocks on a full pipe
            self._errors = tempfile.TemporaryFile()
            self._process = subprocess.Popen(self.url[5:], shell=True, stdout=subprocess.PIPE, stderr=self._errors,
                                             start_new_session=True)
            self._file, self._skip = self._process.stdout, self.offset
            return
        fs, path = filesystem(self.url)
        self._file = fs.open(path, "rb", block_size=BLOCK_SIZE, cache_type="readahead")
        self.size = getattr(self._file, "size", None)
        if self.offset:
            try:
                self._file.seek(self.offset)
            except ValueError:  # a stream without ranges (no Content-Length): read again up to the offset
                self._skip = self.offset

    def _read(self, count: int) -> bytes:
        if self._file is None:
            self._open()
        while self._skip:  # a re-run command: pass over what was delivered before the fault
            skipped = self._file.read(min(self._skip, BLOCK_SIZE))
            if not skipped:
                self._check_end()
            self._skip -= len(skipped)
        data = self._file.read(count)
        if not data and count:
            self._check_end()
        return data

    def _check_end(self) -> None:
        if self._process is not None:
            code = self._process.wait()
            if code != 0:
                self._errors.seek(0)
                message = self._errors.read().decode(errors="replace").strip().splitlines()
                raise _EarlyEnd(f"the command exited with status {code}" + (f" ({message[-1]})" if message else ""))
            if self._skip:
                raise _EarlyEnd(f"the command's output is shorter than the {self.offset} bytes read before")
        elif self.size is not None and self.offset < self.size:
            raise _EarlyEnd(f"the stream ended at byte {self.offset} of {self.size}")

    def _close_source(self) -> None:
        file, process, self._file, self._process = self._file, self._process, None, None
        try:
            if file is not None:
                file.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped either way
            pass
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            self._errors.close()

    def _call(self, step):
        """Runs ``step``; on a fault, reopens at :attr:`offset` (after a backoff) and runs it again."""
        attempt, started = 0, time.monotonic()
        while True:
            try:
                return step()
            except Exception as error:  # noqa: BLE001 - which exceptions are network faults differs per backend
                raise_if_final(self.url, error)
                attempt += 1
                if attempt > self.retries:
                    raise RemoteError(
                        f"cannot read {redact(self.url)} at byte {self.offset}: {describe(error)} (gave up after "
                        f"{self.retries} retries in {time.monotonic() - started:.0f} s); check the store, then run "
                        "the same command again (--resume auto continues from the newest checkpoint) or raise "
                        "--io-retries") from error
                asked = retry_after(error)
                delay = backoff(attempt) if asked is None else asked
                if attempt > 1 or asked:  # one blip is routine for a busy store; a fault that persists is worth a line
                    print(f"warning: {redact(self.url)}: {describe(error)} at byte {self.offset}; retry {attempt} of "
                          f"{self.retries} in {delay:.1f} s", file=sys.stderr)
                self._close_source()
                time.sleep(delay)
                self._file = None  # reopened (at the offset) by the next try of a read


def open_shard(url: str, retries: int | None = None, cache: bool = True) -> IO[bytes]:
    """A buffered byte stream of a shard: local files as they are, URLs through :class:`ResumingReader`, or from
    the shard cache when there is one (``cache``)."""
    if not is_url(url):
        path = url[7:] if url.startswith("file://") else url
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    if cache and shard_cache() is not None:
        for _ in range(3):
            with contextlib.suppress(FileNotFoundError):  # evicted by another process between check and open
                return open(local_copy(url), "rb")  # noqa: SIM115
        return open(local_copy(url), "rb")  # noqa: SIM115
    return io.BufferedReader(ResumingReader(url, retries), buffer_size=READ_SIZE)


# ---------------------------------------------------------------------------------------------- writing


def upload(url: str, local: Path | None = None, data: bytes | None = None, retries: int | None = None) -> None:
    """Writes a local file (or ``data``) to ``url`` (``s3://``, ``gs://``) as one object: the store shows it
    complete or not at all. Faults are retried as reads are."""
    if not is_url(url) or url.startswith(("pipe:", "http://", "https://")):
        raise SimmimError(f"cannot write to {redact(url)}: make-shards writes to a local folder, s3:// or gs://")
    fs, path = filesystem(url)
    retries = io_retries() if retries is None else retries
    attempt, started = 0, time.monotonic()
    while True:
        try:
            fs.put_file(str(local), path) if local is not None else fs.pipe_file(path, data)
            return
        except Exception as error:  # noqa: BLE001 - which exceptions are network faults differs per backend
            raise_if_final(url, error)
            attempt += 1
            if attempt > retries:
                raise RemoteError(f"cannot write {redact(url)}: {describe(error)} (gave up after {retries} retries in "
                                  f"{time.monotonic() - started:.0f} s); check the store, then run the same command "
                                  "again, or raise --io-retries") from error
            asked = retry_after(error)
            time.sleep(backoff(attempt) if asked is None else asked)


# ---------------------------------------------------------------------------------------------- the shard cache


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``200GB``, ``1.5TB``, ``500MiB`` or a number of bytes → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise SimmimError(f"--shard-cache-size {text} is not a size; write it like 200GB, 1.5TB or 500MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def shard_cache() -> Path | None:
    value = os.environ.get(_CACHE_ENV)
    return Path(value) if value else None


def local_copy(url: str) -> str:
    """The path of ``url``'s copy in the shard cache, downloaded (once per node: other processes wait on a lock),
    checked and renamed into place if it is not there yet; the least recently used shards make room."""
    import fcntl  # POSIX file locks (the clusters this is for); imported here so that the CLI loads anywhere

    cache = shard_cache()
    assert cache is not None
    # named after the location without its credentials: no secret in a file name, and a shard signed again (a new
    # signature) is the same shard
    location = without_credentials(url)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", location.rstrip("/").rsplit("/", 1)[-1])[-80:]
    path = cache / f"{hashlib.sha256(location.encode()).hexdigest()[:16]}-{name}"
    if path.suffix != ".tar":
        path = path.with_name(path.name + ".tar")  # DALI's index files sit beside shards as .idx
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if path.exists():
            os.utime(path)  # the time of last use, for eviction
            return str(path)
        with open(cache / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node, whichever process asks first
            if not path.exists():
                _download(url, path)
                with open(cache / ".evict.lock", "w") as evicting:
                    fcntl.flock(evicting, fcntl.LOCK_EX)  # one process of the node evicts at a time
                    _evict(cache, parse_size(os.environ.get(_CACHE_SIZE_ENV, DEFAULT_CACHE_SIZE)), keep=path)
    except OSError as error:
        raise SimmimError(f"cannot keep {redact(url)} in the shard cache {cache} ({describe(error)}); free space "
                          "there, point --shard-cache at another folder, or leave it out to stream") from error
    return str(path)


def _download(url: str, path: Path) -> None:
    """``url`` → ``path``, through a temporary name: a shard is in the cache complete and readable, or not at all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open_shard(url, cache=False) as source, open(tmp, "wb") as target:
            while chunk := source.read(READ_SIZE):
                target.write(chunk)
        try:
            with tars.open_tar(str(tmp)) as tar:  # every member's header: a truncated or foreign file fails here
                tar.getmembers()
        except tarfile.TarError as error:  # what the store holds: kept, and the reader reports what it lost
            print(f"warning: {redact(url)} is not a complete tar file ({describe(error)}), as the store holds it; "
                  "re-create it with simmim make-shards", file=sys.stderr)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _evict(cache: Path, limit: int, keep: Path) -> None:
    """Removes the least recently used shards (and their DALI index files) until the cache fits in ``limit``."""
    shards = []  # (time of last use, size, path)
    for path in cache.glob("*.tar"):
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
            stat = path.stat()
            shards.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in shards)
    for _, size, old in sorted(shards):
        if total <= limit:
            break
        if old == keep:
            continue
        total -= size
        old.unlink(missing_ok=True)  # a process still reading it keeps its open file
        old.with_suffix(".idx").unlink(missing_ok=True)


def _tar_samples(url: str, stream) -> Iterator[dict]:
    """The samples of one tar stream: consecutive members sharing a key (up to the first dot) make a sample. Its
    ``__url__`` is the redacted URL (what messages and predict rows show); a member over ``--max-sample-mb`` is
    not read, and its sample carries why in ``__skipped__`` (``pipeline.sample_image_bytes`` raises it)."""
    from webdataset import tariterators  # imports torch: not at import time (`simmim --help` stays instant)

    shown_url = redact(url)
    sample: dict | None = None
    for name, data, too_large in tars.members(stream):
        key, extension = tariterators.base_plus_ext(name)
        if key is None:
            continue
        if sample is not None and sample["__key__"] != key:
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": shown_url}
        if data is None:
            sample["__skipped__"] = too_large
        else:
            sample[extension.lower()] = data
    if sample is not None:
        yield sample  # only after the whole tar was read: a sample cut short by a corrupt end is never yielded


def shard_samples(urls: list[str], skipped: list[str], lengths: dict[str, int] | None = None) -> Iterator[dict]:
    """The samples of the shards in turn, read through :func:`remote.open_shard` (network faults are retried and
    resumed there, so nothing is lost to them). A shard that is corrupt (not a network fault) is reported once,
    by name, and each sample it lost is counted in ``skipped`` (``lengths``: samples per URL, from _info.json)."""
    for url in urls:
        count = 0
        try:
            with open_shard(url) as stream:
                for sample in _tar_samples(url, stream):
                    count += 1
                    yield sample
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:
            if isinstance(error, RemoteError):
                raise  # the store stays unreachable: the run stops (its newest checkpoint is the resume point)
            expected = (lengths or {}).get(url)
            lost = max(expected - count, 1) if expected is not None else 1
            what = f"{lost} sample(s) lost" if expected is not None else "the rest of it lost (its length is unknown)"
            name = redact(url)
            skipped.append(f"{name}: corrupt shard after {count} sample(s), {what} ({describe(error)}); "
                           "re-create it with simmim make-shards")
            skipped += [f"{name}: lost with the corrupt shard"] * (lost - 1)
            continue
        expected = (lengths or {}).get(url)
        if expected is not None and count < expected:  # a whole tar with fewer samples than _info.json lists
            skipped.append(f"{redact(url)}: {count} sample(s), _info.json says {expected}: {expected - count} "
                           "sample(s) lost; re-create the shards with simmim make-shards")
            skipped += [f"{redact(url)}: missing from the shard"] * (expected - count - 1)


def read_bytes(url: str, retries: int | None = None) -> bytes:
    """The whole content of a (small) file, e.g. a remote ``_info.json`` (never from the shard cache: read fresh)."""
    with open_shard(url, retries, cache=False) as stream:
        return stream.read()


def listing(folder_url: str) -> set[str] | None:
    """The URLs of the files under a bucket folder (``s3://``, ``gs://``), or None where the store is not listed
    (``http(s)://``, ``pipe:``) or refuses to list it (credentials that may read but not list)."""
    if not folder_url.startswith(("s3://", "gs://", "gcs://")):
        return None
    protocol = folder_url.split("://", 1)[0]
    try:
        fs, path = filesystem(folder_url)
        fs.invalidate_cache(path)
        return {f"{protocol}://{name}" for name in fs.find(path)}
    except Exception:  # noqa: BLE001 - listing is a check made where it can be; the reads say the rest
        return None


def exists(url: str) -> bool:
    """Whether a remote file exists (a missing file is no error here; other faults are retried as reads are)."""
    try:
        read_bytes(url)
    except RemoteError as error:
        if error.missing:
            return False
        raise
    return True
