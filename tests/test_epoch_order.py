"""Guards of learning quality in the epoch order (issue 36): what a batch mixes, how often a sample comes, and that
a sample's augmentation and mask change from epoch to epoch, with loader processes that live across epochs."""

import collections

import numpy as np
import pytest
import torch
from test_data import numbered_shards, numbers

from simmim_cli.pipeline import ShardStream, make_loader
from simmim_cli.shards import resolve_shards


def numbered_and_noisy(image) -> dict[str, torch.Tensor]:
    """The sample's number (its pixels) and one draw of the augmentation's random stream."""
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    return {"image": pixels, "draw": torch.rand(1)}


def run_epochs(folder, epochs: int, **kwargs) -> list[list[dict]]:
    """Every batch of ``epochs`` epochs, read in one pass of a DataLoader (its workers live across the epochs),
    as lists of {"number", "draw"} per epoch."""
    dataset = ShardStream(resolve_shards(str(folder)), numbered_and_noisy, seed=0, **kwargs)
    dataset.set_epoch(0, epochs=epochs)
    per_epoch: list[list[dict]] = [[] for _ in range(epochs)]
    for index, batch in enumerate(make_loader(dataset)):
        rows = [{"number": n, "draw": d} for n, d in zip(numbers(batch), batch["draw"].flatten().tolist(), strict=True)]
        per_epoch[index // dataset.batches_per_epoch].append(rows)
    return per_epoch


def expected_distinct(classes: int, batch: int) -> float:
    """Distinct classes in a batch drawn from a global shuffle of equally many samples per class."""
    return classes * (1 - (1 - 1 / classes) ** batch)


def test_batches_mix_classes_as_a_global_shuffle_would_when_each_shard_holds_one_class(tmp_path):
    """Shards written in class order (one class a shard, as from a tool that does not shuffle): each batch must
    still mix the classes about as a shuffle of the whole epoch does, not take them one or two shards at a time.
    Shards longer than a block, so that a block read from one or two shards would hold one or two classes."""
    classes, per_shard, batch = 8, 1024, 32
    folder = numbered_shards(tmp_path / "shards", [per_shard] * classes)
    (epoch,) = run_epochs(folder, 1, batch_size=batch, workers=2)
    distinct = [len({row["number"] // per_shard for row in rows}) for rows in epoch]
    assert np.mean(distinct) >= 0.9 * expected_distinct(classes, batch), distinct


def test_a_set_no_bigger_than_the_old_shuffle_buffer_is_shuffled_whole_every_epoch(tmp_path):
    """1,437 samples in 6 shards (the digits of the learning benchmark): 775f5f8's shuffle buffer of 2,000 mixed the
    whole epoch, and so must the order, each sample's place in the epoch drawn anew each epoch. Blocks of 1,024 cut
    the set into two parts that kept their samples every epoch (a sample never left the first 71% of the epoch or
    the last 29%: a median spread of 0.55 over ten epochs, against 0.83 for 775f5f8's order): a property of
    775f5f8's order that f25e2f1, the commit issue 36's bisection names, lost."""
    lengths = [256] * 5 + [157]
    folder = numbered_shards(tmp_path / "shards", lengths)
    total, epochs = sum(lengths), 10
    places: dict[int, list[int]] = collections.defaultdict(list)
    for epoch in run_epochs(folder, epochs, batch_size=64, workers=0):
        for place, row in enumerate(row for rows in epoch for row in rows):
            if place < total:  # past the epoch's samples: the last step's repeats
                places[row["number"]].append(place)
    spread = [(max(p) - min(p)) / total for p in places.values()]
    # ten places drawn uniformly span 9/11 of the epoch on average; half the samples span more than 0.84
    assert len(spread) == total and np.median(spread) > 0.75, np.median(spread)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_each_sample_comes_once_an_epoch_and_its_augmentation_changes_between_epochs(tmp_path, workers):
    lengths = [40, 25, 33, 17]
    folder = numbered_shards(tmp_path / "shards", lengths)
    epochs = run_epochs(folder, 3, batch_size=8, workers=workers)
    total = sum(lengths)
    draws: dict[int, list[float]] = collections.defaultdict(list)
    for epoch in epochs:
        counts = collections.Counter(row["number"] for rows in epoch for row in rows)
        assert set(counts) == set(range(total))
        padding = sum(counts.values()) - total  # the last step fills up with repeats, fewer than a global batch
        assert 0 <= padding < 8 and sum(count - 1 for count in counts.values()) == padding
        first = {}
        for rows in epoch:
            for row in rows:
                first.setdefault(row["number"], row["draw"])
        for number, draw in first.items():
            draws[number].append(draw)
    # a sample's crops and mask come from its own random stream: different in every epoch
    assert all(len(set(values)) == len(values) == 3 for values in draws.values())
