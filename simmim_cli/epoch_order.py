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

Several sources (:class:`Mixture`) make one virtual layout of the same kind, so that the dealing, the slots and
the resume position stay as they are. Each source is read in *passes*: pass ``k`` of a source is its own order
as above (its shards shuffled by (seed, source, k), blocks shuffled), and its draws run through pass after pass
across epochs: epoch ``e`` takes draws ``[e × c, (e + 1) × c)`` of a source giving ``c`` samples an epoch. So no
sample of a source repeats before all of it was drawn, an up-sampled source goes through all of its samples
before any repeats, and a down-sampled one takes the next part of its pass each epoch. An epoch's order is cut
into blocks as above, each holding every source in its share (:func:`split`), each source's draws spread evenly
over the block (:func:`block_sources`): any run of slots, and so every batch, holds each source in its share.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

# samples shuffled together, one block in memory: as many as the shuffle buffer the blocks replaced (2,000), so
# that a set the buffer shuffled whole every epoch still is (with 1,024 the learning benchmark's 1,437 images were
# cut into two blocks that kept their samples from epoch to epoch: issue 36)
BLOCK = 2048
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


def group_starts(lengths: list[int]) -> list[int]:
    """Where each group of :data:`GROUP` shards (of these lengths, in layout order) starts in the layout, and
    where the last ends."""
    return list(itertools.accumulate((sum(lengths[first:first + GROUP]) for first in range(0, len(lengths), GROUP)),
                                     initial=0))


def groups_holding(starts: list[int], lo: int, hi: int) -> range:
    """The groups holding positions ``[lo, hi)``, given :func:`group_starts`."""
    return range(bisect.bisect_right(starts, lo) - 1, bisect.bisect_left(starts, hi)) if hi > lo else range(0)


def layout_shards(lengths: list[int], lo: int, hi: int) -> list[int]:
    """Which of the shards (of these lengths, in layout order) hold positions ``[lo, hi)`` of the layout: every
    shard of each group the positions touch."""
    return [shard for group in groups_holding(group_starts(lengths), lo, hi)
            for shard in range(group * GROUP, min((group + 1) * GROUP, len(lengths))) if lengths[shard]]


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
        self.group_starts = group_starts(lengths)
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
        groups = groups_holding(self.group_starts, lo, hi)
        for group in groups:
            start = self.group_starts[group]
            shards, offsets = self._group_layout(group)
            for position in range(max(lo, start), min(hi, self.group_starts[group + 1])):
                found.append(self._sample(int(shards[position - start]), int(offsets[position - start])))
        for shard in [s for s in self.readers if not any(s in self.groups[g] for g in groups)]:
            self.readers.pop(shard).close()
        return found


class EpochBlocks:
    """One source's epoch order, a block at a time: ``block(b)`` holds the samples of order indices
    ``[b × size, (b + 1) × size)`` in order (None where a shard falls short), read whole and sequentially."""

    def __init__(self, urls: list[str], lengths: list[int], seed: int, epoch: int,
                 read: Callable[[list[str]], Iterator[dict]], size: int = BLOCK):
        order = shard_order(len(urls), seed, epoch)
        self.cursor = LayoutCursor([urls[i] for i in order], [lengths[i] for i in order], read)
        self.total, self.seed, self.epoch, self.size = sum(lengths), seed, epoch, size

    def block(self, index: int) -> list[dict | None]:
        lo = index * self.size
        found = self.cursor.read(lo, min(lo + self.size, self.total))
        permutation = block_permutation(self.seed, self.epoch, index, len(found))
        return [found[i] for i in permutation.tolist()]


# ---------------------------------------------------------------------------------------------- several sources


@dataclass(frozen=True)
class Source:
    """A source of a mixture: its shards (the next ``shards`` of the mixture's shard list), the samples they hold
    and the samples it gives each epoch."""

    name: str
    shards: int
    samples: int
    per_epoch: int


def split(position: int, weights: list[int]) -> list[int]:
    """How many of an epoch's first ``position`` order indices each source holds, for sources giving ``weights``
    samples an epoch: the sources split in two halves, the first taking ``floor(position × its weights / all
    weights)``, and each half split so in turn. Exact at the epoch's end, never less as ``position`` grows (one
    position more is one more of exactly one source), each source within about log2(sources) of its ideal."""
    if len(weights) == 1:
        return [position]
    middle = len(weights) // 2
    first = position * sum(weights[:middle]) // sum(weights)
    return split(first, weights[:middle]) + split(position - first, weights[middle:])


def block_sources(counts: list[int]) -> np.ndarray:
    """The source of each position of a block holding ``counts[s]`` draws of source ``s``: the k-th of its ``m``
    draws sits at about (k + ½)/m of the block (ties: the lower source first), so that any run of positions holds
    each source in its share within two samples (measured up to ten sources; one for two sources)."""
    counts_array = np.asarray(counts, dtype=np.int64)
    sources = np.repeat(np.arange(len(counts_array)), counts_array)
    ranks = np.arange(len(sources)) - np.repeat(np.cumsum(counts_array) - counts_array, counts_array)
    keys = (2 * ranks + 1) / (2 * counts_array[sources])  # equal fractions give equal floats: ties are exact
    return sources[np.lexsort((sources, keys))]


def source_shard_order(num_shards: int, seed: int, source: int, pass_index: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(f"{seed}/source {source}/pass {pass_index}").shuffle(order)
    return order


def source_block_permutation(seed: int, source: int, pass_index: int, block: int, length: int) -> np.ndarray:
    return np.random.default_rng([seed, source, pass_index, block, 1]).permutation(length)


@dataclass(frozen=True)
class Mixture:
    """Several sources as one epoch order: the per-source bookkeeping of a mixed shard list (the sources' shards one
    after the other). Order index ``i`` of an epoch is a draw of one source (:meth:`block_draws`)."""

    sources: tuple[Source, ...]

    @property
    def epoch_samples(self) -> int:
        return sum(source.per_epoch for source in self.sources)

    @property
    def weights(self) -> list[int]:
        return [source.per_epoch for source in self.sources]

    def block_draws(self, block: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, draw of that source within the epoch) of each order index of block ``block``, in order."""
        lo = block * size
        start, stop = split(lo, self.weights), split(min(lo + size, self.epoch_samples), self.weights)
        sources = block_sources([b - a for a, b in zip(start, stop, strict=True)])
        draws = np.empty(len(sources), dtype=np.int64)
        for index, first in enumerate(start):
            where = np.flatnonzero(sources == index)
            draws[where] = first + np.arange(len(where))
        return sources, draws

    def taken(self, position: int, size: int) -> list[int]:
        """Order indices of each source among the epoch's first ``position`` (at most an epoch)."""
        block, offset = divmod(position, size)
        before = split(block * size, self.weights)
        if offset:
            sources, _ = self.block_draws(block, size)
            before = [a + int(n) for a, n in zip(before, np.bincount(sources[:offset], minlength=len(before)),
                                                 strict=True)]
        return before

    def slot_counts(self, ranges: Ranges, size: int) -> list[int]:
        """Samples of each source in the slots ``ranges`` (slot ``p`` holds order index ``p mod epoch``)."""
        total = self.epoch_samples

        def upto(slot: int) -> list[int]:
            rounds, rest = divmod(slot, total)
            return [rounds * source.per_epoch + n for source, n in zip(self.sources, self.taken(rest, size),
                                                                       strict=True)]
        counts = [0] * len(self.sources)
        for a, b in ranges:
            counts = [n + y - x for n, x, y in zip(counts, upto(a), upto(b), strict=True)]
        return counts

    def shard_starts(self) -> list[int]:
        return list(itertools.accumulate((source.shards for source in self.sources), initial=0))

    def epoch_shards(self, lengths: list[int], seed: int, epoch: int, size: int = BLOCK) -> list[int]:
        """The shards (indices into the mixed shard list) holding each source's draws of ``epoch``, whole shards
        (a block's draws are read from its layout span), the sources' shards interleaved by their share of the
        epoch: what a reader that reads whole shards (DALI) can follow."""
        placed: list[tuple[float, int, int]] = []
        for index, (source, first) in enumerate(zip(self.sources, self.shard_starts(), strict=False)):
            own = lengths[first:first + source.shards]
            picked = []
            draw, end = epoch * source.per_epoch, (epoch + 1) * source.per_epoch
            while draw < end:
                pass_index, position = divmod(draw, source.samples)
                stop = min(source.samples, position + end - draw)
                lo, hi = position // size * size, min(source.samples, -(-stop // size) * size)
                order = source_shard_order(source.shards, seed, index, pass_index)
                picked += [first + order[i] for i in layout_shards([own[i] for i in order], lo, hi)]
                draw += stop - position
            placed += [((k + 0.5) / len(picked), index, shard) for k, shard in enumerate(picked)]
        return [shard for _, _, shard in sorted(placed)]


class _Passes:
    """One source's draws, pass after pass: draw ``d`` is index ``d mod N`` of its pass ``d div N``'s order (its
    shards shuffled for the pass, blocks shuffled), read a block at a time."""

    def __init__(self, urls: list[str], lengths: list[int], seed: int, source: int,
                 read: Callable[[list[str]], Iterator[dict]], size: int):
        self.urls, self.lengths, self.seed, self.source, self.read, self.size = urls, lengths, seed, source, read, size
        self.total = sum(lengths)
        self.pass_index, self.cursor = -1, None
        self.block_key: tuple[int, int] | None = None
        self.block: list[dict | None] = []

    def draw(self, draw: int) -> dict | None:
        pass_index, position = divmod(draw, self.total)
        key = (pass_index, position // self.size)
        if key != self.block_key:
            if pass_index != self.pass_index:
                order = source_shard_order(len(self.urls), self.seed, self.source, pass_index)
                self.cursor = LayoutCursor([self.urls[i] for i in order], [self.lengths[i] for i in order], self.read)
                self.pass_index = pass_index
            lo = key[1] * self.size
            found = self.cursor.read(lo, min(lo + self.size, self.total))
            permutation = source_block_permutation(self.seed, self.source, pass_index, key[1], len(found))
            self.block, self.block_key = [found[i] for i in permutation.tolist()], key
        return self.block[position % self.size]


class MixedBlocks:
    """A mixture's epoch order, a block at a time, as :class:`EpochBlocks`: each order index's source draw, read
    through the source's passes (one block of each source in memory)."""

    def __init__(self, mixture: Mixture, urls: list[str], lengths: list[int], seed: int, epoch: int,
                 read: Callable[[list[str]], Iterator[dict]], size: int = BLOCK):
        firsts = mixture.shard_starts()
        self.mixture, self.epoch, self.size = mixture, epoch, size
        self.passes = [_Passes(urls[a:b], lengths[a:b], seed, index, read, size)
                       for index, (a, b) in enumerate(itertools.pairwise(firsts))]

    def block(self, index: int) -> list[dict | None]:
        sources, draws = self.mixture.block_draws(index, self.size)
        per_epoch = self.mixture.weights
        return [self.passes[s].draw(self.epoch * per_epoch[s] + d) for s, d in zip(sources.tolist(), draws.tolist(),
                                                                                  strict=True)]
