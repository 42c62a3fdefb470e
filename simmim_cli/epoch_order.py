"""The epoch order, the same whoever reads it, and how it is dealt out to the loader processes.

An epoch of ``N`` samples (shard lengths from ``_info.json``) is laid out as its shards in a (seed, epoch)
shuffled order, taken :data:`GROUP` at a time: the groups end to end, and inside a group the shards' samples
interleaved in proportion to their lengths, so that any stretch of the layout draws from every shard of its group
(shards written in class order, one class or site a shard, still give batches that mix them). The layout is cut
into blocks of :data:`BLOCK` samples, each shuffled by a (seed, epoch, block) permutation. The *epoch order* is
the blocks one after the other, each in its shuffled order: order index ``i`` names one sample of the layout.
Nothing in it depends on the number of nodes, GPUs or loader workers, and each shard is read forward (a consumer
reads whole blocks, the shards of a group side by side, never one sample at a time).

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
# shards read side by side: every block, and so every batch, mixes up to this many shards (each reader holds a
# remote shard's read-ahead buffer, 8 MB: more would cost memory in every loader process)
GROUP = 8

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


class _ShardReader:
    """One shard's samples, read forward."""

    def __init__(self, samples: Iterator[dict]):
        self.samples, self.next_offset, self.ended = samples, 0, False

    def take(self, offset: int) -> dict | None:
        """Sample ``offset`` (at or after :attr:`next_offset`); None where the shard ends before it."""
        sample = None
        while not self.ended and self.next_offset <= offset:
            sample = next(self.samples, None)
            self.ended = sample is None
            self.next_offset += not self.ended
        return sample if self.next_offset == offset + 1 else None

    def close(self) -> None:
        close = getattr(self.samples, "close", None)  # a generator: its shard's file closes now
        if close is not None:
            close()


class LayoutCursor:
    """Samples by position in the layout of shards given in order (:data:`GROUP` shards at a time, interleaved).
    Each shard is read forward by a reader of its own; shards of groups not asked for are never opened, a step
    back starts that shard's reader again, and the readers of a group are closed once a read has left it."""

    def __init__(self, urls: list[str], lengths: list[int], read: Callable[[list[str]], Iterator[dict]]):
        self.urls, self.lengths, self.read_urls = urls, lengths, read
        self.groups = [range(first, min(first + GROUP, len(urls))) for first in range(0, len(urls), GROUP)]
        self.group_starts = list(itertools.accumulate((sum(lengths[i] for i in group) for group in self.groups),
                                                      initial=0))
        self.readers: dict[int, _ShardReader] = {}
        self._placed: tuple[int, np.ndarray, np.ndarray] | None = None

    def _group_layout(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset in the shard) of each position of ``group``: sample ``o`` of a shard of length ``L`` sits
        at about ``(o + 1/2) / L`` of the group (ties: the earlier shard first)."""
        if self._placed is None or self._placed[0] != group:
            shards = np.asarray(self.groups[group])
            lengths = np.asarray([self.lengths[i] for i in shards], dtype=np.int64)
            which = np.repeat(np.arange(len(shards)), lengths)
            offsets = np.arange(len(which)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            order = np.lexsort((which, (2 * offsets + 1) / (2 * lengths[which])))
            self._placed = (group, shards[which[order]], offsets[order])
        return self._placed[1], self._placed[2]

    def _sample(self, shard: int, offset: int) -> dict | None:
        reader = self.readers.get(shard)
        if reader is None or reader.next_offset > offset:  # not open yet, or a step back
            if reader is not None:
                reader.close()
            reader = self.readers[shard] = _ShardReader(iter(self.read_urls([self.urls[shard]])))
        return reader.take(offset)

    def read(self, lo: int, hi: int) -> list[dict | None]:
        """Positions ``[lo, hi)``: their samples, None where a shard holds fewer than its length."""
        found: list[dict | None] = []
        groups = range(bisect.bisect_right(self.group_starts, lo) - 1, bisect.bisect_left(self.group_starts, hi))
        for group in groups:
            start = self.group_starts[group]
            shards, offsets = self._group_layout(group)
            for position in range(max(lo, start), min(hi, self.group_starts[group + 1])):
                found.append(self._sample(int(shards[position - start]), int(offsets[position - start])))
        for shard in [s for s in self.readers if not any(s in self.groups[g] for g in groups)]:
            self.readers.pop(shard).close()
        return found
