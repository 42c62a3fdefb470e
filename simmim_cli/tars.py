"""Tar members read with bounded memory: a member (or a tar header) larger than ``--max-sample-mb`` is passed over
without being read whole, and compressed tars are decompressed in bounded steps, so that a hostile shard (a gzip
bomb, a 1 GiB member, a 1 GiB pax header) costs no more memory than a real one. The per-sample limits themselves
are ``limits.py``'s.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO

from . import limits

META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (__key__/, __meta__), never sample data
_HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                 tarfile.SOLARIS_XHDTYPE)


class BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended headers (long names, pax records: read whole by tarfile) are refused over the
    member limit: a corrupt shard, not an allocation of whatever size the header claims."""

    def _proc_member(self, tar):
        if self.type in _HEADER_TYPES:
            try:
                limits.check_member_size(self.size, f"an extended tar header at byte {self.offset}")
            except limits.SampleTooLarge as error:
                raise tarfile.ReadError(str(error)) from None
        return super()._proc_member(tar)


def decompressed(stream: IO[bytes]) -> IO[bytes]:
    """``stream`` itself, or, for a gzip/bzip2/xz-compressed tar, a file object decompressing it in bounded steps
    (tarfile's own stream decompression inflates each 10 kB read whole: a bzip2 bomb's would be gigabytes)."""
    head = stream.peek(6)[:6] if hasattr(stream, "peek") else b""
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(stream)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream)
    return stream


def open_tar(path: str) -> tarfile.TarFile:
    """A local tar file for random access (headers only are read until a member is extracted), with bounded
    extended headers."""
    return tarfile.open(path, tarinfo=BoundedTarInfo)


def members(stream: IO[bytes]) -> Iterator[tuple[str, bytes | None, str]]:
    """(name, data, why not) of each regular file of a tar stream, in order, as webdataset reads them (metadata
    members left out). A member over ``--max-sample-mb`` comes with data None and the reason, its bytes passed
    over in small reads, never held."""
    try:
        tar = tarfile.open(fileobj=decompressed(stream), mode="r|", tarinfo=BoundedTarInfo)
        for info in tar:
            if not info.isreg() or META.match(info.name):
                continue
            try:
                limits.check_member_size(info.size, info.name)
            except limits.SampleTooLarge as error:
                yield info.name, None, str(error)  # tarfile skips its data in 10 kB steps on to the next header
            else:
                yield info.name, tar.extractfile(info).read(), ""
            tar.members = []  # a stream's headers are not kept: memory stays flat over a shard of any length
    except (zlib.error, lzma.LZMAError) as error:  # neither is an OSError: a corrupt shard all the same
        raise tarfile.ReadError(f"invalid compressed data ({error})") from error
