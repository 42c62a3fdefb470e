"""The epoch order, the same whoever reads it, and how it is dealt out to the loader processes.

An epoch of ``N`` samples (shard lengths from ``_info.json``) is laid out as its shards end to end in a
(seed, epoch) shuffled order; the layout is cut into blocks of :data:`BLOCK` samples, each shuffled by a
(seed, epoch, block) permutation. The *epoch order* is the blocks one after the other, each in its shuffled
order: order index ``i`` names one sample of the layout. Nothing in it depends on the number of nodes, GPUs or
loader workers, and a block is read sequentially (a consumer reads whole blocks, never one sample at a time).

An epoch has ``steps × global batch`` slots, ``N`` or up to one global batch more: slot ``p`` holds order index
``p % N``, so the last step fills up with samples from the epoch's start (repeats, with augmentation of their
own, as torch's DistributedSampler pads). Slots still to train on are dealt in contiguous runs to the consumers
(rank × loader worker role), each as many as its batches need. The resume position is the set of slots trained
on, a short list of ``[start, stop)`` ranges: any other cluster shape re-deals the rest, each slot once.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

BLOCK = 1024  # samples shuffled together: the mixing of the shuffle buffer it replaces, one block in memory

Ranges = list[tuple[int, int]]


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(f"{seed}/{epoch}/0").shuffle(order)
    return order


def block_permutation(seed: int, epoch: int, block: int, length: int) -> np.ndarray:
    """Offsets in the layout of the block's samples, in their epoch order."""
    return np.random.default_rng([seed, epoch, block]).permutation(length)


def merge(ranges: Ranges) -> Ranges:
    """Sorted, with touching or overlapping ranges joined; empty ones dropped."""
    merged: Ranges = []
    for start, stop in sorted((int(a), int(b)) for a, b in ranges if b > a):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def complement(ranges: Ranges, extent: int) -> Ranges:
    """[0, extent) less ``ranges``."""
    rest, start = [], 0
    for a, b in merge(ranges):
        if a > start:
            rest.append((start, min(a, extent)))
        start = max(start, b)
    if start < extent:
        rest.append((start, extent))
    return [(a, b) for a, b in rest if b > a]


def size(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def take(ranges: Ranges, pieces: list[tuple[int, int]]) -> Ranges:
    """Items ``[start, start + count)`` of the ranges laid end to end, for each ``(start, count)`` of ``pieces``
    (in increasing order, not overlapping): one walk over the ranges."""
    taken: Ranges = []
    index, offset = 0, 0  # ranges[index] starts at item ``offset``
    for start, count in pieces:
        while index < len(ranges) and offset + ranges[index][1] - ranges[index][0] <= start:
            offset += ranges[index][1] - ranges[index][0]
            index += 1
        at, first = index, offset
        while at < len(ranges) and first < start + count:
            a, b = ranges[at]
            lo, hi = a + max(0, start - first), min(b, a + start + count - first)
            if hi > lo:
                taken.append((lo, hi))
            first += b - a
            at += 1
    return taken


def batches_of_role(role: int, workers: int, upto: int) -> int:
    """Of an epoch's rank batches ``0 .. upto-1``, how many worker role ``role`` makes (batch j: role j % workers)."""
    return max(0, -(-(upto - role) // workers))


@dataclass(frozen=True)
class Dealing:
    """Who trains on which slots of one epoch: ``ranks × workers`` consumers, rank-major, each taking the next
    contiguous run of the slots not yet trained on (``consumed``), as many as its batches of the epoch's rank
    batches ``first .. batches-1`` need."""

    extent: int  # slots in the epoch: steps × global batch
    consumed: tuple[tuple[int, int], ...]  # slots trained on before ``first``
    ranks: int
    workers: int
    batch_size: int
    first: int  # the first rank batch (of the epoch) dealt here
    batches: int  # rank batches in the epoch

    def quota(self, role: int, upto: int | None = None) -> int:
        """Batches role ``role`` makes from ``first`` up to rank batch ``upto`` (default: the epoch's end)."""
        upto = self.batches if upto is None else upto
        return (batches_of_role(role, self.workers, upto) - batches_of_role(role, self.workers, self.first))

    def _pieces(self, done: int | None = None) -> list[tuple[int, int]]:
        """(first item, items) in the rest of the epoch for each consumer, rank-major: its share (``done``
        None) or the part of it in rank batches before ``done``."""
        pieces, start = [], 0
        for _rank in range(self.ranks):
            for role in range(self.workers):
                pieces.append((start, self.quota(role, done) * self.batch_size if done is not None else
                               self.quota(role) * self.batch_size))
                start += self.quota(role) * self.batch_size
        return pieces

    def share(self, rank: int, role: int) -> Ranges:
        """The slots of consumer (rank, role), in the order it trains on them."""
        piece = self._pieces()[rank * self.workers + role]
        return take(complement(list(self.consumed), self.extent), [piece])

    def consumed_after(self, done: int) -> Ranges:
        """The slots trained on once every rank has made its rank batches ``0 .. done-1``."""
        pieces = [(start, max(0, count)) for start, count in self._pieces(done)]
        return merge(list(self.consumed) + take(complement(list(self.consumed), self.extent), pieces))


def slots(share: Ranges) -> Iterator[int]:
    for a, b in share:
        yield from range(a, b)


class LayoutCursor:
    """Samples by position in shards laid end to end, read forward: whole shards before a wanted position are
    passed over unopened, a step back starts again at the shard that holds it."""

    def __init__(self, urls: list[str], lengths: list[int], read: Callable[[list[str]], Iterator[dict]]):
        self.urls, self.lengths, self.read_urls = urls, lengths, read
        self.starts = list(itertools.accumulate(lengths, initial=0))
        self.samples: Iterator[tuple[int, dict]] | None = None
        self.position = 0  # where the samples iterator stands
        self.pending: tuple[int, dict] | None = None

    def _shard_of(self, position: int) -> int:
        return bisect.bisect_right(self.starts, position) - 1

    def _from_shard(self, shard: int) -> Iterator[tuple[int, dict]]:
        for index in range(shard, len(self.urls)):
            for offset, sample in enumerate(self.read_urls([self.urls[index]])):
                if offset >= self.lengths[index]:
                    break
                yield self.starts[index] + offset, sample

    def read(self, lo: int, hi: int) -> list[dict | None]:
        """Positions ``[lo, hi)``: their samples, None where a shard holds fewer than its length."""
        if self.samples is None or lo < self.position or self._shard_of(lo) > self._shard_of(self.position):
            self.samples, self.pending = self._from_shard(self._shard_of(lo)), None
        found: list[dict | None] = [None] * (hi - lo)
        while True:
            item = self.pending or next(self.samples, None)
            self.pending = None
            if item is None:
                break
            if item[0] >= hi:
                self.pending = item
                break
            if item[0] >= lo:
                found[item[0] - lo] = item[1]
        self.position = hi
        return found
