"""Training and evaluation streams over shards: which sample goes to which rank and loader worker, decoding,
augmentation and batching on the CPU (a GPU decoder lives beside it in ``dali.py``).

The training stream defines an epoch by sample count: every loader worker on every rank yields the
same number of full batches, so distributed ranks never wait on each other at an epoch's end. Batches hold
uint8 images; normalisation happens on the training device.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import multiprocessing as mp
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import remote
from .errors import SimmimError
from .shards import IMAGE_SUFFIXES, ShardSet, resolve_shards
from .transforms import CropTransform, decode_image

SAMPLE_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm", "img")

# ---------------------------------------------------------------------------------------------- streaming


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Seeds torch, random and numpy for one sample, so any library transform becomes a function of the seed
    alone (whatever worker runs it, and after a resume). In the training process itself (no loader workers)
    the previous states are restored afterwards; loader workers need no restoring."""
    restore = get_worker_info() is None
    if restore:
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if restore:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def sample_label(sample: dict, num_classes: int | None) -> int:
    """The sample's ``.cls`` label, checked against the number of classes."""
    if "cls" not in sample:
        raise SimmimError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no label (.cls); "
                          "make labelled shards from a folder with one sub-folder per class")
    label = int(sample["cls"])
    if num_classes is not None and not 0 <= label < num_classes:
        raise SimmimError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has label {label}, outside "
                          f"0..{num_classes - 1} ({num_classes} classes in _info.json); re-create the shards")
    return label


def _image_bytes(sample: dict) -> bytes:
    for key in SAMPLE_IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise ValueError(f"no image in sample (it has {sorted(k for k in sample if not k.startswith('__'))})")


class ShardStream(IterableDataset):
    """Batches of ``{"image": uint8 (B,3,H,W), ...[, "label": int64 (B,)], "skipped": [str, ...]}``: the
    transform's outputs stacked, the labels when asked for, and descriptions of the samples skipped as bad
    (their places in the batch go to the next good image).

    Call :meth:`set_epoch` before iterating. Each of the ``world_size × max(workers, 1)`` consumers yields
    ``batches_per_consumer`` batches per epoch, so each rank gets :attr:`batches_per_epoch` batches.
    Sample order and augmentation depend only on (seed, epoch, consumer, position): a run that resumes in
    the middle of an epoch sees the same batches as one that never stopped. One iteration can span several
    epochs, so that the loader processes live for the whole run (no restart, no empty pipeline, at each
    epoch's start).
    """

    def __init__(
        self,
        shards: ShardSet,
        transform: Callable[[Any], dict[str, torch.Tensor]],
        batch_size: int,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        labels: bool = False,
        shuffle_buffer: int = 2000,
        decode: Callable[[bytes], Any] = decode_image,
        num_classes: int | None = None,
    ):
        self.shards = shards
        self.transform = transform
        self.batch_size = batch_size
        self.workers = workers
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.labels = labels
        self.shuffle_buffer = shuffle_buffer
        self.decode = decode
        self.num_classes = num_classes
        self.num_consumers = world_size * max(workers, 1)
        self.batches_per_consumer = max(1, math.ceil(shards.num_samples / (self.num_consumers * batch_size)))
        self.epoch = 0
        self.skip_batches = 0
        self.epochs = 1

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank receives per epoch (the same on every rank)."""
        return self.batches_per_consumer * max(self.workers, 1)

    def set_epoch(self, epoch: int, skip_batches: int = 0, epochs: int = 1) -> None:
        """Next iteration yields the batches of ``epochs`` epochs from ``epoch`` on, :attr:`batches_per_epoch`
        each, starting after the rank's first ``skip_batches`` of ``epoch``."""
        self.epoch = epoch
        self.skip_batches = skip_batches
        self.epochs = epochs

    def _samples(self, epoch: int, consumer: int, skipped: list[str]) -> Iterator[dict]:
        """This consumer's share of the data, shuffled, pass after pass until the caller stops.

        When the shard lengths are known (``_info.json``), each pass lays the shards end to end in a shuffled
        order and deals out contiguous sample ranges of near-equal size: every sample goes to exactly one
        consumer per pass, for any number of shards of any lengths. Otherwise whole shards are dealt out (or,
        with fewer shards than consumers, every consumer reads all of them and keeps every n-th sample).
        The caller takes ``batches_per_consumer × batch_size`` samples: the last few of a consumer's range may
        come from the next pass (fewer than a batch), as torch's DistributedSampler pads.
        """
        lengths = self.shards.shard_lengths
        by_range = (len(lengths) == len(self.shards.urls) and sum(lengths) == self.shards.num_samples
                    and sum(lengths) >= self.num_consumers)
        split_by_shard = len(self.shards.urls) >= self.num_consumers

        length_of = dict(zip(self.shards.urls, lengths, strict=False))  # for what a corrupt shard loses

        def read(urls: list[str]) -> Iterator[dict]:
            return remote.shard_samples(urls, skipped, length_of)

        def sample_range(order: list[int]) -> Iterator[dict]:
            """Samples [lo, hi) of the shards laid end to end in ``order``."""
            total = sum(lengths)
            lo, hi = consumer * total // self.num_consumers, (consumer + 1) * total // self.num_consumers
            shard_start = 0
            for index in order:
                shard_end = shard_start + lengths[index]
                if shard_end > lo and shard_start < hi:
                    for position, sample in enumerate(read([self.shards.urls[index]]), start=shard_start):
                        if position >= hi:
                            break
                        if position >= lo:
                            yield sample
                shard_start = shard_end

        def strided(urls: list[str], start: int) -> Iterator[dict]:
            index = start
            for sample in read(urls):
                if split_by_shard or index % self.num_consumers == consumer:
                    yield sample
                index += 1

        empty_passes = 0
        for pass_index in range(1_000_000):
            order = list(range(len(self.shards.urls)))
            random.Random(f"{self.seed}/{epoch}/{pass_index}").shuffle(order)  # the same on every consumer
            if by_range:
                share = sample_range(order)
            else:
                urls = [self.shards.urls[i] for i in order]
                # the sample index runs on over passes, so consumers beyond the sample count still get samples
                share = strided(urls[consumer :: self.num_consumers] if split_by_shard else urls,
                                pass_index * self.shards.num_samples)
            rng = random.Random(f"{self.seed}/{epoch}/{pass_index}/{consumer}")
            count = 0
            for sample in wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(share):
                count += 1
                yield sample
            empty_passes = 0 if count else empty_passes + 1
            if empty_passes > self.num_consumers:  # a strided share may be empty for a few passes, not for more
                raise SimmimError(f"no samples could be read from the shards ({self.shards.urls[0]}, ...); "
                                  "check that they are readable tar files made by simmim make-shards")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader deals batches round-robin, starting at worker 0, so rank batch i comes from worker
        # i % workers. After skipping k batches, loader worker w plays the part of worker (w + k) % workers,
        # which keeps the resumed order identical to the uninterrupted one. An epoch is a whole number of
        # rounds (batches_per_consumer from each worker), so the part stays the same in the epochs after it.
        role = (worker + self.skip_batches) % workers
        consumer = self.rank * workers + role
        for index in range(self.epochs):
            skip = (self.skip_batches - role + workers - 1) // workers if index == 0 else 0
            yield from self._epoch_batches(self.epoch + index, consumer, skip)

    def _epoch_batches(self, epoch: int, consumer: int, skip: int) -> Iterator[dict]:
        """One consumer's batches of one epoch, after its first ``skip``."""
        remaining = self.batches_per_consumer - skip
        if remaining <= 0:
            return
        skipped: list[str] = []
        stream = self._samples(epoch, consumer, skipped)
        position = 0  # raw samples consumed: one batch slot each
        # skip what the interrupted run already trained on, before the (costly) decoding
        for _ in range(skip * self.batch_size):
            next(stream)
            position += 1
        samples: list[dict[str, torch.Tensor]] = []
        bad_slots: list[int] = []  # slots of undecodable samples, filled by the next good image
        while remaining > 0:
            sample = next(stream)
            position += 1
            try:
                image = self.decode(_image_bytes(sample))
                label = sample_label(sample, self.num_classes) if self.labels else None
            except (OSError, ValueError, KeyError, SyntaxError, RuntimeError, Image.DecompressionBombError) as error:
                skipped.append(f"{sample.get('__url__')}:{sample.get('__key__')}: {type(error).__name__}: {error}")
                bad_slots.append(position)
                if len(bad_slots) > 100 * self.batch_size:
                    raise SimmimError(f"none of {len(bad_slots)} samples in a row could be decoded "
                                      f"({skipped[-1]}); check the shards") from error
                continue
            # A bad sample's slot goes to the next good image (with the slot's own augmentation and mask):
            # batch contents then depend only on raw positions, so resuming mid-epoch stays exact.
            for slot in [*bad_slots, position]:
                seed = int(np.random.SeedSequence([self.seed, epoch, consumer, slot]).generate_state(1)[0])
                with seeded_rng(seed):
                    outputs = self.transform(image)
                if label is not None:
                    outputs["label"] = torch.tensor(label)
                samples.append(outputs)
                if len(samples) == self.batch_size:
                    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
                    batch["skipped"] = list(skipped)
                    yield batch
                    samples.clear()
                    skipped.clear()
                    remaining -= 1
                    if remaining == 0:
                        return
            bad_slots.clear()


MAX_DEFAULT_WORKERS = 12  # beyond this the training process itself becomes the bottleneck of a node


def default_workers(local_processes: int) -> int:
    """Loader processes per training process: the cores this process may use, one left to the training process,
    capped. A process bound to a subset of the machine's cores (SLURM's ``--cpus-per-task``, taskset) has them
    to itself; one that may use every core shares them with the other training processes of the node."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    own_cores = usable < (os.cpu_count() or usable)
    share = usable if own_cores else usable // max(local_processes, 1)
    return max(1, min(MAX_DEFAULT_WORKERS, share - 1))


def make_loader(dataset: ShardStream, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the stream (batches are made in the workers); a stream that is no torch dataset, such
    as ``dali.DaliStream`` (batches already on the GPU), is iterated as it is."""
    if not isinstance(dataset, torch.utils.data.Dataset):
        return dataset
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=dataset.workers,
        pin_memory=pin_memory,
        # one iteration spans the run's epochs (set_epoch's ``epochs``): the workers are started once
        # its own generator, so starting an epoch's workers does not draw from the training process's RNG
        # (samples are seeded by position, not by worker seeds)
        generator=torch.Generator().manual_seed(0),
        # two batches ready per worker: shared memory use stays at workers × 2 batches per process
        prefetch_factor=2 if dataset.workers > 0 else None,
        # fork where there is fork: processes started by torch's launcher would spawn loader workers, and
        # spawning means importing torch in every worker at every epoch
        multiprocessing_context="fork" if dataset.workers and "fork" in mp.get_all_start_methods() else None,
    )


class EvalStream(IterableDataset):
    """Every sample exactly once, for evaluation: shards (or image files) split over ranks and loader workers,
    nothing shuffled or repeated, the last batch of each worker possibly short. Batches are
    ``{"image": uint8, "label": int64, "skipped": [...]}``.

    ``source`` is a :class:`ShardSet` or a list of ``(image path, label)`` pairs (a class-folder tree).
    """

    def __init__(
        self,
        source: ShardSet | list[tuple[Path, int]],
        transform: Callable[[Any], dict[str, torch.Tensor]],
        batch_size: int,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        decode: Callable[[bytes], Any] = decode_image,
        num_classes: int | None = None,
        labels: bool = True,
    ):
        self.source = source
        self.labels = labels  # False: unlabelled shards, every label -1 (pretraining's --val-data)
        self.transform = transform
        self.batch_size = batch_size
        self.workers = workers
        self.rank = rank
        self.world_size = world_size
        self.decode = decode
        self.num_classes = num_classes

    def _records(self, consumer: int, consumers: int, skipped: list[str]) -> Iterator[tuple[bytes, int, str]]:
        if isinstance(self.source, ShardSet):
            urls = self.source.urls
            by_shard = len(urls) >= consumers
            mine = urls[consumer::consumers] if by_shard else urls
            lengths = dict(zip(urls, self.source.shard_lengths, strict=False)) if by_shard else None
            samples = remote.shard_samples(mine, skipped, lengths)
            for index, sample in enumerate(samples):
                if by_shard or index % consumers == consumer:
                    name = f"{sample.get('__url__')}:{sample.get('__key__')}"
                    try:
                        label = sample_label(sample, self.num_classes) if self.labels else -1
                        yield _image_bytes(sample), label, name
                    except ValueError as error:
                        skipped.append(f"{name}: {error}")
        else:
            for path, label in self.source[consumer::consumers]:
                yield path.read_bytes(), label, str(path)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped: list[str] = []
        images, labels = [], []
        for data, label, name in self._records(self.rank * workers + worker, self.world_size * workers, skipped):
            try:
                images.append(self.transform(self.decode(data))["image"])
                labels.append(label)
            except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as error:
                skipped.append(f"{name}: {type(error).__name__}: {error}")
            if len(images) == self.batch_size:
                yield {"image": torch.stack(images), "label": torch.tensor(labels), "skipped": list(skipped)}
                images, labels = [], []
                skipped.clear()
        if images or skipped:
            yield {"image": torch.stack(images) if images else torch.empty(0, dtype=torch.uint8),
                   "label": torch.tensor(labels, dtype=torch.long), "skipped": list(skipped)}


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
            print(f"warning: {lost[0]}", file=sys.stderr)
            lost.clear()
    if lost:
        print(f"warning: {lost[0]}", file=sys.stderr)


def _image_readers(sources: list[Path | ShardSet], limit: int | None) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, a function returning its bytes) of each image in ``sources``, at most ``limit``: an image file is
    read only when asked for (a loader worker passes over the files of the others' batches)."""
    count = 0
    for source in sources:
        if isinstance(source, Path):
            readers: Iterator[tuple[str, Callable[[], bytes]]] = iter([(str(source), source.read_bytes)])
        else:
            samples = _warn_lost(remote.shard_samples(source.urls, lost := []), lost)
            readers = ((f"{s['__url__']}:{s['__key__']}", functools.partial(_image_bytes, s)) for s in samples)
        for reader in readers:
            yield reader
            count += 1
            if limit is not None and count >= limit:
                return


def collect_images(inputs: list[str], limit: int | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the images named by ``inputs``: image files, folders of images (searched recursively),
    shard folders, .tar files or brace patterns of shards. Stops after ``limit`` images."""
    for name, read in _image_readers(image_sources(inputs), limit):
        yield name, read()


def image_views(entries: Iterator[tuple[str, bytes]], img_size: int, crop_pct: float, skipped: list[str],
                notes: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, uint8 view) for each readable image: resized to ``img_size / crop_pct`` and centre-cropped. Images
    that do not decode are listed in ``skipped``; ones smaller than the model get a note in ``notes``."""
    view = CropTransform(img_size, crop_pct)
    for name, data in entries:
        try:
            image = decode_image(data)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            skipped.append(f"{name}: {type(error).__name__}: {error}")
            continue
        if min(image.size) < img_size:
            notes.append(f"note: {name} is {image.width}×{image.height}, smaller than the model's {img_size}; "
                         "it was enlarged")
        yield name, view(image)["image"]


class PredictStream(IterableDataset):
    """Batches ``{"name": [str], "image": uint8 (B,3,H,W), "skipped": [str], "notes": [str]}`` of the images in
    ``sources`` (from :func:`image_sources`), viewed as :func:`image_views` does, in the input order.

    Batch i covers images i·batch_size to (i+1)·batch_size − 1: the readable ones in "image", the others named in
    "skipped" (a batch may be short, even empty). Loader worker w makes batches w, w + workers, w + 2·workers, ...,
    and a DataLoader takes its workers' batches in turn, so the batches arrive in order whatever the workers.
    Image files are read by the worker that decodes them; shards are read through by every worker."""

    def __init__(self, sources: list[Path | ShardSet], img_size: int, crop_pct: float, batch_size: int,
                 workers: int = 0, limit: int | None = None):
        self.sources = sources
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
            entries = ((name, read()) for _, (name, read) in batch)
            views = list(image_views(entries, self.img_size, self.crop_pct, skipped, notes))
            yield {"name": [name for name, _ in views],
                   "image": torch.stack([view for _, view in views]) if views
                   else torch.empty(0, 3, self.img_size, self.img_size, dtype=torch.uint8),
                   "skipped": skipped, "notes": notes}


class TensorStream(torch.utils.data.IterableDataset):
    """Cached features: every epoch a new shuffle (seed, epoch), dealt out to ranks in whole batches.
    With ``shuffle=False`` it is an evaluation stream (every sample once, the last batch short)."""

    workers = 0

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.features, self.labels = features, labels
        self.batch_size, self.rank, self.world_size, self.seed, self.shuffle = (
            batch_size, rank, world_size, seed, shuffle)
        self.batches_per_epoch = max(1, len(labels) // (batch_size * world_size))
        self.epoch, self.skip, self.epochs = 0, 0, 1

    def set_epoch(self, epoch: int, skip_batches: int = 0, epochs: int = 1) -> None:
        """As :meth:`ShardStream.set_epoch`: ``epochs`` epochs from ``epoch`` on, after ``skip_batches``."""
        self.epoch, self.skip, self.epochs = epoch, skip_batches, epochs

    def __iter__(self):
        if not self.shuffle:
            mine = torch.arange(self.rank, len(self.labels), self.world_size)
            for start in range(0, len(mine), self.batch_size):
                index = mine[start:start + self.batch_size]
                yield {"features": self.features[index], "label": self.labels[index]}
            return
        for index in range(self.epochs):
            yield from self._epoch_batches(self.epoch + index, self.skip if index == 0 else 0)

    def _epoch_batches(self, epoch: int, skip: int):
        count = len(self.labels)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        if count < self.batch_size * self.world_size:  # fewer samples than one global batch: repeat them
            order = order.repeat(-(-self.batch_size * self.world_size // count))
        for batch in range(skip, self.batches_per_epoch):
            start = (batch * self.world_size + self.rank) * self.batch_size
            index = order[start:start + self.batch_size]
            yield {"features": self.features[index], "label": self.labels[index]}
