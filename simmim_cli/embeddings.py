"""Embedding files: one row per image (sample key, source shard, label, vector) in Parquet, with the encoder, layer,
pooling and preprocessing that made them in the file's key-value metadata. ``embed`` writes one part file per
shard as it goes and merges them at the end (``commands/embed.py``); ``search`` reads the file back and, for
pictures, the images its rows name.

Columns: ``key`` (string), ``source`` (string: the shard, without credentials), ``label`` (string class name, null
for unlabelled data), ``embedding`` (fixed-size list of float32). Metadata keys are ``simmim:<name>``, each a JSON
value (``simmim:model``, ``simmim:layer``, ``simmim:pool``, ``simmim:preprocessing``, ...).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import remote, storage
from .errors import SimmimError

FORMAT_VERSION = 1
META_PREFIX = "simmim:"
VECTOR = "embedding"


def require_pyarrow():
    """pyarrow's ``parquet`` module, or the one line that says how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SimmimError('embedding files are Parquet, which needs pyarrow: pip install "simmim-cli[embed]"') from None
    return pq


def public_url(url: str) -> str:
    """A shard URL as it may be stored and shown: no ``user:password@``, no query string (a signed URL's
    signature is a credential)."""
    return re.sub(r"\?.*$", "", re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1", url))


def _schema(dim: int, metadata: dict[str, Any] | None = None):
    import pyarrow as pa

    schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("label", pa.string()),
                        (VECTOR, pa.list_(pa.float32(), dim))])
    if metadata:
        schema = schema.with_metadata({f"{META_PREFIX}{k}": json.dumps(v) for k, v in metadata.items()})
    return schema


def write_part(path: Path, keys: list[str], sources: list[str], labels: list[str | None], vectors: np.ndarray,
               dim: int) -> None:
    """One shard's rows (possibly none) as a Parquet file, written atomically: a part that exists is complete."""
    import pyarrow as pa

    pq = require_pyarrow()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
    table = pa.table({"key": pa.array(keys, pa.string()), "source": pa.array(sources, pa.string()),
                      "label": pa.array(labels, pa.string()),
                      VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)},
                     schema=_schema(dim))
    tmp = path.with_name(f".{path.name}.tmp")
    with storage.writing(path, temporary=tmp):
        pq.write_table(table, tmp)
        tmp.replace(path)


def merge_parts(parts: list[Path], output: Path, metadata: dict[str, Any], dim: int) -> int:
    """The parts, in order, as one Parquet file with ``metadata`` (one part in memory at a time), written to a
    temporary name and renamed into place. Returns the number of rows."""
    pq = require_pyarrow()
    tmp = output.with_name(f".{output.name}.tmp")
    rows = 0
    with storage.writing(output, temporary=tmp):
        with pq.ParquetWriter(tmp, _schema(dim, {**metadata, "format": FORMAT_VERSION})) as writer:
            for part in parts:
                table = pq.read_table(part)
                rows += table.num_rows
                if table.num_rows:
                    writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
        tmp.replace(output)
    return rows


@dataclass
class Embeddings:
    """An embedding file in memory: its rows in file order, the vectors as float32 ``(N, D)``."""

    path: Path
    keys: list[str]
    sources: list[str]
    labels: list[str | None]
    vectors: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self, index: int) -> str:
        label = self.labels[index]
        return f"{self.keys[index]} ({label})" if label is not None else self.keys[index]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``simmim:`` metadata of an embedding file (without the prefix), or a clear error."""
    pq = require_pyarrow()
    path = Path(path)
    if not path.is_file():
        raise SimmimError(f"{path} not found; write embeddings with simmim embed --data IMAGES --output {path}")
    try:
        schema = pq.read_schema(path)
    except Exception as error:  # pyarrow raises its own types for files that are not Parquet
        raise SimmimError(f"{path} is not a Parquet file ({type(error).__name__}); give a file written by "
                          "simmim embed") from error
    raw = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    metadata = {k[len(META_PREFIX):]: json.loads(v) for k, v in raw.items() if k.startswith(META_PREFIX)}
    if "format" not in metadata or VECTOR not in schema.names:
        raise SimmimError(f"{path} is not an embedding file of simmim embed (no {META_PREFIX}format metadata or "
                          f"{VECTOR} column); write one with simmim embed")
    return metadata


def read_embeddings(path: str | Path) -> Embeddings:
    """An embedding file's rows and metadata."""
    metadata = read_metadata(path)
    pq = require_pyarrow()
    table = pq.read_table(path)
    column = table.column(VECTOR).combine_chunks()
    dim = column.type.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    if not len(vectors):
        raise SimmimError(f"{path} holds no embeddings (no image of its data could be read)")
    return Embeddings(path=Path(path), keys=table.column("key").to_pylist(), sources=table.column("source").to_pylist(),
                      labels=table.column("label").to_pylist(), vectors=torch.from_numpy(np.array(vectors)),
                      metadata=metadata)


def read_images(rows: list[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    """The encoded images of ``(source shard, key)`` rows of an embedding file, read from the shards (each shard
    once, up to its last wanted sample). Rows whose shard cannot be read (moved, deleted, a store that refuses)
    are left out, with one warning per shard."""
    from .pipeline import sample_image_bytes

    wanted: dict[str, set[str]] = defaultdict(set)
    for source, key in rows:
        wanted[source].add(key)
    found: dict[tuple[str, str], bytes] = {}
    for source, keys in wanted.items():
        lost: list[str] = []
        try:
            for sample in remote.shard_samples([source], lost):
                key = sample.get("__key__")
                if key in keys:
                    found[(source, key)] = sample_image_bytes(sample)
                    keys.discard(key)
                    if not keys:
                        break
        except (OSError, ValueError) as error:
            lost.append(f"{source}: {remote.describe(error)}")
        if lost:
            print(f"warning: images of {source} could not be read for the picture ({lost[0]})", file=sys.stderr)
    return found
