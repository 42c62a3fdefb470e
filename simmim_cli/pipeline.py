"""Training and evaluation streams over shards: which sample goes to which rank and loader worker, decoding,
augmentation and batching on the CPU (a GPU decoder lives beside it in ``dali.py``).

The training stream defines an epoch by sample count: ``ceil(samples / global batch)`` optimizer steps, every
rank the same number of full batches, so distributed ranks never wait on each other at an epoch's end; which
samples a rank and loader worker get is ``epoch_order.py``'s dealing. Batches hold uint8 images; normalisation
happens on the training device. Cached features have a stream of their own here (``TensorStream``); images named
on the command line (predict, visualize-recon) are read by ``image_inputs.py``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing as mp
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import epoch_order, limits, remote
from .errors import SimmimError
from .shards import ShardSet
from .transforms import decode_image

SAMPLE_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm", "dcm", "npy",
                     "img")

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


def sample_image_bytes(sample: dict) -> bytes:
    """The encoded image of a shard sample, whichever of the image extensions it was stored under; a sample whose
    member was over ``--max-sample-mb`` (not read, see ``remote._tar_samples``) raises why."""
    if "__skipped__" in sample:
        raise limits.SampleTooLarge(sample["__skipped__"])
    for key in SAMPLE_IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise ValueError(f"no image in sample (it has {sorted(k for k in sample if not k.startswith('__'))})")


class ShardStream(IterableDataset):
    """Batches of ``{"image": uint8 (B,3,H,W), ...[, "label": int64 (B,)], "skipped": [str, ...]}``: the
    transform's outputs stacked, the labels when asked for, and descriptions of the samples skipped as bad
    (their places in the batch go to the next good image).

    Call :meth:`set_epoch` before iterating. An epoch is ``ceil(samples / global batch)`` optimizer steps, so
    every rank gets :attr:`batches_per_epoch` batches, whatever the ranks and loader workers. With shard lengths
    known (``_info.json``) the epoch order, and each sample's augmentation, depend only on (data, seed, epoch)
    (``epoch_order.py``), and :meth:`resume_position` says which samples were trained on: a resume on another
    cluster shape trains on the rest, each once. One iteration can span several epochs, so that the loader
    processes live for the whole run (no restart, no empty pipeline, at each epoch's start).
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
        accumulation: int = 1,
        block_size: int = epoch_order.BLOCK,
    ):
        self.shards = shards
        self.transform = transform
        self.batch_size = batch_size
        self.workers = workers
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.labels = labels
        self.shuffle_buffer = shuffle_buffer  # only where shard lengths are unknown (see _unordered_samples)
        self.block_size = block_size
        self.decode = decode
        self.num_classes = num_classes
        self.num_consumers = world_size * max(workers, 1)
        lengths = shards.shard_lengths
        self.mixture: epoch_order.Mixture | None = getattr(shards, "mixture", None)  # several sources, or None
        # the exact, shape-independent order needs every shard's length (a mixture has them)
        self.ordered = self.mixture is not None or (
            len(lengths) == len(shards.urls) and sum(lengths) == shards.num_samples)
        global_batch = batch_size * world_size * accumulation
        self.batches_per_epoch = max(1, math.ceil(shards.num_samples / global_batch)) * accumulation
        self.epoch = 0
        self.skip_batches = 0
        self.epochs = 1
        self.consumed: tuple[tuple[int, int], ...] = ()

    def set_epoch(self, epoch: int, skip_batches: int = 0, epochs: int = 1,
                  consumed: list[tuple[int, int]] | None = None) -> None:
        """Next iteration yields the batches of ``epochs`` epochs from ``epoch`` on, :attr:`batches_per_epoch`
        each, starting after the rank's first ``skip_batches`` of ``epoch``. ``consumed`` (from
        :meth:`resume_position`, possibly of another cluster shape) names the slots of ``epoch`` already trained
        on; without it, the first ``skip_batches`` of every rank dealt as this run deals them."""
        self.epoch = epoch
        self.skip_batches = skip_batches
        self.epochs = epochs
        self.consumed = tuple((int(a), int(b)) for a, b in consumed) if consumed is not None else (
            epoch_order.Dealing(**self._dealing_shape(), consumed=(), first=0).consumed_after(skip_batches)
            if self.ordered and skip_batches else ())

    def _dealing_shape(self) -> dict[str, int]:
        return {"extent": self.batches_per_epoch * self.batch_size * self.world_size, "ranks": self.world_size,
                "workers": max(self.workers, 1), "batch_size": self.batch_size, "batches": self.batches_per_epoch}

    def _dealing(self, epoch: int) -> epoch_order.Dealing:
        first = epoch == self.epoch
        return epoch_order.Dealing(**self._dealing_shape(), consumed=self.consumed if first else (),
                                   first=self.skip_batches if first else 0)

    def resume_position(self, epoch: int, batches_done: int) -> dict[str, Any] | None:
        """Where in ``epoch``'s order a run is once each rank has trained on its first ``batches_done`` batches:
        ``{"epoch", "slots", "block", "consumed": [[start, stop], ...]}``, slots of the epoch order (cut into
        blocks of ``block`` samples) trained on, the same on every rank. None where the order depends on the
        consumers (shard lengths unknown)."""
        if not self.ordered:
            return None
        consumed = self._dealing(epoch).consumed_after(batches_done) if batches_done else []
        return {"epoch": epoch, "slots": self._dealing_shape()["extent"], "block": self.block_size,
                "consumed": [list(r) for r in consumed]}

    def source_samples(self, epoch: int, batches_done: int) -> dict[str, int] | None:
        """Of a mixture: the samples of each source in the slots of ``epoch`` trained on once each rank has made
        its first ``batches_done`` batches (a bad sample's slot, filled by the next good image, counts for its
        source); None for one source."""
        if self.mixture is None:
            return None
        consumed = self._dealing(epoch).consumed_after(batches_done) if batches_done else []
        counts = self.mixture.slot_counts(consumed, self.block_size)
        return {source.name: count for source, count in zip(self.mixture.sources, counts, strict=True)}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader deals batches round-robin, starting at worker 0: the iteration's batch t comes from
        # worker t % workers. An epoch's rank batch j is made by role j % workers, so in an epoch whose batch 0
        # is the iteration's batch ``start`` (negative for the first, which resumes after skip_batches), loader
        # worker w plays role (w - start) % workers.
        start = -self.skip_batches
        for index in range(self.epochs):
            epoch = self.epoch + index
            yield from self._epoch_batches(epoch, (worker - start) % workers)
            start += self.batches_per_epoch

    def _epoch_batches(self, epoch: int, role: int) -> Iterator[dict]:
        """One consumer's batches of one epoch: its share of the rank batches not yet made."""
        dealing = self._dealing(epoch)
        remaining = dealing.quota(role)
        if remaining <= 0:
            return
        skipped: list[str] = []
        if self.ordered:
            stream = self._ordered_samples(epoch, dealing.share(self.rank, role), skipped)
        else:
            consumer = self.rank * dealing.workers + role
            stream = self._unordered_samples(epoch, consumer, skipped)
            # skip what the interrupted run already trained on, before the (costly) decoding
            for _ in range(epoch_order.batches_of_role(role, dealing.workers, dealing.first) * self.batch_size):
                next(stream)
        samples: list[dict[str, torch.Tensor]] = []
        bad_slots: list[list[int]] = []  # seeds of the slots of undecodable samples, filled by the next good image
        for slot, sample in stream:
            if sample is None:  # its shard fell short: counted in ``skipped`` where the shard was read
                bad_slots.append(slot)
                continue
            try:
                image = self.decode(sample_image_bytes(sample))
                label = sample_label(sample, self.num_classes) if self.labels else None
            except (OSError, ValueError, KeyError, SyntaxError, RuntimeError, Image.DecompressionBombError) as error:
                where = f"{sample.get('__url__')}:{sample.get('__key__')}" if sample else f"slot {slot[2]}"
                skipped.append(f"{where}: {type(error).__name__}: {error}")
                bad_slots.append(slot)
                if len(bad_slots) > 100 * self.batch_size:
                    raise SimmimError(f"none of {len(bad_slots)} samples in a row could be decoded "
                                      f"({skipped[-1]}); check the shards") from error
                continue
            # A bad sample's slot goes to the next good image (with the slot's own augmentation and mask):
            # batch contents then depend only on slots, so resuming mid-epoch stays exact.
            for seed_key in [*bad_slots, slot]:
                seed = int(np.random.SeedSequence(seed_key).generate_state(1)[0])
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

    def _read(self, urls: list[str], skipped: list[str]) -> Iterator[dict]:
        """The shards' samples through ``remote`` (network faults retried and resumed there); a shard that is
        corrupt or shorter than ``_info.json`` says is named once and each sample it lost counted in ``skipped``."""
        lengths = dict(zip(self.shards.urls, self.shards.shard_lengths, strict=False))
        return remote.shard_samples(urls, skipped, lengths)

    def _ordered_samples(self, epoch: int, share: epoch_order.Ranges,
                         skipped: list[str]) -> Iterator[tuple[list[int], dict | None]]:
        """(seed key, sample or None where its shard falls short) for each slot of ``share``, in order; then the
        share again, as spares for the slots of bad samples near its end. Blocks are read whole, sequentially."""
        total, size = self.shards.num_samples, self.block_size
        reader = functools.partial(self._read, skipped=skipped)
        if self.mixture is None:
            blocks = epoch_order.EpochBlocks(self.shards.urls, self.shards.shard_lengths, self.seed, epoch, reader,
                                             size)
        else:
            blocks = epoch_order.MixedBlocks(self.mixture, self.shards.urls, self.shards.shard_lengths, self.seed,
                                             epoch, reader, size)
        block_index, block = -1, []
        for spare in range(1_000_000):
            read = 0
            for slot in epoch_order.slots(share):
                index = slot % total  # slots past the epoch's samples repeat its first ones
                if index // size != block_index:
                    block_index = index // size
                    block = blocks.block(block_index)
                sample = block[index % size]
                read += sample is not None
                yield [self.seed, epoch, slot, spare], sample
            if not read:
                raise SimmimError(f"no samples could be read from the shards ({self.shards.urls[0]}, ...); "
                                  "check that they are readable tar files made by simmim make-shards")

    def _unordered_samples(self, epoch: int, consumer: int,
                           skipped: list[str]) -> Iterator[tuple[list[int], dict | None]]:
        """Where shard lengths are unknown: whole shards dealt out to the consumers (or, with fewer shards than
        consumers, every consumer reads all of them and keeps every n-th sample), through a shuffle buffer, pass
        after pass until the caller stops. The order depends on the consumer count: exact resumes need the
        same one."""
        split_by_shard = len(self.shards.urls) >= self.num_consumers

        def strided(urls: list[str], start: int) -> Iterator[dict]:
            index = start
            for sample in self._read(urls, skipped):
                if split_by_shard or index % self.num_consumers == consumer:
                    yield sample
                index += 1

        empty_passes, position = 0, 0
        for pass_index in range(1_000_000):
            order = list(range(len(self.shards.urls)))
            random.Random(f"{self.seed}/{epoch}/{pass_index}").shuffle(order)  # the same on every consumer
            urls = [self.shards.urls[i] for i in order]
            # the sample index runs on over passes, so consumers beyond the sample count still get samples
            share = strided(urls[consumer :: self.num_consumers] if split_by_shard else urls,
                            pass_index * self.shards.num_samples)
            rng = random.Random(f"{self.seed}/{epoch}/{pass_index}/{consumer}")
            count = 0
            for sample in wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(share):
                count += 1
                position += 1
                yield [self.seed, epoch, consumer, position], sample
            empty_passes = 0 if count else empty_passes + 1
            if empty_passes > self.num_consumers:  # a strided share may be empty for a few passes, not for more
                raise SimmimError(f"no samples could be read from the shards ({self.shards.urls[0]}, ...); "
                                  "check that they are readable tar files made by simmim make-shards")


MAX_DEFAULT_WORKERS = 12  # beyond this the training process itself becomes the bottleneck of a node


def default_workers(local_processes: int) -> int:
    """Loader processes per training process: the cores this process may use, one left to the training process,
    capped. A process bound to a subset of the machine's cores (SLURM's ``--cpus-per-task``, taskset) has them
    to itself; one that may use every core shares them with the other training processes of the node."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    own_cores = usable < (os.cpu_count() or usable)
    share = usable if own_cores else usable // max(local_processes, 1)
    return max(1, min(MAX_DEFAULT_WORKERS, share - 1))


def too_few_shards(shards: int, processes: int, workers: int, samples: int | None) -> str | None:
    """What goes wrong with fewer shards than loader processes (``processes`` × ``workers``), and the fix; None
    when there are enough."""
    consumers = processes * max(workers, 1)
    if shards >= consumers:
        return None
    per_shard = f" --maxcount {max(1, samples // consumers)}" if samples else ""
    return (f"{shards} shard(s) for {consumers} loader processes ({processes} process(es) × {max(workers, 1)} "
            f"worker(s)): each loader process reads a shard from its start to get to its own samples, so the data "
            f"is read up to {consumers} times over and loading slows down (remote shards: downloaded as often); "
            f"write at least {consumers} shards, e.g. simmim make-shards IMAGES SHARDS{per_shard}")


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
    ``{"image": uint8, "label": int64, "skipped": [...]}``; with ``names`` also ``"key"`` and ``"source"`` (each
    image's sample key and shard URL) and ``"done"``: the shards whose every sample is in this batch or an earlier
    one (where each consumer reads whole shards: at least as many shards as ranks × workers).

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
        names: bool = False,
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
        self.names = names

    def _records(self, consumer: int, consumers: int,
                 skipped: list[str]) -> Iterator[tuple[bytes | None, int, str, str]]:
        """(image bytes, label, shard URL or file, sample key) of this consumer's samples; after each shard read
        whole, ``(None, -1, url, "")``."""
        if isinstance(self.source, ShardSet):
            urls = self.source.urls
            by_shard = len(urls) >= consumers
            mine = urls[consumer::consumers] if by_shard else urls
            lengths = dict(zip(urls, self.source.shard_lengths, strict=False)) if by_shard else None
            index = 0
            for url in mine:
                for sample in remote.shard_samples([url], skipped, lengths):
                    if by_shard or index % consumers == consumer:
                        try:
                            label = sample_label(sample, self.num_classes) if self.labels else -1
                            yield sample_image_bytes(sample), label, url, sample.get("__key__", "")
                        except ValueError as error:
                            skipped.append(f"{sample.get('__url__')}:{sample.get('__key__')}: {error}")
                    index += 1
                if by_shard:
                    yield None, -1, url, ""
        else:
            for path, label in self.source[consumer::consumers]:
                yield path.read_bytes(), label, str(path), ""

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped: list[str] = []
        images, labels, keys, sources, done = [], [], [], [], []
        for data, label, url, key in self._records(self.rank * workers + worker, self.world_size * workers, skipped):
            if data is None:  # a shard read whole
                if self.names:
                    done.append(url)
                continue
            try:
                images.append(self.transform(self.decode(data))["image"])
                labels.append(label)
                keys.append(key)
                sources.append(url)
            except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as error:
                skipped.append(f"{url}:{key}: {type(error).__name__}: {error}" if key
                               else f"{url}: {type(error).__name__}: {error}")
            if len(images) == self.batch_size:
                yield self._batch(images, labels, keys, sources, done, skipped)
                images, labels, keys, sources, done = [], [], [], [], []
                skipped.clear()
        if images or skipped or done:
            yield self._batch(images, labels, keys, sources, done, skipped)

    def _batch(self, images: list[torch.Tensor], labels: list[int], keys: list[str], sources: list[str],
               done: list[str], skipped: list[str]) -> dict[str, Any]:
        batch = {"image": torch.stack(images) if images else torch.empty(0, dtype=torch.uint8),
                 "label": torch.tensor(labels, dtype=torch.long), "skipped": list(skipped)}
        if self.names:
            batch.update(key=keys, source=sources, done=done)
        return batch


class TensorStream(torch.utils.data.IterableDataset):
    """Cached features: every epoch a new shuffle (seed, epoch), dealt out to ranks in whole batches: optimizer
    step s trains on samples ``[s × G, (s + 1) × G)`` of the epoch's order (G the global batch) on any cluster
    shape, so a resume with the same global batch continues exactly; the epoch's last ``len mod G`` samples wait
    for another epoch. With ``shuffle=False`` it is an evaluation stream (every sample once, the last batch
    short)."""

    workers = 0

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, accumulation: int = 1):
        self.features, self.labels = features, labels
        self.batch_size, self.rank, self.world_size, self.seed, self.shuffle = (
            batch_size, rank, world_size, seed, shuffle)
        self.global_batch = batch_size * world_size * accumulation
        self.batches_per_epoch = max(1, len(labels) // self.global_batch) * accumulation
        self.epoch, self.skip, self.epochs = 0, 0, 1

    def set_epoch(self, epoch: int, skip_batches: int = 0, epochs: int = 1, consumed: Any = None) -> None:
        """As :meth:`ShardStream.set_epoch`: ``epochs`` epochs from ``epoch`` on, after ``skip_batches`` (with the
        same global batch, ``consumed`` is the prefix they name)."""
        self.epoch, self.skip, self.epochs = epoch, skip_batches, epochs

    def resume_position(self, epoch: int, batches_done: int) -> dict[str, Any]:
        """As :meth:`ShardStream.resume_position`: a prefix of the epoch's order."""
        per_round = self.batch_size * self.world_size
        return {"epoch": epoch, "slots": self.batches_per_epoch * per_round,
                "consumed": [[0, batches_done * per_round]] if batches_done else []}

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
        if count < self.global_batch:  # fewer samples than one global batch: repeat them
            order = order.repeat(-(-self.global_batch // count))
        for batch in range(skip, self.batches_per_epoch):
            start = (batch * self.world_size + self.rank) * self.batch_size
            index = order[start:start + self.batch_size]
            yield {"features": self.features[index], "label": self.labels[index]}
