"""``--decode gpu``: the training and evaluation streams decoded and augmented by NVIDIA DALI.

DALI reads the shards itself (``fn.readers.webdataset`` with one index file per shard, see
:func:`shards.write_dali_index`), decodes JPEGs on the GPU (device "mixed": the hardware JPEG engines of
A100/H100 plus CUDA) while cropping (region-of-interest decoding), and resizes, augments and flips on the GPU.
Its batches match :class:`pipeline.ShardStream`'s: ``{"image": uint8 (B,3,H,W), "mask" | "label", "skipped"}``,
here already on the training GPU. Without a GPU (``device`` cpu) the same graph runs with DALI's CPU operators:
that is what the tests run.

What differs from the CPU stream:

- Order: each epoch the shard list is shuffled (the same on every rank), DALI deals the samples to ranks
  (``shard_id``/``num_shards``) and shuffles within a buffer. Every rank yields the same number of batches.
  A resumed run starts at the right batch of the epoch with a different order for the rest of it.
- Several sources (a mixture): each epoch DALI reads the whole shards that hold each source's draws of the
  epoch (``epoch_order.Mixture.epoch_shards``: a source's share rounded to whole shards, its passes and the part
  of its pass as the CPU stream takes them), the sources' shards interleaved by share; batches mix the sources
  as far as the shuffle buffer reaches. The steps per epoch are the mixture's, as with ``--decode cpu``.
- Bad samples: DALI stops the whole pipeline at an image it cannot decode. So the index built for
  ``--decode gpu`` leaves out samples that do not decode on the CPU (counted as skipped every epoch, by
  rank 0), and if DALI still fails on a batch the batch is dropped (its samples counted as skipped) and
  the pipeline restarts with a new order.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
import re
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import remote
from .errors import SimmimError
from .masking import MaskGenerator
from .shards import ShardSet, dali_index_path, read_dali_index_count, write_dali_index
from .transforms import PRETRAIN_RATIO, PRETRAIN_SCALE, decode_image

INSTALL = 'pip install "simmim-cli[dali]"'
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "pbm")
MAX_FAILED_BATCHES = 20  # DALI failures in one epoch before giving up (the shards are broken, not a sample)


class DaliUnavailable(SimmimError):
    """``--decode gpu`` cannot run here: DALI is not installed or there is no GPU."""


def dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return False


def require_dali(device: str = "auto") -> None:
    """Raises a one-line :class:`DaliUnavailable` unless DALI is installed and a CUDA GPU is visible."""
    if not dali_installed():
        raise DaliUnavailable(f"--decode gpu needs NVIDIA DALI, which is not installed; run: {INSTALL} "
                              "(or use --decode cpu)")
    if device == "cpu" or not torch.cuda.is_available():
        raise DaliUnavailable("--decode gpu decodes on an NVIDIA GPU and " + (
            "--device is cpu" if device == "cpu" else "no CUDA GPU is visible here") + "; use --decode cpu")


# ---------------------------------------------------------------------------------------------- index files


def _check_image(extension: str, data: bytes) -> None:
    if extension.lower() in IMAGE_EXTENSIONS:
        decode_image(data, min_size=16)  # JPEGs at 1/8 scale: the whole file is parsed, little is computed


def ensure_indexes(shards: ShardSet, threads: int | None = None) -> int:
    """DALI index files next to the shards, built (and cached) where missing or older than their shard;
    returns the number of samples the indexes leave out as undecodable."""
    if remote.shard_cache() is not None:  # DALI reads files: remote shards are read from their cached copies
        shards.urls = [remote.local_copy(u) if remote.is_url(u) else u for u in shards.urls]
    urls = shards.urls
    not_local = [u for u in urls if "://" in u or u.startswith("pipe:") or not Path(u).is_file()]
    if not_local:
        raise SimmimError(f"--decode gpu reads local shard files; {not_local[0]} is not one (give --shard-cache DIR "
                          "to keep remote shards in a local folder, use --decode cpu, or copy the shards to local "
                          "storage)")
    missing = [u for u in urls if read_dali_index_count(u) is None]
    if missing:
        print(f"note: writing DALI index files next to {len(missing)} shard(s) (once; checking that every image "
              "decodes, so DALI never meets one that does not)", file=sys.stderr, flush=True)
        try:
            with ThreadPoolExecutor(threads or min(16, len(missing))) as pool:  # PIL decodes without the GIL
                for left_out in pool.map(lambda url: write_dali_index(url, _check_image), missing):
                    for entry in left_out:
                        print(f"warning: left out of the DALI index, undecodable: {entry}", file=sys.stderr)
        except OSError as error:
            raise SimmimError(f"cannot write DALI index files next to the shards ({error}); make the folder "
                              "writable or re-create the shards with simmim make-shards") from error
    counts = [read_dali_index_count(u) or 0 for u in urls]
    if not shards.shard_lengths:
        return 0
    return sum(max(0, length - count) for length, count in zip(shards.shard_lengths, counts, strict=True))


# ---------------------------------------------------------------------------------------------- augmentation


@dataclass
class DaliAugment:
    """What the DALI graph does to each image: a random-resized crop (or, with ``crop_pct``, the evaluation
    view: shorter side to ``img_size / crop_pct``, centre crop), RandAugment or colour jitter, a flip."""

    img_size: int
    scale: tuple[float, float] = PRETRAIN_SCALE
    ratio: tuple[float, float] = PRETRAIN_RATIO
    hflip: float = 0.5
    bicubic: bool = False
    rand_augment: tuple[int, int] | None = None  # (operations per image, magnitude 0-10 as timm counts it)
    color_jitter: float = 0.0
    crop_pct: float | None = None


def pretrain_augment(img_size: int) -> DaliAugment:
    """The paper's crop (area 0.67–1, ratio 3/4–4/3, bilinear) and a flip, as :class:`PretrainTransform`."""
    return DaliAugment(img_size)


def classifier_augment(img_size: int, auto_augment: str | None = None, color_jitter: float = 0.0,
                       min_crop_scale: float = 0.08, hflip: float = 0.5) -> DaliAugment:
    """timm's training crop (bicubic), flip and RandAugment ``rand-m9-n2...`` (or colour jitter without it)."""
    rand = None
    if auto_augment:
        match = re.fullmatch(r"rand((?:-[a-z]+[0-9.]+)*)", auto_augment)
        if match is None:
            raise SimmimError(f"--decode gpu supports RandAugment policies ('rand-m9-mstd0.5-inc1'), not "
                              f"'{auto_augment}'; use --decode cpu or --auto-augment none")
        settings = dict(re.findall(r"-([a-z]+)([0-9.]+)", match.group(1)))
        rand = (int(settings.get("n", 2)), round(float(settings.get("m", 9))))
    return DaliAugment(img_size, (min_crop_scale, 1.0), (3 / 4, 4 / 3), hflip, bicubic=True, rand_augment=rand,
                       color_jitter=0.0 if rand else color_jitter)


def eval_view(img_size: int, crop_pct: float) -> DaliAugment:
    return DaliAugment(img_size, hflip=0.0, bicubic=True, crop_pct=crop_pct)


def _graph(images, augment: DaliAugment, decoder: str):
    """Encoded images → uint8 (3, S, S) tensors, in DALI operators."""
    from nvidia.dali import fn, types

    size = augment.img_size
    interp = types.INTERP_CUBIC if augment.bicubic else types.INTERP_LINEAR
    if augment.crop_pct is not None:
        images = fn.decoders.image(images, device=decoder, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=int(size / augment.crop_pct), interp_type=interp, antialias=True)
        return fn.crop_mirror_normalize(images, crop=(size, size), dtype=types.UINT8, output_layout="CHW")
    # region-of-interest decoding: only the crop's part of a JPEG is decoded
    images = fn.decoders.image_random_crop(images, device=decoder, output_type=types.RGB,
                                           random_area=list(augment.scale), random_aspect_ratio=list(augment.ratio))
    images = fn.resize(images, size=[size, size], interp_type=interp, antialias=True)
    if augment.rand_augment is not None:
        from nvidia.dali.auto_aug import rand_augment

        layers, magnitude = augment.rand_augment
        # timm counts magnitudes 0-10, DALI in bins 0..num_magnitude_bins-1 (31 bins: 0-30); "inc" = monotonic
        images = rand_augment.rand_augment(images, n=layers, m=round(magnitude * 3), num_magnitude_bins=31,
                                           shape=[size, size], monotonic_mag=True)
    elif augment.color_jitter:
        low, high = max(0.0, 1 - augment.color_jitter), 1 + augment.color_jitter
        images = fn.color_twist(images, brightness=fn.random.uniform(range=[low, high]),
                                contrast=fn.random.uniform(range=[low, high]),
                                saturation=fn.random.uniform(range=[low, high]))
    flip = fn.random.coin_flip(probability=augment.hflip) if augment.hflip else 0
    return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=flip)


# ---------------------------------------------------------------------------------------------- streams


@contextlib.contextmanager
def _without_deprecation_warnings():
    """DALI's RandAugment calls operators DALI has since renamed, and DALI shows those warnings whatever the
    filters say (at every pipeline build, i.e. every epoch); they are not the user's business."""
    show = warnings.showwarning

    def show_others(message, category, *args, **kwargs):
        if not issubclass(category, DeprecationWarning):
            show(message, category, *args, **kwargs)

    warnings.showwarning = show_others
    try:
        yield
    finally:
        warnings.showwarning = show


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0]) % 2**31


def _reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong (it follows "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    after = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("encountered")]
    return (after or lines or [type(error).__name__])[0]


def _parse_label(data: np.ndarray, num_classes: int | None) -> int:
    text = bytes(data).decode(errors="replace").strip()
    if not text.lstrip("-").isdigit():
        raise SimmimError(f"a sample's .cls is '{text[:20]}', not a class number; make labelled shards with "
                          "simmim make-shards from class folders")
    label = int(text)
    if num_classes is not None and not 0 <= label < num_classes:
        raise SimmimError(f"a sample has label {label}, outside 0..{num_classes - 1} ({num_classes} classes in "
                          "_info.json); re-create the shards")
    return label


class _DaliSource:
    """What the streams share: building a DALI pipeline over shards (or image files) and turning its outputs
    into torch tensors on the stream's device."""

    def __init__(self, source: ShardSet | list[tuple[Path, int]], augment: DaliAugment, batch_size: int,
                 device: torch.device | str, labels: bool, workers: int, num_classes: int | None):
        if not dali_installed():
            raise DaliUnavailable(f"--decode gpu needs NVIDIA DALI, which is not installed; run: {INSTALL}")
        self.source = source
        self.augment = augment
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.labels = labels
        self.threads = max(1, workers)
        self.num_classes = num_classes
        self.left_out = ensure_indexes(source) if isinstance(source, ShardSet) else 0

    def build(self, seed: int, urls: list[str] | None = None, shard_id: int = 0, num_shards: int = 1,
              shuffle_buffer: int = 0):
        from nvidia.dali import fn, pipeline_def

        gpu = self.device.type == "cuda"
        shuffle = shuffle_buffer > 0

        @pipeline_def(enable_conditionals=self.augment.rand_augment is not None)
        def pipeline():
            if isinstance(self.source, ShardSet):
                outputs = fn.readers.webdataset(
                    paths=urls, index_paths=[str(dali_index_path(u)) for u in urls],
                    ext=[";".join(IMAGE_EXTENSIONS)] + (["cls"] if self.labels else []),
                    missing_component_behavior="skip", random_shuffle=shuffle,
                    initial_fill=max(shuffle_buffer, 1), shard_id=shard_id, num_shards=num_shards,
                    pad_last_batch=not shuffle, name="reader")
            else:
                outputs = fn.readers.file(files=[str(p) for p, _ in self.source],
                                          labels=[label for _, label in self.source], random_shuffle=shuffle,
                                          initial_fill=max(shuffle_buffer, 1), shard_id=shard_id,
                                          num_shards=num_shards, pad_last_batch=not shuffle, name="reader")
            images = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
            images = _graph(images, self.augment, "mixed" if gpu else "cpu")
            return (images, outputs[1]) if self.labels else images

        with _without_deprecation_warnings():
            pipe = pipeline(batch_size=self.batch_size, num_threads=self.threads,
                            device_id=(self.device.index or 0) if gpu else None, seed=seed, prefetch_queue_depth=2)
            pipe.build()
        return pipe

    def batch(self, outputs) -> dict[str, torch.Tensor]:
        tensor = outputs[0].as_tensor()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            image = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(tensor, image, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            image = torch.from_numpy(np.array(tensor))
        batch = {"image": image}
        if self.labels:
            if isinstance(self.source, ShardSet):
                labels = [_parse_label(np.array(t), self.num_classes) for t in outputs[1]]
            else:
                labels = [int(np.array(t).reshape(-1)[0]) for t in outputs[1]]
            batch["label"] = torch.tensor(labels, dtype=torch.long)
        return batch


class DaliStream(_DaliSource):
    """Training batches from DALI with :class:`pipeline.ShardStream`'s interface (``set_epoch``,
    ``batches_per_epoch``, ``batch_size``): ``{"image": uint8 (B,3,H,W)[, "mask"][, "label"], "skipped"}``, on
    ``device``. ``masks`` adds SimMIM masks (drawn on the CPU from (seed, epoch, rank, batch), as
    :class:`masking.MaskGenerator` draws them for the CPU stream)."""

    def __init__(self, shards: ShardSet, augment: DaliAugment, batch_size: int, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 4, labels: bool = False,
                 num_classes: int | None = None, masks: MaskGenerator | None = None, shuffle_buffer: int = 2000,
                 accumulation: int = 1):
        super().__init__(shards, augment, batch_size, device, labels, workers, num_classes)
        self.shards = shards
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.masks = masks
        self.shuffle_buffer = shuffle_buffer
        # as ShardStream: ceil(samples / global batch) steps an epoch, the same on any cluster shape
        self.batches_per_epoch = max(1, math.ceil(shards.num_samples / (world_size * batch_size * accumulation))
                                     ) * accumulation
        self.workers = 0  # the engine's DataLoader is bypassed: DALI runs its own threads
        self.epoch = 0
        self.skip_batches = 0
        self.epochs = 1

    def set_epoch(self, epoch: int, skip_batches: int = 0, epochs: int = 1) -> None:
        """Next iteration yields the batches of ``epochs`` epochs from ``epoch`` on, starting after the first
        ``skip_batches`` of ``epoch`` (whose samples are not tracked: the rest of a resumed epoch is drawn in
        another order, some samples twice or not at all; the CPU stream resumes exactly)."""
        self.epoch = epoch
        self.skip_batches = skip_batches
        self.epochs = epochs

    def _pipeline(self, epoch: int, skip_batches: int, attempt: int):
        mixture = getattr(self.shards, "mixture", None)
        if mixture is not None:  # the shards of each source's draws this epoch, interleaved: alike on all ranks
            urls = [self.shards.urls[i] for i in mixture.epoch_shards(self.shards.shard_lengths, self.seed, epoch)]
        else:
            urls = list(self.shards.urls)
            random.Random(f"{self.seed}/{epoch}/{attempt}/{skip_batches}").shuffle(urls)  # alike on all ranks
        # DALI deals samples (not whole shards) to ranks, so fewer shards than ranks is fine
        return self.build(_seed(self.seed, epoch, self.rank, skip_batches, attempt), urls,
                          shard_id=self.rank, num_shards=self.world_size, shuffle_buffer=self.shuffle_buffer)

    def __iter__(self) -> Iterator[dict]:
        for index in range(self.epochs):
            yield from self._epoch_batches(self.epoch + index, self.skip_batches if index == 0 else 0)

    def _epoch_batches(self, epoch: int, skip_batches: int) -> Iterator[dict]:
        failures = 0
        pipe = self._pipeline(epoch, skip_batches, failures)
        # samples the indexes leave out: counted once per epoch, by rank 0, as the CPU stream meets them once
        skipped = [f"left out of the DALI index as undecodable ({n + 1} of {self.left_out})"
                   for n in range(self.left_out)] if self.rank == 0 and skip_batches == 0 else []
        for index in range(skip_batches, self.batches_per_epoch):
            while True:
                try:
                    batch = self.batch(pipe.run())
                    break
                except RuntimeError as error:  # DALI stops at an undecodable image: drop the batch, restart
                    failures += 1
                    reason = _reason(error)
                    if failures > MAX_FAILED_BATCHES:
                        raise SimmimError(f"DALI failed on {failures} batches this epoch ({reason}); check the "
                                          "shards, or use --decode cpu") from error
                    skipped += [f"DALI could not decode a batch ({reason}); dropped it, sample {n + 1} of "
                                f"{self.batch_size}" for n in range(self.batch_size)]
                    del pipe
                    pipe = self._pipeline(epoch, skip_batches, failures)
            if self.masks is not None:
                generator = torch.Generator().manual_seed(_seed(self.seed, epoch, self.rank, index))
                mask = self.masks(self.batch_size, generator=generator)
                if batch["image"].is_cuda:  # from pageable memory the copy would wait for the step in flight
                    mask = mask.pin_memory().to(batch["image"].device, non_blocking=True)
                batch["mask"] = mask
            batch["skipped"] = skipped
            skipped = []
            yield batch


class DaliEvalStream(_DaliSource):
    """Every sample once, in order, for evaluation: ``{"image": uint8, "label": int64, "skipped": [...]}``
    (the last batch short). ``source`` is a :class:`ShardSet` or a list of ``(image path, label)`` pairs."""

    workers = 0

    def __init__(self, source: ShardSet | list[tuple[Path, int]], augment: DaliAugment, batch_size: int,
                 device: torch.device | str, workers: int = 4, num_classes: int | None = None):
        super().__init__(source, augment, batch_size, device, True, workers, num_classes)
        if isinstance(source, ShardSet):
            self.count = sum(read_dali_index_count(u) or 0 for u in source.urls)
        else:
            self.count = len(source)

    def __iter__(self) -> Iterator[dict]:
        urls = self.source.urls if isinstance(self.source, ShardSet) else None
        pipe = self.build(0, urls)
        skipped = [f"left out of the DALI index as undecodable ({n + 1} of {self.left_out})"
                   for n in range(self.left_out)]
        for start in range(0, self.count, self.batch_size):
            try:
                batch = self.batch(pipe.run())
            except RuntimeError as error:
                reason = _reason(error)
                raise SimmimError(f"DALI could not decode an image of batch {start // self.batch_size} ({reason}); "
                                  "evaluate with --decode cpu, which skips it") from error
            keep = min(self.batch_size, self.count - start)  # the last batch is padded by DALI
            yield {"image": batch["image"][:keep], "label": batch["label"][:keep], "skipped": skipped}
            skipped = []
