"""WebDataset shards: writing them from image folders, finding them, and streaming training batches.

The training stream defines an epoch by sample count: every loader worker on every rank yields the
same number of full batches, so distributed ranks never wait on each other at an epoch's end. With at
least as many shards as workers in total, shards are split between workers; with fewer, every worker
reads all shards and keeps every n-th sample. Batches hold uint8 images; normalisation happens on the
training device.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import v2 as T

from .errors import SimmimError
from .masking import MaskGenerator

# torchvision's libjpeg-turbo decoder (deprecated in 0.29 in favour of TorchCodec, still the fastest way from
# JPEG bytes to a tensor here); without it every JPEG goes through PIL
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # pragma: no cover - a future torchvision
        decode_jpeg = None

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
SAMPLE_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm", "img")
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as their original bytes
INFO_FILE = "_info.json"

# ImageNet statistics, the normalisation of the paper (one place for the whole toolkit)
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device → float32 normalised with the ImageNet mean/std."""
    images = images.float().div_(255)
    return (images - MEAN.to(images.device)) / STD.to(images.device)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1]."""
    return (images.float() * STD.to(images.device) + MEAN.to(images.device)).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK, I;16, I, F, ...) → 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grey: scale the real range to 8 bits (convert('L') would clip to white)
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # composite on white rather than dropping alpha (whatever colour hides under transparency)
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
    """Bytes of any image format PIL reads → RGB. ``min_size`` lets a JPEG decode at a reduced scale
    (1/2, 1/4, 1/8) as long as both sides stay at least that large: much less work for small crops."""
    image = Image.open(io.BytesIO(data))
    if min_size and image.format == "JPEG":
        image.draft("RGB", (min_size, min_size))  # keeps the result >= min_size on both sides
    image.load()
    return to_rgb(image)


def decode_tensor(data: bytes, min_size: int | None = None) -> torch.Tensor:
    """Bytes → uint8 RGB tensor (3, H, W), the fast way for the common case.

    JPEGs decode with libjpeg-turbo straight into a tensor, or through PIL at a reduced scale when they are at
    least twice ``min_size``; everything else (PNG, 16-bit, alpha, CMYK) goes through :func:`decode_image`.
    """
    if data[:3] == b"\xff\xd8\xff":
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            small_enough = not min_size or min(header.size) < 2 * min_size
            plain = header.mode in ("RGB", "L")
        if small_enough and plain and decode_jpeg is not None:
            # anything torchvision cannot read goes to PIL below
            with contextlib.suppress(RuntimeError), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return T.functional.pil_to_tensor(decode_image(data, min_size))


# ---------------------------------------------------------------------------------------------- shards


@dataclass
class ShardSet:
    """Shard URLs with what is known of them (sample counts from ``_info.json``, class names)."""

    urls: list[str]
    num_samples: int
    classes: list[str] | None = None
    shard_lengths: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None


def _read_info(directory: Path) -> dict | None:
    path = directory / INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SimmimError(f"cannot read {path}: {error}; re-create the shards with simmim make-shards") from error


def _info_split(info: dict, split: str | None) -> dict:
    splits = info.get("splits", {})
    if split is None:
        split = "train" if "train" in splits or len(splits) != 1 else next(iter(splits))
    if split not in splits:
        raise SimmimError(f"{INFO_FILE} has no split '{split}' (it has {sorted(splits)})")
    return splits[split]


def count_tar_samples(path: str) -> int:
    """Number of distinct sample keys in a local tar (reads headers only)."""
    keys = set()
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isreg() and not member.name.startswith("__"):
                base = os.path.basename(member.name)
                keys.add(os.path.join(os.path.dirname(member.name), base.split(".", 1)[0]))
    return len(keys)


def resolve_shards(data: str, split: str | None = None, epoch_size: int | None = None) -> ShardSet:
    """Find shards from a directory, a brace pattern (``shards/train-{000000..000099}.tar``) or a list file.

    Sample counts come from ``_info.json`` next to the shards when present, else from reading tar headers
    (local files) or ``epoch_size``.
    """
    path = Path(data)
    info = None
    if path.is_dir():
        info = _read_info(path)
        if info is not None:
            entry = _info_split(info, split)
            urls = [str(path / name) for name in entry["filenames"]]
        else:
            urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise SimmimError(f"no .tar shards in {path}; make them with: simmim make-shards IMAGES {path}")
    elif path.is_file() and path.suffix != ".tar":
        lines = [line.strip() for line in path.read_text().splitlines()]
        urls = [line if "://" in line or line.startswith(("pipe:", "/")) else str(path.parent / line)
                for line in lines if line and not line.startswith("#")]
        if not urls:
            raise SimmimError(f"the list file {path} names no shards; put one shard path or URL per line")
    else:
        urls = list(braceexpand.braceexpand(data))
        local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not Path(u).is_file()]
        if missing:
            raise SimmimError(f"shard not found: {missing[0]}; --data takes a shard directory, a brace pattern "
                              "like shards/train-{000000..000009}.tar or a file listing shards")
        info_dir = {Path(u).parent for u in local}
        if len(info_dir) == 1:
            info = _read_info(info_dir.pop())

    classes = info.get("classes") if info else None
    lengths_by_name: dict[str, int] = {}
    if info is not None:
        for entry in info.get("splits", {}).values():
            lengths_by_name.update(zip(entry.get("filenames", []), entry.get("shard_lengths", []), strict=False))
    lengths = [lengths_by_name.get(os.path.basename(u)) for u in urls]
    if any(n is None for n in lengths):
        if epoch_size is None and all(Path(u).is_file() for u in urls):
            lengths = [count_tar_samples(u) for u in urls]
        elif epoch_size is None:
            raise SimmimError("the number of samples in remote shards is unknown; give it with --epoch-size N")
        else:
            lengths = []
    num_samples = epoch_size or sum(lengths)
    if num_samples <= 0:
        raise SimmimError(f"the shards in {data} hold no samples; re-create them with simmim make-shards")
    return ShardSet(urls=urls, num_samples=num_samples, classes=classes, shard_lengths=lengths)


def find_images(source: Path) -> tuple[list[tuple[Path, int | None]], list[str] | None]:
    """Image files of a folder: class sub-folders give labels, a flat folder gives none."""
    if not source.is_dir():
        raise SimmimError(f"{source} is not a folder of images")
    direct = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    nested = {d: sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
              for d in folders}
    nested = {d: files for d, files in nested.items() if files}
    if direct and nested:
        raise SimmimError(f"{source} holds both images and class folders; put every image in a class folder "
                          "(labelled shards) or all in one flat folder (unlabelled shards)")
    if nested:
        classes = [d.name for d in nested]
        return [(f, label) for label, d in enumerate(nested) for f in nested[d]], classes
    if not direct:
        raise SimmimError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
    return [(f, None) for f in direct], None


def _sample_key(path: Path, source: Path, used: set[str]) -> str:
    # webdataset splits file names at the first dot, so keys must not contain any
    key = str(path.relative_to(source).with_suffix("")).replace(".", "_").replace(os.sep, "/")
    unique, n = key, 1
    while unique in used:
        unique, n = f"{key}_{n}", n + 1
    used.add(unique)
    return unique


def image_record(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) to store for an image: JPEG/PNG/WebP bytes unchanged, others as lossless PNG.

    Raises OSError/ValueError (from PIL) when the file does not decode completely.
    """
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image_format = image.format
        if image_format == "JPEG":
            image.draft(image.mode, (64, 64))  # still parses the whole file, so truncation is caught
        image.load()
        if image_format in KEPT_FORMATS:
            return KEPT_FORMATS[image_format], data
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "png", buffer.getvalue()


def write_shards(
    source: Path,
    output: Path,
    maxcount: int = 10000,
    shuffle: bool = True,
    seed: int = 0,
    split: str = "train",
    force: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    on_skip: Callable[[Path, str], None] | None = None,
) -> dict:
    """Writes ``OUTPUT/{split}-000000.tar ...`` and ``OUTPUT/_info.json``; returns the info dict.

    Each shard is written to a temporary name and renamed when complete. Unreadable images are passed to
    ``on_skip`` and left out.
    """
    files, classes = find_images(source)
    output.mkdir(parents=True, exist_ok=True)
    existing = sorted(output.glob(f"{split}-*.tar"))
    if existing and not force:
        raise SimmimError(f"{output} already holds {split} shards ({existing[0].name}, ...); "
                          "pass --force to replace them or choose another output folder")
    for old in existing:
        old.unlink()
    if shuffle:
        random.Random(seed).shuffle(files)

    used_keys: set[str] = set()
    filenames, lengths, skipped = [], [], []
    writer, shard_path, count = None, None, 0

    def close_shard():
        nonlocal writer, count
        if writer is not None:
            writer.close()
            shard_path.with_suffix(".tar.tmp").rename(shard_path)
            filenames.append(shard_path.name)
            lengths.append(count)
            writer, count = None, 0

    for index, (path, label) in enumerate(files):
        try:
            extension, data = image_record(path)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
            skipped.append(str(path))
            if on_skip:
                on_skip(path, str(error) or type(error).__name__)
        else:
            if writer is None:
                shard_path = output / f"{split}-{len(filenames):06d}.tar"
                writer = wds.TarWriter(str(shard_path.with_suffix(".tar.tmp")))
            sample = {"__key__": _sample_key(path, source, used_keys), extension: data}
            if label is not None:
                sample["cls"] = label
            writer.write(sample)
            count += 1
            if count >= maxcount:
                close_shard()
        if on_progress:
            on_progress(index + 1, len(files))
    close_shard()
    if not filenames:
        raise SimmimError(f"none of the {len(files)} images in {source} could be read")

    info = _read_info(output) or {}
    info.setdefault("name", output.name)
    info.setdefault("splits", {})[split] = {
        "name": split, "num_samples": sum(lengths), "filenames": filenames, "shard_lengths": lengths,
    }
    if classes is not None:
        info["classes"] = classes
        info["num_classes"] = len(classes)
    info["skipped"] = skipped
    tmp = output / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(output / INFO_FILE)
    return info


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


PRETRAIN_SCALE = (0.67, 1.0)  # RandomResizedCrop area fraction, as in the paper
PRETRAIN_RATIO = (3 / 4, 4 / 3)


class PretrainTransform:
    """The paper's augmentation (RandomResizedCrop 0.67–1, ratio 3/4–4/3, horizontal flip) of a uint8 tensor
    from :func:`decode_tensor`, plus the sample's SimMIM mask. A class, so loader workers can be spawned."""

    def __init__(self, img_size: int, masks: MaskGenerator):
        self.img_size = img_size
        self.masks = masks

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        top, left, height, width = RandomResizedCrop.get_params(image, list(PRETRAIN_SCALE), list(PRETRAIN_RATIO))
        # antialiased bilinear on uint8: torch's vectorised kernel, several times faster than PIL's resize
        size = [self.img_size, self.img_size]
        image = T.functional.resized_crop(image, top, left, height, width, size, antialias=True)
        if torch.rand(1).item() < 0.5:
            image = image.flip(-1)
        return {"image": image, "mask": self.masks(1)[0]}


def pretrain_decode_size(img_size: int) -> int:
    """Smallest image side that keeps the smallest RandomResizedCrop at least ``img_size`` wide: JPEGs larger
    than this decode at a reduced scale, with no loss in the crops."""
    return math.ceil(img_size / math.sqrt(PRETRAIN_SCALE[0] * PRETRAIN_RATIO[0]))


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
    the middle of an epoch sees the same batches as one that never stopped.
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

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank receives per epoch (the same on every rank)."""
        return self.batches_per_consumer * max(self.workers, 1)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Next iteration yields ``epoch``'s batches, starting after the rank's first ``skip_batches``."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    def _samples(self, consumer: int, skipped: list[str]) -> Iterator[dict]:
        """This consumer's share of the shards, shuffled, pass after pass until the caller stops.

        Each pass is shuffled on its own, so a pass ends before the next begins (no repeats within an epoch
        that one pass covers).
        """
        split_by_shard = len(self.shards.urls) >= self.num_consumers

        def on_error(error: Exception) -> bool:
            if isinstance(error, (TypeError, AttributeError, NameError, AssertionError)):
                raise error  # a bug, not a bad file
            skipped.append(f"{type(error).__name__}: {error}")
            return True

        def share(urls: list[str], start: int) -> Iterator[dict]:
            index = start
            for sample in wds.tariterators.tarfile_samples(iter([{"url": u} for u in urls]), handler=on_error):
                if split_by_shard or index % self.num_consumers == consumer:
                    yield sample
                index += 1
            counts.append(index - start)

        counts: list[int] = []
        for pass_index in range(1_000_000):
            urls = list(self.shards.urls)
            random.Random(f"{self.seed}/{self.epoch}/{pass_index}").shuffle(urls)  # the same on every consumer
            mine = urls[consumer :: self.num_consumers] if split_by_shard else urls
            # the sample index runs on over passes, so consumers beyond the sample count still get samples
            start = sum(counts)
            rng = random.Random(f"{self.seed}/{self.epoch}/{pass_index}/{consumer}")
            yield from wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(
                share(mine, start))
            if counts[-1] == 0:
                raise SimmimError(f"no samples could be read from {len(mine)} shard(s) ({mine[0]}, ...); "
                                  "check that they are readable tar files made by simmim make-shards")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader deals batches round-robin, starting at worker 0, so rank batch i comes from worker
        # i % workers. After skipping k batches, loader worker w plays the part of worker (w + k) % workers,
        # which keeps the resumed order identical to the uninterrupted one.
        role = (worker + self.skip_batches) % workers
        consumer = self.rank * workers + role
        skip = (self.skip_batches - role + workers - 1) // workers
        remaining = self.batches_per_consumer - skip
        if remaining <= 0:
            return
        skipped: list[str] = []
        stream = self._samples(consumer, skipped)
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
                seed = int(np.random.SeedSequence([self.seed, self.epoch, consumer, slot]).generate_state(1)[0])
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


def make_loader(dataset: ShardStream, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the stream (batches are made in the workers)."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=dataset.workers,
        pin_memory=pin_memory,
        persistent_workers=False,  # workers are re-created each epoch and pick up set_epoch
        # its own generator, so starting an epoch's workers does not draw from the training process's RNG
        # (samples are seeded by position, not by worker seeds)
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=4 if dataset.workers > 0 else None,
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
    ):
        self.source = source
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

            def on_error(error: Exception) -> bool:
                skipped.append(f"{type(error).__name__}: {error}")
                return True

            mine = urls[consumer::consumers] if by_shard else urls
            samples = wds.tariterators.tarfile_samples(iter([{"url": u} for u in mine]), handler=on_error)
            for index, sample in enumerate(samples):
                if by_shard or index % consumers == consumer:
                    name = f"{sample.get('__url__')}:{sample.get('__key__')}"
                    try:
                        yield _image_bytes(sample), sample_label(sample, self.num_classes), name
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


def _posterize_any_bits(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, where 0 bits gives a black image as Pillow < 13 did; Pillow 13 refuses 0 bits, which
    RandAugment's ``inc1`` policies draw at the top magnitude."""
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return posterize(image, bits_to_keep, **kwargs)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if auto_augment.NAME_TO_OP.get(name) is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_any_bits


class ClassifierTrainTransform:
    """timm's ImageNet training augmentation (RandomResizedCrop, flip, RandAugment or colour jitter) up to a uint8
    tensor; normalisation and random erasing follow on the training device."""

    def __init__(self, img_size: int, auto_augment: str | None, color_jitter: float, min_crop_scale: float = 0.08,
                 hflip: float = 0.5, interpolation: str = "bicubic"):
        from timm.data import create_transform

        _patch_timm_posterize()
        primary, secondary, _ = create_transform(img_size, is_training=True, auto_augment=auto_augment,
                                                 color_jitter=color_jitter, interpolation=interpolation,
                                                 scale=(min_crop_scale, 1.0), hflip=hflip, re_prob=0.0,
                                                 separate=True)
        self.augment = T.Compose([primary, secondary])

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": T.functional.pil_to_tensor(self.augment(image))}


class CropTransform:
    """Evaluation (and linear-probe) views: resize to ``img_size / crop_pct`` and centre-crop, or with
    ``random=True`` a RandomResizedCrop and flip; to a uint8 tensor."""

    def __init__(self, img_size: int, crop_pct: float = 0.875, random: bool = False):
        bicubic = T.InterpolationMode.BICUBIC
        if random:
            self.view = T.Compose([T.RandomResizedCrop(img_size, interpolation=bicubic), T.RandomHorizontalFlip()])
        else:
            self.view = T.Compose([T.Resize(int(img_size / crop_pct), interpolation=bicubic), T.CenterCrop(img_size)])

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": T.functional.pil_to_tensor(self.view(image))}


def labelled_source(data: str) -> tuple[ShardSet | list[tuple[Path, int]], list[str] | None, int]:
    """``--data`` for evaluation: labelled shards, or a folder with one sub-folder per class.
    Returns (source, class names or None, sample count)."""
    path = Path(data)
    if path.is_dir() and not list(path.glob("*.tar")) and not (path / INFO_FILE).exists():
        files, classes = find_images(path)
        if classes is None:
            raise SimmimError(f"{path} has no class sub-folders; evaluation needs labels")
        return files, classes, len(files)
    shards = resolve_shards(data)
    return shards, shards.classes, shards.num_samples


def collect_images(inputs: list[str], limit: int | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the images named by ``inputs``: image files, folders of images (searched recursively),
    shard folders, .tar files or brace patterns of shards. Stops after ``limit`` images."""
    count = 0
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            entries: Iterator[tuple[str, bytes]] = iter([(str(path), path.read_bytes())])
        elif path.is_dir() and not list(path.glob("*.tar")):
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise SimmimError(f"no images in {path}")
            entries = ((str(p), p.read_bytes()) for p in files)
        elif path.is_dir() or path.suffix == ".tar" or "{" in item:
            shards = resolve_shards(item)
            samples = wds.tariterators.tarfile_samples(iter([{"url": u} for u in shards.urls]))
            entries = ((f"{s['__url__']}:{s['__key__']}", _image_bytes(s)) for s in samples)
        else:
            raise SimmimError(f"{item}: not an image file, a folder of images or shards")
        for entry in entries:
            yield entry
            count += 1
            if limit is not None and count >= limit:
                return


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

