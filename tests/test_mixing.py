"""Several --data sources in one run (mixture.py, epoch_order.Mixture, data_sources.training_shards): the spelling,
the shares, every source's samples per epoch exactly, no sample of a source again before all of it was drawn,
every batch mixed, exact resumes on another cluster shape, and one line for each bad mixture.

Sample numbers are written into the pixels (as in test_data): source A holds 0-22, B 100-139, C 200-230."""

import collections
import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import TINY_MODELS, free_port
from PIL import Image
from test_data import identity, numbers
from test_elastic import ledger_batches, rank_batches, train_with_ledger
from typer.testing import CliRunner

from simmim_cli import checkpoints, dali, data_sources, distributed, epoch_order, limits, mixture
from simmim_cli.cli import app
from simmim_cli.config import LinearProbeConfig, PretrainConfig
from simmim_cli.data_sources import training_shards
from simmim_cli.errors import SimmimError
from simmim_cli.pipeline import ShardStream

LENGTHS = {"a": [7, 5, 11], "b": [9, 9, 9, 13], "c": [10, 11, 10]}  # 23, 40 and 31 samples
FIRST = {"a": 0, "b": 100, "c": 200}


def numbered(folder: Path, lengths: list[int], first: int, classes: list[str] | None = None,
             images: dict | None = None) -> Path:
    """Shards of solid 8×8 PNGs whose pixels say the sample's number (``first`` on), label number % 3."""
    folder.mkdir(parents=True, exist_ok=True)
    number, names = first, []
    for shard, length in enumerate(lengths):
        names.append(f"train-{shard:06d}.tar")
        with wds.TarWriter(str(folder / names[-1])) as writer:
            for _ in range(length):
                pixels = np.zeros((8, 8, 3), dtype=np.uint8)
                pixels[..., 0], pixels[..., 1] = number % 256, number // 256
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                writer.write({"__key__": f"s{number:05d}", "png": buffer.getvalue(), "cls": number % 3})
                number += 1
    info = {"splits": {"train": {"name": "train", "num_samples": sum(lengths), "filenames": names,
                                 "shard_lengths": lengths}}}
    if classes:
        info.update(classes=classes, num_classes=len(classes))
    if images:
        info["images"] = images
    (folder / "_info.json").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {name: numbered(root / name, lengths, FIRST[name], classes=["x", "y", "z"])
            for name, lengths in LENGTHS.items()}


def three(sources) -> list[str]:
    """A up-sampled (2 passes), B a proportion (25%), C down-sampled (12 samples of 31 an epoch)."""
    return [f"{sources['a']}::2x", f"{sources['b']}::25%", f"{sources['c']}::12"]


def source_of(number: int) -> str:
    return "abc"[number // 100]


def key_number(sample: dict) -> int:
    return int(sample["__key__"][1:])


def epoch_order_numbers(shards, epoch: int, block_size: int = 8) -> list[int]:
    """The sample numbers of an epoch's order indices 0 .. epoch size - 1 (one consumer reads them all)."""
    stream = ShardStream(shards, identity, batch_size=1, block_size=block_size)
    share = [(0, shards.num_samples)]
    return [key_number(sample) for _, sample in itertools.islice(stream._ordered_samples(epoch, share, []),
                                                                 shards.num_samples)]


# ---------------------------------------------------------------------------------------------- the spelling


def test_a_share_follows_a_double_colon_and_urls_keep_their_colons():
    specs = mixture.parse(["ours/", "s3://bucket/imagenet-subset/::30%", "https://[::1]:9000/b/train/",
                           "rare/::0.5x", "rare2/::3x", "more/train-{000000..000009}.tar::20000"])
    assert [(s.path, s.kind, s.value) for s in specs] == [
        ("ours/", None, 1.0), ("s3://bucket/imagenet-subset/", "proportion", 0.3),
        ("https://[::1]:9000/b/train/", None, 1.0), ("rare/", "passes", 0.5), ("rare2/", "passes", 3.0),
        ("more/train-{000000..000009}.tar", "samples", 20000.0)]
    assert [s.name for s in specs] == ["ours", "imagenet-subset", "train", "rare", "rare2", "more"]
    assert mixture.default_name("https://user:secret@host/data/?X-Amz-Signature=abc") == "data"
    assert [s.name for s in mixture.parse(["x/train/", "y/train/::2x"])] == ["train", "train#2"]


def test_one_source_without_a_share_stays_as_it_was_and_a_mixture_becomes_the_yaml_form():
    assert mixture.normalize(["shards/"]) == "shards/" and mixture.normalize("shards/") == "shards/"
    assert mixture.normalize(None) is None and mixture.normalize([]) is None
    assert mixture.normalize(["a/", "b/::30%"]) == [{"path": "a/", "name": "a"},
                                                   {"path": "b/", "proportion": 0.3, "name": "b"}]
    again = mixture.normalize(mixture.normalize(["a/", "b/::30%"]))  # a run's config.yaml used as a recipe
    assert again == mixture.normalize(["a/", "b/::30%"])


def test_a_yaml_file_lists_sources_relative_to_itself(tmp_path):
    (tmp_path / "sources.yaml").write_text(
        "- path: ours/\n- {path: s3://bucket/general/, proportion: 0.3, name: general}\n"
        "- {path: rare/, passes: 3}\n- {path: /abs/other/, samples: 500}\n")
    specs = mixture.parse(str(tmp_path / "sources.yaml"))
    assert [(s.path, s.kind, s.value, s.name) for s in specs] == [
        (str(tmp_path / "ours/"), None, 1.0, "ours"), ("s3://bucket/general/", "proportion", 0.3, "general"),
        (str(tmp_path / "rare/"), "passes", 3.0, "rare"), ("/abs/other/", "samples", 500.0, "other")]


def test_the_command_line_takes_repeated_data_and_a_yaml_file(monkeypatch, tmp_path):
    from simmim_cli.commands import finetune, pretrain

    seen = []
    monkeypatch.setattr(pretrain, "pretrain", seen.append)
    monkeypatch.setattr(finetune, "finetune", seen.append)
    runner = CliRunner()
    result = runner.invoke(app, ["pretrain", "--data", "ours/", "--data", "s3://bucket/general/::30%"])
    assert result.exit_code == 0, result.output
    assert seen[-1].data == [{"path": "ours/", "name": "ours"},
                             {"path": "s3://bucket/general/", "proportion": 0.3, "name": "general"}]
    assert runner.invoke(app, ["pretrain", "--data", "shards/"]).exit_code == 0 and seen[-1].data == "shards/"
    (tmp_path / "mix.yaml").write_text("- {path: a/, passes: 2}\n- {path: b/, samples: 100}\n")
    result = runner.invoke(app, ["finetune", "--data", str(tmp_path / "mix.yaml"), "--model", "vit_tiny_patch16_224"])
    assert result.exit_code == 0, result.output
    assert [entry.get("passes", entry.get("samples")) for entry in seen[-1].data] == [2.0, 100]


# ---------------------------------------------------------------------------------------------- the shares


def test_each_kind_of_share_gives_its_samples_per_epoch():
    def counts(*data, sizes, epoch_size=None):
        return mixture.plan(mixture.parse(list(data)), sizes, epoch_size)

    assert counts("a/", "b/::2x", "c/::0.5x", "d/::7", sizes=[10, 10, 9, 50]) == [10, 20, 4, 7]  # 4.5 rounds to even
    assert counts("a/", "b/::30%", sizes=[70, 1000]) == [70, 30]  # 70 is the other 70% of the epoch
    assert counts("a/::2x", "b/::25%", "c/::12", sizes=[23, 40, 31]) == [46, 19, 12]  # 58 = 75% of 77
    assert counts("a/::70%", "b/::30%", sizes=[100, 900]) == [700, 300]  # proportions of all the samples
    assert counts("a/::70%", "b/::30%", sizes=[100, 900], epoch_size=50) == [35, 15]
    assert counts("a/::1%", "b/::1%", "c/::98%", sizes=[1, 1, 98]) == [1, 1, 98]
    assert sum(counts("a/::33.3%", "b/::33.3%", "c/::33.4%", sizes=[10, 10, 11])) == 31


def test_the_epoch_split_is_exact_monotone_and_near_its_share():
    rng = np.random.default_rng(0)
    for _ in range(30):
        weights = [int(w) for w in rng.integers(1, 300, size=int(rng.integers(1, 8)))]
        previous = [0] * len(weights)
        for position in range(1, sum(weights) + 1):
            counts = epoch_order.split(position, weights)
            assert sorted(b - a for a, b in zip(previous, counts, strict=True)) == [0] * (len(weights) - 1) + [1]
            ideal = [position * w / sum(weights) for w in weights]
            assert max(abs(c - i) for c, i in zip(counts, ideal, strict=True)) < 3
            previous = counts
        assert previous == weights


def test_any_run_of_an_epoch_holds_each_source_in_its_share():
    """Slots are dealt in contiguous runs and a rank's batch is consecutive slots: any 32 consecutive order indices
    (of 7,000, in blocks of 1,024) hold each of three sources within 3 of its share."""
    mix = epoch_order.Mixture((epoch_order.Source("a", 1, 10_000, 4_550), epoch_order.Source("b", 1, 500, 2_000),
                               epoch_order.Source("c", 1, 90, 450)))
    order = np.concatenate([mix.block_draws(b, 1024)[0] for b in range(-(-mix.epoch_samples // 1024))])
    assert np.bincount(order).tolist() == [4_550, 2_000, 450]
    window = 32
    running = np.vstack([np.zeros(3), np.cumsum(np.eye(3)[order], axis=0)])
    in_window = running[window:] - running[:-window]
    ideal = window * np.array(mix.weights) / mix.epoch_samples
    assert np.abs(in_window - ideal).max() <= 3
    assert mix.slot_counts([(0, 7_000)], 1024) == [4_550, 2_000, 450]
    assert mix.slot_counts([(100, 2_000)], 1024) == np.bincount(order[100:2_000], minlength=3).tolist()
    assert mix.slot_counts([(6_990, 7_010)], 1024) == np.bincount(np.concatenate(
        [order[6_990:], order[:10]]), minlength=3).tolist()  # slots past the epoch repeat its start


# ---------------------------------------------------------------------------------------------- the order


def test_every_source_gives_exactly_its_samples_and_repeats_none_before_all_were_drawn(sources):
    shards = training_shards(three(sources))
    assert shards.num_samples == 77 and [s.per_epoch for s in shards.mixture.sources] == [46, 19, 12]
    drawn = collections.defaultdict(list)
    for epoch in range(6):
        order = epoch_order_numbers(shards, epoch)
        counts = collections.Counter(map(source_of, order))
        assert counts == {"a": 46, "b": 19, "c": 12}, epoch
        a = collections.Counter(n for n in order if n < 100)
        assert set(a.values()) == {2} and len(a) == 23  # two passes: every sample twice, each epoch
        for number in order:
            drawn[source_of(number)].append(number)
    assert order != epoch_order_numbers(shards, 4)  # epochs differ
    for name, size in (("a", 23), ("b", 40), ("c", 31)):
        sequence = drawn[name]
        for start in range(0, len(sequence) - size + 1, size):  # each run of a whole source: all of it, once
            assert sorted(sequence[start:start + size]) == list(range(FIRST[name], FIRST[name] + size)), name
        whole = len(sequence) // size * size
        assert len(set(sequence[whole:])) == len(sequence) - whole  # the pass under way: no repeat either
    assert len(set(drawn["c"][:36])) == 31  # down-sampled: all of C within three epochs (12 a time), no repeat
    assert set(drawn["c"][:12]) != set(drawn["c"][12:24])  # and another part each epoch


def test_the_order_is_a_function_of_seed_epoch_and_sources_only(sources):
    shards = training_shards(three(sources))
    assert epoch_order_numbers(shards, 2) == epoch_order_numbers(training_shards(three(sources)), 2)
    assert epoch_order_numbers(shards, 2) != epoch_order_numbers(shards, 3)

    def slots(ranks: int, workers: int, batch: int) -> dict[int, int]:
        found = {}
        for rank in range(ranks):
            stream = ShardStream(shards, identity, batch_size=batch, workers=workers, rank=rank, world_size=ranks,
                                 block_size=8)
            for role in range(workers):
                share = stream._dealing(2).share(rank, role)
                for seed_key, sample in itertools.islice(stream._ordered_samples(2, share, []),
                                                         epoch_order.size(share)):
                    found[seed_key[2]] = key_number(sample)
        return found

    one = slots(1, 1, 6)
    assert slots(2, 3, 1) == slots(3, 1, 2) == one and len(one) == 78  # 77 and one slot of padding


# (ranks, loader workers, batch per process, accumulation): a global batch of 6 each
SHAPES = {"2×1": (2, 1, 3, 1), "3×2": (3, 2, 2, 1), "1×2 accum 2": (1, 2, 3, 2), "2×3 accum 3": (2, 3, 1, 3)}


def shape_streams(shards, ranks: int, workers: int, batch: int, accumulation: int) -> list[ShardStream]:
    return [ShardStream(shards, identity, batch_size=batch, workers=workers, rank=rank, world_size=ranks,
                        accumulation=accumulation, block_size=8) for rank in range(ranks)]


@pytest.mark.parametrize(("before", "after", "steps_done"), [("2×1", "3×2", 4), ("3×2", "1×2 accum 2", 9),
                                                            ("1×2 accum 2", "2×3 accum 3", 1)])
def test_a_mixture_resumed_on_another_shape_trains_on_the_rest_of_the_epoch_exactly_once(sources, before, after,
                                                                                        steps_done):
    shards, epoch = training_shards(three(sources)), 1  # 77 samples: 13 steps of 6, one slot of padding
    straight = []
    for dataset in shape_streams(shards, *SHAPES["2×1"]):
        dataset.set_epoch(epoch)
        straight += sum(rank_batches(dataset), [])
    first, accumulation = shape_streams(shards, *SHAPES[before]), SHAPES[before][3]
    ledger = []
    for dataset in first:
        dataset.set_epoch(epoch)
        ledger += sum(rank_batches(dataset)[:steps_done * accumulation], [])
    position = first[0].resume_position(epoch, steps_done * accumulation)
    assert first[0].source_samples(epoch, steps_done * accumulation) == dict(
        zip("abc", [collections.Counter(map(source_of, ledger))[name] for name in "abc"], strict=True))
    rest = []
    for dataset in shape_streams(shards, *SHAPES[after]):
        dataset.set_epoch(epoch, steps_done * SHAPES[after][3], consumed=position["consumed"])
        batches = rank_batches(dataset)
        assert len(batches) == (13 - steps_done) * SHAPES[after][3]
        rest += sum(batches, [])
    assert collections.Counter(ledger + rest) == collections.Counter(straight)
    padding = source_of(epoch_order_numbers(shards, epoch)[0])  # the one slot past the epoch: its first sample
    assert collections.Counter(map(source_of, straight)) == collections.Counter({"a": 46, "b": 19, "c": 12}) + \
        collections.Counter({padding: 1})


def test_every_batch_mixes_the_sources_in_their_shares(sources):
    shards = training_shards([str(sources["a"]), f"{sources['b']}::2x", f"{sources['c']}::50%"])  # 23, 80, 103
    assert [s.per_epoch for s in shards.mixture.sources] == [23, 80, 103]
    for dataset in shape_streams(shards, 2, 1, 8, 1):
        dataset.set_epoch(0)
        for batch in rank_batches(dataset):
            counts = collections.Counter(map(source_of, batch))
            for name, share in zip("abc", [23 / 206, 80 / 206, 103 / 206], strict=True):
                assert abs(counts[name] - 8 * share) <= 2.5, (batch, counts)


def test_the_stream_batches_a_mixture_through_the_loader_with_labels(sources):
    from simmim_cli.pipeline import make_loader

    shards = training_shards(three(sources), labels=True)
    assert shards.classes == ["x", "y", "z"]
    dataset = ShardStream(shards, identity, batch_size=7, workers=2, labels=True, num_classes=3, block_size=8)
    dataset.set_epoch(3)
    batches = list(make_loader(dataset))
    assert len(batches) == dataset.batches_per_epoch == 11  # ceil(77 / 7)
    assert all(batch["label"].tolist() == [n % 3 for n in numbers(batch)] for batch in batches)
    assert collections.Counter(source_of(n) for b in batches for n in numbers(b)) == {"a": 46, "b": 19, "c": 12}


# ---------------------------------------------------------------------------------------------- bad mixtures


def one_line(data, labels: bool = False, **kwargs) -> str:
    with pytest.raises(SimmimError) as raised:
        training_shards(data, labels=labels, **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_bad_shares_are_one_line_each(sources):
    a, b, c = (str(sources[name]) for name in "abc")
    assert "'0.3' is not a share; write a proportion of the epoch as 30%" in one_line([a, f"{b}::0.3"])
    assert "'lots' is not a share" in one_line([a, f"{b}::lots"])
    assert "add up to 1.1 (110%), more than a whole epoch" in one_line([f"{a}::60%", f"{b}::50%"])
    assert "take the whole epoch, leaving no room for a (one pass per epoch)" in one_line([a, f"{b}::100%"])
    assert "add up to 80%, not 100%, and no source fills the rest" in one_line([f"{a}::30%", f"{b}::50%"])
    for share in ("0x", "0%", "0", "-2x"):
        assert "gives it no samples; give a share above 0" in one_line([a, f"{b}::{share}"]), share
    assert "less than one sample per epoch" in one_line([a, f"{b}::0.01x"])
    assert "0.1% of an epoch of 10 samples is less than one sample" in one_line([f"{a}::10", f"{b}::0.1%"])
    assert "is given twice; give each source once" in one_line([a, f"{a}::2x"])
    assert "--epoch-size sets the length of an epoch whose --data sources all give proportions" in one_line(
        [a, f"{b}::30%"], epoch_size=100)


def test_bad_sources_are_one_line_each(sources, tmp_path):
    a, b = str(sources["a"]), str(sources["b"])
    assert f"--data source {tmp_path / 'nowhere'} does not exist" in one_line([a, f"{tmp_path / 'nowhere'}::30%"])
    unlabelled = numbered(tmp_path / "unlabelled", [4], 300)
    assert "has no class names in _info.json, so no labels, and " in one_line([a, str(unlabelled)], labels=True)
    training_shards([a, str(unlabelled)])  # pretraining needs no labels
    other = numbered(tmp_path / "other-classes", [4], 400, classes=["x", "y"])
    assert "--data sources disagree on classes" in one_line([a, str(other)], labels=True)
    listing = tmp_path / "piped.txt"
    listing.write_text(f"pipe:cat {sources['b']}/train-000000.tar\n")
    assert "the number of samples in its shards is unknown" in one_line([a, str(listing)])
    (tmp_path / "bad.yaml").write_text("- {path: x/, passes: 2, samples: 3}\n")
    assert "at most one of proportion, passes, samples" in one_line(str(tmp_path / "bad.yaml"))
    (tmp_path / "negative.yaml").write_text(f"- {{path: {a}}}\n- {{path: {b}, passes: -1}}\n")
    assert "gives it no samples" in one_line(str(tmp_path / "negative.yaml"))
    with pytest.raises(SimmimError, match="--cache-features extracts the features of one --data source"):
        LinearProbeConfig(data=[a, f"{b}::2x"], model="vit_tiny_patch16_224", cache_features=True).validate()


def test_sources_of_other_image_kinds_are_one_line(sources, tmp_path, monkeypatch):
    """Where _info.json records its images' kind (channels, dtype: make-shards records them once it reads images
    other than photos), sources of other kinds are refused."""
    grey = numbered(tmp_path / "grey", [4], 300, images={"channels": 1, "dtype": "uint16"})
    rgb = numbered(tmp_path / "rgb", [4], 400, images={"channels": 3, "dtype": "uint8"})
    found = data_sources.resolve_shards

    def with_images(path, **kwargs):  # the record as ShardSet carries it where resolve_shards reads it
        shards = found(path, **kwargs)
        shards.images = json.loads((Path(path) / "_info.json").read_text()).get("images")
        return shards

    monkeypatch.setattr(data_sources, "resolve_shards", with_images)
    assert ("hold images of different kinds: " f"{grey} has 1 channel(s) of uint16, {rgb} has 3 channel(s) of uint8"
            in one_line([str(grey), str(rgb)]))
    training_shards([str(rgb), str(sources["a"])])  # a source without the record is not compared


def test_bad_mixtures_stop_the_command_in_one_line_before_any_work(sources, tmp_path):
    runner = CliRunner()
    a, b = str(sources["a"]), str(sources["b"])
    for data, expected in (([a, f"{b}::0.3"], "is not a share"), ([a, f"{b}::110%"], "more than a whole epoch"),
                           ([a, str(tmp_path / "missing")], "does not exist")):
        output = tmp_path / "run"
        result = runner.invoke(app, ["pretrain", *[w for d in data for w in ("--data", d)], "--output", str(output),
                                     "--device", "cpu"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith("error: ") and expected in lines[-1] and "Traceback" not in result.output
        assert not any(output.glob("*.pth"))


# ---------------------------------------------------------------------------------------------- --decode gpu


def test_whole_shards_follow_each_sources_draws_for_a_reader_of_whole_shards(sources):
    """What --decode gpu reads each epoch: every shard of A twice (2 passes), B's and C's shards holding their
    draws of the epoch (their share rounded to whole shards), the sources interleaved."""
    shards = training_shards(three(sources))
    for epoch in range(4):
        listed = shards.mixture.epoch_shards(shards.shard_lengths, 0, epoch)
        by_source = collections.Counter("a" if i < 3 else "b" if i < 7 else "c" for i in listed)
        assert collections.Counter(i for i in listed if i < 3) == {0: 2, 1: 2, 2: 2}
        lengths = [shards.shard_lengths[i] for i in listed]
        for name, first, count in (("b", 3, 19), ("c", 7, 12)):
            held = sum(n for i, n in zip(listed, lengths, strict=True) if first <= i < first + len(LENGTHS[name]))
            # (a draw may sit anywhere in its block of the layout: the shards of two passes where the epoch crosses)
            assert held >= count and by_source[name] <= 2 * len(LENGTHS[name]), (epoch, name)
        assert len({"a" if i < 3 else "b" if i < 7 else "c" for i in listed[:3]}) > 1  # interleaved, not in turn
    assert listed != shards.mixture.epoch_shards(shards.shard_lengths, 0, 2)


@pytest.mark.skipif(not dali.dali_installed(), reason=f"NVIDIA DALI is not installed ({dali.INSTALL})")
def test_gpu_decoding_keeps_a_mixtures_schedule_and_reads_every_source(sources):
    shards = training_shards(three(sources))
    for epoch in range(2):
        seen = []
        for rank in range(2):
            stream = dali.DaliStream(shards, dali.pretrain_augment(16), 4, "cpu", rank=rank, world_size=2, workers=1,
                                     shuffle_buffer=8)
            assert stream.batches_per_epoch == 10  # ceil(77 / 8), as with --decode cpu
            stream.set_epoch(epoch)
            batches = list(stream)
            assert len(batches) == 10
            seen += [n for batch in batches for n in numbers(batch)]
        assert set(map(source_of, seen)) == {"a", "b", "c"} and all(n % 100 < 40 for n in seen)


# ---------------------------------------------------------------------------------------------- simmim check


@pytest.mark.slow
def test_check_reports_each_sources_samples_shards_share_and_read_speed(sources, tmp_path):
    from test_check import run_check, tiny

    result, report = run_check("pretrain", *[w for d in three(sources) for w in ("--data", d)], "--workers", "0",
                               "--epochs", "2", "--steps", "2", *tiny(batch=7))
    assert result.returncode == 0, result.stderr[-3000:]
    data = report["data"]
    assert data["samples"] == 77 and data["shards"] == 10
    assert [(s["name"], s["samples"], s["shards"], s["per_epoch"]) for s in data["sources"]] == [
        ("a", 23, 3, 46), ("b", 40, 4, 19), ("c", 31, 3, 12)]
    assert [s["share"] for s in data["sources"]] == ["2 passes per epoch", "25% of each epoch", "12 samples per epoch"]
    assert all(s["img_per_s_per_loader"] > 0 and s["images_read"] > 0 for s in data["sources"])
    assert sum(s["epoch_share"] for s in data["sources"]) == pytest.approx(1)
    assert "source        b: 40 samples in 4 shard(s), 19 per epoch = 24.7% (25% of each epoch)" in result.stderr + \
        preflight_text(report)


def preflight_text(report: dict) -> str:
    from simmim_cli import preflight

    return preflight.render(report)


# ---------------------------------------------------------------------------------------------- whole runs


def run(data: list[str], output: Path, ledger: Path, nproc: int, workers: int, **values) -> None:
    name, kwargs, size = TINY_MODELS["vit"]
    config = PretrainConfig(data=mixture.normalize(data), output=str(output), model=name, model_kwargs=kwargs,
                            img_size=size, mask_patch_size=16, batch_size=3, global_batch=6, epochs=3,
                            warmup_epochs=1, workers=workers, nproc=nproc, master_port=free_port(), log_every=2,
                            precision="fp32", device="cpu", **values)
    config.auto = ["batch_size", "grad_accum"]
    config.validate()
    ledger.mkdir(parents=True)
    if distributed.needs_launch(config):
        distributed.launch(train_with_ledger, config, str(ledger))
    else:
        train_with_ledger(config, str(ledger))


@pytest.mark.slow
def test_a_mixed_run_stopped_and_resumed_on_other_process_counts_trains_each_epoch_exactly(sources, tmp_path,
                                                                                          monkeypatch):
    """Three sources (2 passes, 25%, 12 samples) over 3 epochs of 13 steps: a 2-process run stops 5 steps into
    epoch 1; resumed on 3 processes and on 1 (accumulating), each trains on exactly the samples of an uninterrupted
    1-process run, every source its count each epoch, and metrics.jsonl reports those counts."""
    monkeypatch.setattr(limits, "usable_cores", lambda: 4)  # 3 processes, as a machine with the cores for it has
    data = three(sources)
    run(data, tmp_path / "straight", tmp_path / "ledger-straight", nproc=0, workers=1)
    (straight,) = ledger_batches(tmp_path / "ledger-straight")  # 13 steps × 2 batches of 3 per epoch
    epochs = [[n for batch in straight[e * 26:(e + 1) * 26] for n in batch] for e in range(3)]
    for order, epoch in zip(epochs, range(3), strict=True):
        counts = collections.Counter(map(source_of, order))
        first = source_of(epoch_order_numbers(training_shards(data), epoch)[0])
        assert counts == collections.Counter({"a": 46, "b": 19, "c": 12}) + collections.Counter({first: 1})
    def epoch_ends(output: Path) -> list[dict]:  # metrics.jsonl's samples of each source at each epoch's end
        rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        return [row["source_samples"] for row in rows if "source_samples" in row and row["step"] % 13 == 0]

    assert epoch_ends(tmp_path / "straight") == [dict(collections.Counter(map(source_of, order))) for order in epochs]

    run(data, tmp_path / "stopped", tmp_path / "ledger-stopped", nproc=2, workers=0, max_steps=18)
    before = [n for rank in ledger_batches(tmp_path / "ledger-stopped") for batch in rank[13:18] for n in batch]
    saved = checkpoints.load_checkpoint(tmp_path / "stopped" / "checkpoint-00000018.pth")
    assert saved["data"]["epoch"] == 1 and epoch_order.size(saved["data"]["consumed"]) == 30
    for label, nproc, workers, accumulation in (("three", 3, 0, 1), ("one", 0, 2, 2)):
        output = tmp_path / f"resumed-{label}"
        shutil.copytree(tmp_path / "stopped", output)
        run(data, output, tmp_path / f"ledger-{label}", nproc=nproc, workers=workers,
            resume=str(output / "checkpoint-00000018.pth"))
        resumed = ledger_batches(tmp_path / f"ledger-{label}")
        assert len(resumed) == max(nproc, 1) and {len(rank) for rank in resumed} == {21 * accumulation}
        after = [n for rank in resumed for batch in rank for n in batch]
        assert collections.Counter(before + after) == collections.Counter(epochs[1] + epochs[2]), label
        assert checkpoints.latest_checkpoint(output).name == "checkpoint-00000039.pth"
        assert epoch_ends(output) == epoch_ends(tmp_path / "straight"), label
