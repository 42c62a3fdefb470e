"""What a command's ``--data`` (``--val-data``, ``--knn-data``, ...) names, made ready to read before anything reads
it: a folder of images is written once into shards next to it and reused while it is unchanged, shard folders are
checked for .tar files their ``_info.json`` leaves out, and the commands that need labels get labelled shards (or,
for evaluation, a folder with one sub-folder per class) or a clear error. Several training sources become one shard
list with the epoch order's bookkeeping of them (``mixture.py`` reads their shares). ``shards.py`` is the shard
format itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import mixture, remote, storage
from .epoch_order import Mixture, Source
from .errors import SimmimError
from .image_spec import PHOTO_RECORD
from .mixture import SourceSpec
from .redact import redact
from .shards import INFO_FILE, ShardSet, find_images, read_info, resolve_shards, write_info, write_shards

CACHE_SUFFIX = ".simmim-shards"  # FOLDER's shards are kept in FOLDER.simmim-shards/, next to it
CACHE_SHARD_SIZE = 1000  # samples per cached shard: several shards for loader workers and ranks to share


def is_image_folder(path: Path) -> bool:
    """A folder that is not a shard folder (no .tar files, no _info.json): images, flat or in class folders."""
    return path.is_dir() and not (path / INFO_FILE).exists() and not any(path.glob("*.tar"))


def data_shards(data: str, option: str = "--data", labels: bool = False) -> str:
    """The one call a command makes to turn ``--data`` into shards, before anything reads it (and, in multi-process
    runs, before any worker starts: on one process only, never concurrently).

    A folder of images (flat, or class sub-folders for labels) is written once into shards in
    ``FOLDER.simmim-shards/`` next to it, and that cache is used while the folder's images are the same files
    (names, sizes, modification times, classes); any change rebuilds it. Anything else is returned unchanged,
    after a warning when a shard folder holds .tar files its ``_info.json`` does not list. ``labels``: a flat
    folder is an error (classifiers need class sub-folders). Returns the ``--data`` value to use."""
    path = Path(data)
    if not is_image_folder(path):
        warn_unlisted_shards(path, option)
        return data
    source = path.resolve()
    files, classes = find_images(source)
    if labels and classes is None:
        raise SimmimError(f"{option} {data} has no class sub-folders, so no labels; put each class's images in a "
                          "sub-folder named after the class")
    fingerprint = folder_fingerprint(source, files, classes)
    cache = source.parent / f"{source.name}{CACHE_SUFFIX}"
    if _cached_fingerprint(cache) == fingerprint:
        print(f"note: {option} {data}: using its shards in {cache} (rebuilt when the folder changes)", file=sys.stderr)
        return str(cache)
    print(f"note: {option} {data}: writing its {len(files)} images into shards in {cache}, once (reused while the "
          f"folder is unchanged); for large sets make shards yourself, once, with simmim make-shards {data} OUT "
          "(a progress bar, shard sizes of your choice, any storage) and pass --data OUT", file=sys.stderr)
    tmp = source.parent / f".{cache.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        info = write_shards(source, tmp, maxcount=CACHE_SHARD_SIZE, force=True,
                            on_skip=lambda image, reason: print(f"warning: skipped unreadable {image}: {reason}",
                                                                file=sys.stderr))
        info["source"] = {"folder": str(source), "fingerprint": fingerprint, "images": len(files)}
        write_info(tmp, info)
        _swap_in(tmp, cache, fingerprint)
    except Exception as error:
        fault = storage.storage_error(error, cache)
        if fault is None:
            raise
        raise storage.StorageError(f"{option} {data}: its shards are kept next to it, and {fault}; or make them "
                                   f"elsewhere with simmim make-shards {data} OUT and pass {option} OUT") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(cache)


def folder_fingerprint(source: Path, files: list[tuple[Path, int | None]], classes: list[str] | None) -> str:
    """A digest of what the images of a folder are: relative names, labels, sizes and modification times."""
    digest = hashlib.sha256(json.dumps(classes).encode())
    for path, label in sorted(files, key=lambda item: str(item[0])):
        stat = path.stat()
        digest.update(f"{path.relative_to(source)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _cached_fingerprint(cache: Path) -> str | None:
    try:
        return json.loads((cache / INFO_FILE).read_text()).get("source", {}).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _swap_in(tmp: Path, cache: Path, fingerprint: str) -> None:
    """Puts the finished shards in place; an outdated cache is replaced, one written meanwhile by another run of
    the same folder is kept."""
    if not cache.exists():
        try:
            tmp.rename(cache)
            return
        except OSError:
            if not cache.exists():
                raise
    if _cached_fingerprint(cache) == fingerprint:
        return
    old = cache.parent / f".{cache.name}.old-{os.getpid()}"
    cache.rename(old)
    tmp.rename(cache)
    shutil.rmtree(old, ignore_errors=True)


def unlisted_shards(directory: Path) -> list[str]:
    """The .tar files of a shard folder that its _info.json lists in no split (and that readers therefore skip)."""
    info = read_info(directory) if directory.is_dir() else None
    if info is None:
        return []
    listed = {name for entry in info.get("splits", {}).values() for name in entry.get("filenames", [])}
    return sorted(p.name for p in directory.glob("*.tar") if p.name not in listed)


def warn_unlisted_shards(path: Path, option: str = "--data") -> None:
    unlisted = unlisted_shards(path)
    if unlisted:
        print(f"warning: {option} {path}: {len(unlisted)} .tar file(s) are not listed in its {INFO_FILE} and are "
              f"ignored ({', '.join(unlisted[:3])}{', ...' if len(unlisted) > 3 else ''}); to include them, re-make "
              f"the shards with simmim make-shards IMAGES {path} --force, or add their names and sample counts to a "
              f"split's filenames and shard_lengths in {INFO_FILE}, or pass {option} as a pattern or list file naming "
              "every shard", file=sys.stderr)


def labelled_source(data: str) -> tuple[ShardSet | list[tuple[Path, int]], list[str] | None, int]:
    """``--data`` for evaluation: labelled shards, or a folder with one sub-folder per class.
    Returns (source, class names or None, sample count)."""
    path = Path(data)
    if is_image_folder(path):  # read as it is: one pass over every image needs no shards
        files, classes = find_images(path)
        if classes is None:
            raise SimmimError(f"{path} has no class sub-folders; evaluation needs labels")
        return files, classes, len(files)
    warn_unlisted_shards(path)
    shards = resolve_shards(data)
    return shards, shards.classes, shards.num_samples


def labelled_shards(data: str, epoch_size: int | None = None, option: str = "--data") -> ShardSet:
    """Shards with labels and class names, or a clear error."""
    shards = resolve_shards(data, epoch_size=epoch_size)
    if not shards.classes:
        raise SimmimError(f"{option} {data} has no class names in _info.json, so no labels; make the shards from a "
                          "folder with one sub-folder per class (simmim make-shards IMAGES/ OUT/)")
    return shards


# ---------------------------------------------------------------------------------------------- several sources


@dataclass
class MixedShards(ShardSet):
    """The shards of several sources, one source after the other, as one shard list; ``num_samples`` is the
    samples of an epoch, and ``mixture`` the epoch order's bookkeeping of the sources."""

    mixture: Mixture | None = None
    specs: list[SourceSpec] = field(default_factory=list)


def training_shards(data: str | list | None, epoch_size: int | None = None, labels: bool = False,
                    option: str = "--data") -> ShardSet:
    """A training command's ``--data`` as shards: one source as :func:`resolve_shards` (or :func:`labelled_shards`)
    finds it, several (or one with a share) as :class:`MixedShards`, after the checks that they can be mixed."""
    specs = mixture.parse(data, option)
    if len(specs) == 1 and specs[0].kind is None:
        path = specs[0].path
        return labelled_shards(path, epoch_size, option) if labels else resolve_shards(path, epoch_size=epoch_size)
    sets = [_source_shards(spec, option) for spec in specs]
    _check_sources(specs, sets, labels, option)
    counts = mixture.plan(specs, [shards.num_samples for shards in sets], epoch_size, option)
    sources = tuple(Source(spec.name, len(shards.urls), shards.num_samples, count)
                    for spec, shards, count in zip(specs, sets, counts, strict=True))
    urls = [url for shards in sets for url in shards.urls]
    return MixedShards(urls=urls, num_samples=sum(counts), classes=sets[0].classes if labels else None,
                       shard_lengths=[n for shards in sets for n in shards.shard_lengths],
                       images=mixed_images([shards.images for shards in sets], counts),
                       mixture=Mixture(sources), specs=specs)


def _source_shards(spec: SourceSpec, option: str) -> ShardSet:
    path = spec.path
    if not remote.is_url(path) and "{" not in path and not Path(path).exists():
        raise SimmimError(f"{option} source {path} does not exist; give a shard folder, a brace pattern, a list file, "
                          "a folder of images or a URL (s3://, gs://, https://)")
    warn_unlisted_shards(Path(path), option)
    shards = resolve_shards(path, count_required=False)
    if not shards.shard_lengths:
        raise SimmimError(f"{option} {path}: the number of samples in its shards is unknown (no _info.json lists "
                          "them), and a mixture deals out every source by sample; copy make-shards' _info.json next "
                          "to them")
    return shards


def _check_sources(specs: list[SourceSpec], sets: list[ShardSet], labels: bool, option: str) -> None:
    """Sources that cannot be mixed: shards named by two sources; for a classifier, labelled beside unlabelled
    sources or other class lists; images of other kinds (channels, dtype, where _info.json records them)."""
    owner: dict[str, str] = {}
    for spec, shards in zip(specs, sets, strict=True):
        for url in shards.urls:
            if url in owner:
                raise SimmimError(f"{option} sources {owner[url]} and {spec.path} both hold {url}; give each shard "
                                  "in one source only")
            owner[url] = spec.path
    if labels:
        first = next(((spec, shards) for spec, shards in zip(specs, sets, strict=True) if shards.classes), None)
        for spec, shards in zip(specs, sets, strict=True):
            if first is None or not shards.classes:
                labelled = f"{first[0].path} is labelled ({len(first[1].classes)} classes)" if first else \
                    "no source is labelled"
                raise SimmimError(f"{option} {spec.path} has no class names in _info.json, so no labels, and "
                                  f"{labelled}; a classifier trains on labelled sources only: make every source from "
                                  "folders with one sub-folder per class")
            if shards.classes != first[1].classes:
                raise SimmimError(f"{option} sources disagree on classes: {first[0].path} has {len(first[1].classes)} "
                                  f"({', '.join(first[1].classes[:3])}, ...), {spec.path} has {len(shards.classes)} "
                                  f"({', '.join(shards.classes[:3])}, ...); make every source from folders with the "
                                  "same class sub-folders")
    kinds = [(spec, _image_kind(shards)) for spec, shards in zip(specs, sets, strict=True)]
    for spec, kind in kinds[1:]:
        if kind != kinds[0][1]:
            raise SimmimError(f"{option} sources hold images of different kinds: {kinds[0][0].path} has "
                              f"{_kind_text(kinds[0][1])}, {spec.path} has {_kind_text(kind)}; mix sources of one "
                              "kind (make the shards of the others again from images of that kind)")


def _image_kind(shards: ShardSet) -> tuple[int, str]:
    """(channels, dtype) of the shards' images: _info.json's record, or 8-bit RGB photos where it has none."""
    images = shards.images or PHOTO_RECORD
    return int(images["channels"]), str(images.get("dtype", "uint8"))


def mixed_images(records: list[dict | None], weights: list[int]) -> dict | None:
    """The image record of a mixture (sources of one kind): per-channel mean and std of the epoch's samples, each
    source's statistics weighted by the samples it gives an epoch (pixel moments combine as the law of total
    variance says), the value ranges joined; None (8-bit photos) where no source has statistics."""
    measured = [(record, weight) for record, weight in zip(records, weights, strict=True)
                if record and record.get("mean") and record.get("std")]
    if not measured:
        return next((record for record in records if record), None)
    total = sum(weight for _, weight in measured)
    mean = sum(np.asarray(r["mean"], dtype=np.float64) * w for r, w in measured) / total
    second = sum((np.asarray(r["std"], dtype=np.float64) ** 2 + np.asarray(r["mean"], dtype=np.float64) ** 2) * w
                 for r, w in measured) / total
    combined = {**measured[0][0], "mean": mean.tolist(), "std": np.sqrt(np.maximum(second - mean**2, 0)).tolist(),
                "statistics": {"mixture": [w / total for _, w in measured]}}
    ranges = [r["value_range"] for r, _ in measured if r.get("value_range")]
    if ranges:
        combined["value_range"] = [[min(r[c][0] for r in ranges), max(r[c][1] for r in ranges)]
                                   for c in range(len(ranges[0]))]
    return combined


def _kind_text(kind: tuple[int, str]) -> str:
    return f"{kind[0]} channel(s) of {kind[1]}"


def mixture_summary(shards: ShardSet) -> str | None:
    """Lines saying what each source of a mixture gives an epoch (None for one source)."""
    mix = getattr(shards, "mixture", None)
    if mix is None:
        return None
    width = max(len(source.name) for source in mix.sources)
    lines = [f"data: {len(mix.sources)} source(s), {mix.epoch_samples:,} samples per epoch"]
    for spec, source in zip(shards.specs, mix.sources, strict=True):
        share = source.per_epoch / mix.epoch_samples
        lines.append(f"  {source.name:<{width}}  {source.per_epoch:>9,} per epoch ({share:.1%}), "
                     f"{source.per_epoch / source.samples:.3g}× its {source.samples:,} samples ({spec.share()}): "
                     f"{redact(spec.path)}")
    return "\n".join(lines)
