import collections
import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from simmim_cli import data_sources, epoch_order
from simmim_cli.data_sources import data_shards
from simmim_cli.errors import SimmimError
from simmim_cli.masking import MaskGenerator
from simmim_cli.pipeline import ShardStream, make_loader, too_few_shards
from simmim_cli.shards import resolve_shards, write_shards
from simmim_cli.transforms import PretrainTransform, decode_image, decode_tensor, to_rgb


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


# ---------------------------------------------------------------------------------------------- make-shards


def test_labelled_folder_gives_labels_and_class_names(labelled_folder, tmp_path):
    info = write_shards(labelled_folder, tmp_path / "shards", maxcount=7)
    assert info["classes"] == ["class0", "class1", "class2"]
    split = info["splits"]["train"]
    assert split["num_samples"] == sum(split["shard_lengths"]) == len(list(labelled_folder.rglob("*.png")))
    assert all(n <= 7 for n in split["shard_lengths"]) and len(split["filenames"]) > 1
    on_disk = json.loads((tmp_path / "shards" / "_info.json").read_text())
    assert on_disk["splits"]["train"]["filenames"] == split["filenames"]
    labels_seen = set()
    for name in split["filenames"]:
        for key, sample in tar_samples(tmp_path / "shards" / name).items():
            label = int(sample["cls"])
            labels_seen.add(label)
            assert key.startswith(f"class{label}/")  # the class folder decides the label
    assert labels_seen == {0, 1, 2}


def test_original_bytes_are_kept_and_other_formats_stored_losslessly(tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(source / "a.jpg", quality=83)
    Image.fromarray(pixels).save(source / "b.png")
    Image.fromarray(pixels).save(source / "c.bmp")
    write_shards(source, tmp_path / "out", shuffle=False)
    samples = tar_samples(tmp_path / "out" / "train-000000.tar")
    assert samples["a"]["jpg"] == (source / "a.jpg").read_bytes()
    assert samples["b"]["png"] == (source / "b.png").read_bytes()
    assert "png" in samples["c"] and "cls" not in samples["c"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples["c"]["png"]))), pixels)


def test_unreadable_files_are_reported_and_skipped(photo_folder, tmp_path):
    source = tmp_path / "mixed"
    source.mkdir()
    for path in list(photo_folder.iterdir())[:4]:
        (source / path.name).write_bytes(path.read_bytes())
    good = (source / sorted(p.name for p in source.iterdir())[0]).read_bytes()
    (source / "truncated.jpg").write_bytes(good[: len(good) // 2] if good[:2] == b"\xff\xd8" else b"\xff\xd8junk")
    (source / "not_an_image.png").write_bytes(b"this is text")
    reported = []
    info = write_shards(source, tmp_path / "out", on_skip=lambda path, reason: reported.append(path.name))
    assert sorted(reported) == ["not_an_image.png", "truncated.jpg"]
    assert info["splits"]["train"]["num_samples"] == 4
    assert len(info["skipped"]) == 2


def test_shards_close_at_the_size_limit(photo_folder, tmp_path):
    limit = 40_000
    info = write_shards(photo_folder, tmp_path / "out", max_size_mb=limit / 1e6)
    names = info["splits"]["train"]["filenames"]
    assert len(names) > 2
    for name in names[:-1]:
        with tarfile.open(tmp_path / "out" / name) as tar:
            sizes = [m.size for m in tar if m.name.rsplit(".", 1)[-1] in ("jpg", "png")]
        assert sum(sizes) >= limit > sum(sizes[:-1])  # closed by the sample that crossed the limit


def test_existing_shards_need_force(photo_folder, tmp_path):
    write_shards(photo_folder, tmp_path / "out")
    with pytest.raises(SimmimError, match="--force"):
        write_shards(photo_folder, tmp_path / "out")
    write_shards(photo_folder, tmp_path / "out", force=True, maxcount=5)
    assert len(list((tmp_path / "out").glob("train-*.tar"))) > 1


def test_a_folder_mixing_images_and_class_folders_is_refused(labelled_folder, tmp_path):
    source = tmp_path / "mixed"
    (source / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(source / "cats" / "a.png")
    Image.new("RGB", (8, 8)).save(source / "loose.png")
    with pytest.raises(SimmimError, match="both images and class folders"):
        write_shards(source, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16", "1"])
def test_every_mode_decodes_to_rgb(mode):
    base = Image.fromarray(np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8))
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(
        (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    rgb = decode_image(buffer.getvalue())
    assert rgb.mode == "RGB" and rgb.size == (64, 64)
    array = np.asarray(rgb)
    assert array.max() > 200 and array.min() < 60  # the range survives, not clipped to white or black


def test_sixteen_bit_grey_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert np.asarray(to_rgb(image))[0, 0].tolist() == [128, 128, 128]


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(image))[0, 0].tolist() == [255, 255, 255]


def test_reduced_jpeg_decoding_keeps_at_least_the_size_asked_for():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 600, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    small = decode_image(buffer.getvalue(), min_size=96)
    assert min(small.size) >= 96 and small.size[0] < 600


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_the_fast_tensor_decoder_agrees_with_pil(mode):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    tensor = decode_tensor(buffer.getvalue())
    reference = np.asarray(decode_image(buffer.getvalue())).transpose(2, 0, 1).astype(int)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 40, 60)
    assert np.abs(tensor.numpy().astype(int) - reference).mean() < 2.0  # libjpeg-turbo vs PIL's IDCT rounding


def test_the_tensor_decoder_reduces_large_jpegs_and_reads_pngs():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 1000, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG")
    reduced = decode_tensor(buffer.getvalue(), min_size=300)
    assert reduced.shape == (3, 400, 500)  # half scale still keeps both sides >= 300
    buffer = io.BytesIO()
    Image.new("RGBA", (5, 7), (0, 0, 0, 0)).save(buffer, format="PNG")
    assert decode_tensor(buffer.getvalue()).shape == (3, 7, 5)
    with pytest.raises((OSError, ValueError)):
        decode_tensor(b"\xff\xd8\xff\xe0 not a jpeg")


# ---------------------------------------------------------------------------------------------- finding shards


def test_shards_from_a_folder_a_brace_pattern_and_a_list_file(photo_folder, tmp_path):
    info = write_shards(photo_folder, tmp_path / "shards", maxcount=6)
    total = info["splits"]["train"]["num_samples"]
    count = len(info["splits"]["train"]["filenames"])
    from_folder = resolve_shards(str(tmp_path / "shards"))
    assert from_folder.num_samples == total and len(from_folder.urls) == count
    pattern = str(tmp_path / "shards" / f"train-{{000000..{count - 1:06d}}}.tar")
    assert resolve_shards(pattern).num_samples == total
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(f"shards/{name}" for name in info["splits"]["train"]["filenames"][:2]) + "\n")
    two = resolve_shards(str(listing))
    assert two.num_samples == sum(info["splits"]["train"]["shard_lengths"][:2])
    (tmp_path / "shards" / "_info.json").unlink()
    assert resolve_shards(str(tmp_path / "shards")).num_samples == total  # counted from the tar headers


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.rglob("*"):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(source)).write_bytes(path.read_bytes())
    return target


def test_an_image_folder_becomes_shards_once_and_again_when_it_changes(photo_folder, tmp_path, capsys):
    images = copy_folder(photo_folder, tmp_path / "photos")
    count = len(list(images.iterdir()))
    cache = data_shards(str(images))
    assert cache == str(tmp_path / "photos.simmim-shards")
    assert "make-shards" in capsys.readouterr().err  # the advice for large sets
    made = resolve_shards(cache)
    assert made.num_samples == count and made.classes is None
    tars = {p: p.stat().st_mtime_ns for p in Path(cache).glob("*.tar")}
    assert data_shards(str(images)) == cache and "using its shards" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in Path(cache).glob("*.tar")} == tars  # reused, not rewritten
    (images / "extra.png").write_bytes((images / "digit00.png").read_bytes())
    assert data_shards(str(images)) == cache
    assert resolve_shards(cache).num_samples == count + 1  # a new image invalidates the cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "photos.simmim-shards"]  # no leftovers
    assert data_shards(cache) == cache  # shards pass through


def test_a_class_folder_gives_labelled_shards_and_a_flat_one_is_refused_where_labels_are_needed(
        labelled_folder, photo_folder, tmp_path):
    labelled = copy_folder(labelled_folder, tmp_path / "digits")
    made = resolve_shards(data_shards(str(labelled), labels=True))
    assert made.classes == ["class0", "class1", "class2"]
    (labelled / "class0" / sorted((labelled / "class0").iterdir())[0].name).rename(labelled / "class1" / "moved.png")
    assert resolve_shards(data_shards(str(labelled), labels=True)).num_samples == made.num_samples  # moved: rebuilt
    samples = [s for tar in sorted((tmp_path / "digits.simmim-shards").glob("*.tar")) for s in tar_samples(tar)]
    assert any(key.startswith("class1/moved") for key in samples)
    flat = copy_folder(photo_folder, tmp_path / "flat")
    with pytest.raises(SimmimError, match="no class sub-folders"):
        data_shards(str(flat), labels=True)


def test_an_unwritable_cache_is_a_clear_error(photo_folder, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data_sources, "write_shards", refuse)
    with pytest.raises(SimmimError, match="permission denied.*simmim make-shards") as raised:
        data_shards(str(photo_folder))
    assert raised.value.exit_code == 74  # a storage fault (docs/storage-faults.md)


def test_tar_files_missing_from_info_are_named_with_how_to_include_them(photo_folder, tmp_path, capsys):
    write_shards(photo_folder, tmp_path / "shards", maxcount=10)
    data_shards(str(tmp_path / "shards"))
    assert "warning" not in capsys.readouterr().err
    (tmp_path / "shards" / "extra-000000.tar").write_bytes((tmp_path / "shards" / "train-000000.tar").read_bytes())
    assert data_shards(str(tmp_path / "shards")) == str(tmp_path / "shards")
    err = capsys.readouterr().err
    assert "extra-000000.tar" in err and "ignored" in err and "make-shards" in err and "train-000000" not in err


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SimmimError, match="no .tar shards"):
        resolve_shards(str(tmp_path))
    with pytest.raises(SimmimError, match="shard not found"):
        resolve_shards(str(tmp_path / "train-{000000..000003}.tar"))


# ---------------------------------------------------------------------------------------------- streaming


def numbered_shards(folder: Path, lengths: list[int]) -> Path:
    """Shards of solid images whose pixel values encode a sample number (to check coverage)."""
    folder.mkdir(parents=True, exist_ok=True)
    number = 0
    filenames = []
    for shard, length in enumerate(lengths):
        name = f"train-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for _ in range(length):
                pixels = np.zeros((8, 8, 3), dtype=np.uint8)
                pixels[..., 0], pixels[..., 1] = number % 256, number // 256
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                writer.write({"__key__": f"s{number:05d}", "png": buffer.getvalue(), "cls": number % 3})
                number += 1
        filenames.append(name)
    info = {"splits": {"train": {"name": "train", "num_samples": number, "filenames": filenames,
                                 "shard_lengths": lengths}}}
    (folder / "_info.json").write_text(json.dumps(info))
    return folder


def identity(image: Image.Image) -> dict[str, torch.Tensor]:
    return {"image": torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)}


def numbers(batch) -> list[int]:
    return (batch["image"][:, 0, 0, 0].long() + 256 * batch["image"][:, 1, 0, 0].long()).tolist()


def stream(folder, **kwargs) -> ShardStream:
    defaults = {"batch_size": 4, "seed": 0, "shuffle_buffer": 8, "block_size": 16}
    return ShardStream(resolve_shards(str(folder)), identity, **{**defaults, **kwargs})


def epoch_numbers(dataset: ShardStream, epoch: int = 0, skip: int = 0) -> list[list[int]]:
    dataset.set_epoch(epoch, skip)
    return [numbers(batch) for batch in make_loader(dataset)]


def test_every_rank_gets_the_same_number_of_batches_with_uneven_shards(tmp_path):
    folder = numbered_shards(tmp_path / "uneven", [10, 3, 7, 1, 9])
    counts = []
    for rank in range(3):
        dataset = stream(folder, rank=rank, world_size=3, workers=0)
        batches = epoch_numbers(dataset)
        counts.append(len(batches))
        assert len(batches) == dataset.batches_per_epoch == 3  # ceil(30 / (3 ranks × 4)) batches each
        assert all(len(b) == 4 for b in batches)
    assert len(set(counts)) == 1


def test_fewer_shards_than_consumers_splits_samples_without_repeats(tmp_path):
    folder = numbered_shards(tmp_path / "one", [32])
    seen = []
    for rank in range(2):
        dataset = stream(folder, rank=rank, world_size=2, workers=2)
        batches = epoch_numbers(dataset)
        assert len(batches) == dataset.batches_per_epoch == 4  # 2 per worker, 2 workers
        seen += [n for batch in batches for n in batch]
    assert sorted(seen) == list(range(32))  # 4 consumers × 8 samples from one shard: each sample once


def test_shard_split_sees_every_sample_once_when_counts_divide(tmp_path):
    folder = numbered_shards(tmp_path / "even", [8, 8, 8, 8])
    seen = []
    for rank in range(2):
        seen += [n for b in epoch_numbers(stream(folder, rank=rank, world_size=2, workers=2)) for n in b]
    assert sorted(seen) == list(range(32))


@pytest.mark.parametrize(("world_size", "workers", "lengths"), [
    (16, 4, "random100"),  # 100 shards of uneven lengths over 64 consumers (e.g. 2 nodes × 8 GPUs × 4 workers)
    (3, 2, [10, 3, 7, 1, 9]),  # fewer shards than consumers, uneven
    (2, 3, [5] * 7),  # shard count not a multiple of the consumer count
    (4, 1, [23]),  # one shard for everyone
])
def test_every_sample_goes_to_exactly_one_consumer_per_epoch(tmp_path, world_size, workers, lengths):
    if lengths == "random100":
        lengths = [int(n) for n in np.random.default_rng(0).integers(1, 12, size=100)]
    folder = numbered_shards(tmp_path / "shards", lengths)
    total, consumers, batch_size = sum(lengths), world_size * workers, 4
    seen = []
    for consumer in range(consumers):
        rank, role = divmod(consumer, workers)
        dataset = stream(folder, rank=rank, world_size=world_size, workers=workers, batch_size=batch_size)
        dealing = dataset._dealing(0)
        share = dealing.share(rank, role)
        assert epoch_order.size(share) == dealing.quota(role) * batch_size  # exactly what its batches need
        samples = dataset._ordered_samples(0, share, [])
        seen += [int(sample["__key__"][1:]) for _, sample in itertools.islice(samples, epoch_order.size(share))]
    global_batch = world_size * batch_size
    assert len(seen) == dataset.batches_per_epoch * global_batch and len(seen) - total < global_batch
    counts = collections.Counter(seen)
    assert set(counts) == set(range(total))
    assert sum(count - 1 for count in counts.values()) == len(seen) - total  # repeats: the padding only


def test_a_whole_epoch_through_the_loader_covers_every_sample(tmp_path):
    folder = numbered_shards(tmp_path / "shards", [9, 2, 14, 5, 1, 6])  # 37 samples, 6 shards, 4 consumers
    seen = []
    for rank in range(2):
        seen += [n for b in epoch_numbers(stream(folder, rank=rank, world_size=2, workers=2)) for n in b]
    assert set(seen) == set(range(37))
    assert len(seen) - 37 < 4 * 4  # padding: less than one batch per consumer


def test_order_depends_on_seed_and_epoch_only(tmp_path):
    folder = numbered_shards(tmp_path / "order", [12, 12])
    first = epoch_numbers(stream(folder, workers=2))
    assert epoch_numbers(stream(folder, workers=2)) == first
    assert epoch_numbers(stream(folder, workers=2), epoch=1) != first
    assert epoch_numbers(stream(folder, workers=2, seed=5)) != first


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_one_iteration_over_several_epochs_equals_the_epochs_one_by_one(tmp_path, workers):
    """The engine reads the whole run through one loader (its workers live for the run): the batches must be
    each epoch's own, in order, also when the first epoch resumes in the middle."""
    folder = numbered_shards(tmp_path / "span", [9, 2, 14, 5, 1, 6])
    dataset = stream(folder, workers=workers)
    one_by_one = [epoch_numbers(dataset, epoch=e) for e in (2, 3, 4)]
    per_epoch = dataset.batches_per_epoch
    assert all(len(batches) == per_epoch for batches in one_by_one)
    for skip in (0, 1, 2, per_epoch - 1):
        dataset.set_epoch(2, skip, epochs=3)
        spanning = [numbers(batch) for batch in make_loader(dataset)]
        assert spanning == one_by_one[0][skip:] + one_by_one[1] + one_by_one[2]


def test_skipping_batches_resumes_exactly_where_the_epoch_was(tmp_path):
    folder = numbered_shards(tmp_path / "resume", [12, 12, 12])
    full = epoch_numbers(stream(folder, workers=2), epoch=1)
    for skip in (1, 2, 3, 5):
        assert epoch_numbers(stream(folder, workers=2), epoch=1, skip=skip) == full[skip:]


def test_augmentation_and_masks_follow_the_sample_not_the_worker(photo_folder, tmp_path):
    write_shards(photo_folder, tmp_path / "shards", maxcount=8)
    masks = MaskGenerator(32, 16, 8, 0.6)
    transform = PretrainTransform(32, masks)

    def run(workers):
        dataset = ShardStream(resolve_shards(str(tmp_path / "shards")), transform, batch_size=4, workers=workers,
                              seed=3, decode=decode_tensor)
        dataset.set_epoch(0)
        return [b for b in make_loader(dataset)]

    batches = run(2)
    assert batches[0]["image"].dtype == torch.uint8 and batches[0]["image"].shape == (4, 3, 32, 32)
    assert batches[0]["mask"].shape == (4, 4, 4) and (batches[0]["mask"].sum(dim=(1, 2)) == 4 * 3).all()
    again = run(2)
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
               for a, b in zip(batches, again, strict=True))


def test_bad_samples_are_skipped_counted_and_batches_stay_full(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    with wds.TarWriter(str(folder / "train-000000.tar")) as writer:
        for index in range(10):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (index, 0, 0)).save(buffer, format="PNG")
            data = buffer.getvalue() if index not in (2, 7) else b"\x89PNG broken"
            writer.write({"__key__": f"k{index}", "png": data})
    dataset = ShardStream(resolve_shards(str(folder)), identity, batch_size=4, shuffle_buffer=1)
    dataset.set_epoch(0)
    batches = list(make_loader(dataset))
    assert len(batches) == dataset.batches_per_epoch == 3
    assert all(b["image"].shape[0] == 4 for b in batches)
    skipped = [s for b in batches for s in b["skipped"]]
    assert len(skipped) >= 2 and all("k2" in s or "k7" in s for s in skipped)


def test_labels_come_with_the_images(tmp_path):
    folder = numbered_shards(tmp_path / "labels", [9])
    dataset = stream(folder, labels=True, batch_size=3)
    dataset.set_epoch(0)
    for batch in make_loader(dataset):
        assert batch["label"].tolist() == [n % 3 for n in numbers(batch)]


def test_too_few_shards_says_what_goes_wrong_and_offers_a_count():
    assert too_few_shards(8, 2, 4, 640) is None and too_few_shards(1, 1, 0, 640) is None
    warning = too_few_shards(1, 2, 2, 640)
    assert warning.startswith("1 shard(s) for 4 loader processes (2 process(es) × 2 worker(s)): each loader process "
                              "reads a shard from its start")
    assert "read up to 4 times over" in warning and warning.endswith("simmim make-shards IMAGES SHARDS --maxcount 160")
