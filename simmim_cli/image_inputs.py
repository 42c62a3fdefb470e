"""Images named on the command line (``simmim predict``, ``visualize-recon``): image files, folders of them and
shards, read in the order given and viewed as the model sees them (resized, centre-cropped); predict's batches
arrive in that order whatever the loader workers.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from . import remote
from .errors import SimmimError
from .image_spec import IMAGENET_RGB, ImageSpec
from .pipeline import sample_image_bytes
from .redact import terminal
from .shards import IMAGE_SUFFIXES, ShardSet, resolve_shards
from .transforms import CropTransform


def image_sources(inputs: list[str]) -> list[Path | ShardSet]:
    """What ``inputs`` name, in their order and checked before any image is read: image files (folders are
    searched recursively, sorted by name) and shard sets (shard folders, .tar files, brace patterns)."""
    sources: list[Path | ShardSet] = []
    for item in inputs:
        path = Path(item)
        if remote.is_url(item):
            sources.append(resolve_shards(item, count_required=False))
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            sources.append(path)
        elif path.is_dir() and not list(path.glob("*.tar")):
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise SimmimError(f"no images in {path}")
            sources += files
        elif path.is_dir() or path.suffix == ".tar" or "{" in item:
            sources.append(resolve_shards(item))
        else:
            raise SimmimError(f"{item}: not an image file, a folder of images or shards")
    return sources


def _warn_lost(samples: Iterator[dict], lost: list[str]) -> Iterator[dict]:
    """``samples``, with a warning line for what a corrupt shard lost (read where no batch carries "skipped")."""
    for sample in samples:
        yield sample
        if lost:
            print(terminal(f"warning: {lost[0]}"), file=sys.stderr)
            lost.clear()
    if lost:
        print(terminal(f"warning: {lost[0]}"), file=sys.stderr)


def _image_readers(sources: list[Path | ShardSet], limit: int | None) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, a function returning its bytes) of each image in ``sources``, at most ``limit``: an image file is
    read only when asked for (a loader worker passes over the files of the others' batches)."""
    count = 0
    for source in sources:
        if isinstance(source, Path):
            readers: Iterator[tuple[str, Callable[[], bytes]]] = iter([(str(source), source.read_bytes)])
        else:
            samples = _warn_lost(remote.shard_samples(source.urls, lost := []), lost)
            readers = ((f"{s['__url__']}:{s['__key__']}", functools.partial(sample_image_bytes, s)) for s in samples)
        for reader in readers:
            yield reader
            count += 1
            if limit is not None and count >= limit:
                return


def image_readers(inputs: list[str], limit: int | None = None) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, a function returning its bytes) of the images named by ``inputs``: image files, folders of images
    (searched recursively), shard folders, .tar files or brace patterns of shards. Stops after ``limit`` images."""
    return _image_readers(image_sources(inputs), limit)


def image_views(readers: Iterator[tuple[str, Callable[[], bytes]]], img_size: int, crop_pct: float,
                skipped: list[str], notes: list[str],
                spec: ImageSpec = IMAGENET_RGB) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) for each readable image, decoded as ``spec`` says (uint8 RGB for photos; the model's bands at
    full precision otherwise): resized to ``img_size / crop_pct`` and centre-cropped. Images that cannot be read
    (permissions, a file gone since it was listed) or do not decode are listed in ``skipped``; ones smaller than
    the model get a note in ``notes``."""
    view = CropTransform(img_size, crop_pct)
    decode = spec.image_decoder()
    for name, read in readers:
        try:
            data = read()
        except OSError as error:
            skipped.append(f"{name}: {type(error).__name__}: {error.strerror or error}")
            continue
        except ValueError as error:  # a shard member over --max-sample-mb, never read
            skipped.append(f"{name}: {type(error).__name__}: {error}")
            continue
        try:
            image = decode(data)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            skipped.append(f"{name}: {type(error).__name__}: {error}")
            continue
        width, height = (image.shape[-1], image.shape[-2]) if torch.is_tensor(image) else image.size
        if min(width, height) < img_size:
            notes.append(f"note: {name} is {width}×{height}, smaller than the model's {img_size}; "
                         "it was enlarged")
        yield name, view(image)["image"]


class PredictStream(IterableDataset):
    """Batches ``{"name": [str], "image": (B,C,H,W), "skipped": [str], "notes": [str]}`` of the images in
    ``sources`` (from :func:`image_sources`), viewed as :func:`image_views` does, in the input order.

    Batch i covers images i·batch_size to (i+1)·batch_size − 1: the readable ones in "image", the others named in
    "skipped" (a batch may be short, even empty). Loader worker w makes batches w, w + workers, w + 2·workers, ...,
    and a DataLoader takes its workers' batches in turn, so the batches arrive in order whatever the workers.
    Image files are read by the worker that decodes them; shards are read through by every worker."""

    def __init__(self, sources: list[Path | ShardSet], img_size: int, crop_pct: float, batch_size: int,
                 workers: int = 0, limit: int | None = None, spec: ImageSpec = IMAGENET_RGB):
        self.sources = sources
        self.spec = spec
        self.img_size = img_size
        self.crop_pct = crop_pct
        self.batch_size = batch_size
        self.workers = workers
        self.limit = limit

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        numbered = enumerate(_image_readers(self.sources, self.limit))
        for index, batch in itertools.groupby(numbered, key=lambda entry: entry[0] // self.batch_size):
            if index % workers != worker:
                continue  # another worker's batch: its files are not read here
            skipped: list[str] = []
            notes: list[str] = []
            readers = (reader for _, reader in batch)
            views = list(image_views(readers, self.img_size, self.crop_pct, skipped, notes, self.spec))
            empty_type = torch.uint8 if self.spec.dtype == "uint8" else torch.float32
            yield {"name": [name for name, _ in views],
                   "image": torch.stack([view for _, view in views]) if views
                   else torch.empty(0, self.spec.channels, self.img_size, self.img_size, dtype=empty_type),
                   "skipped": skipped, "notes": notes}
