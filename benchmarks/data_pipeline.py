"""Input pipeline speed per core: `simmim pretrain`'s shard stream against a plain torchvision-PIL pipeline.

The baseline runs in this process, ours in one loader worker as in training (this process only receives the
batches). Speed is images per CPU-second (this process plus its finished workers, from getrusage), which the
other tenants of a shared machine disturb far less than wall-clock time. They run side by side, alternating,
on the same JPEGs
(crops of the photos scikit-learn ships, saved at 500×375 as in the issue, and at 1000×750 where reduced
JPEG decoding pays). Prints one JSON line per image size:

    python benchmarks/data_pipeline.py [--images 300] [--img-size 192]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T1

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simmim_cli.demo import photo_paths  # noqa: E402
from simmim_cli.image_spec import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from simmim_cli.masking import MaskGenerator  # noqa: E402
from simmim_cli.pipeline import ShardStream, make_loader  # noqa: E402
from simmim_cli.shards import resolve_shards, write_shards  # noqa: E402
from simmim_cli.transforms import PretrainTransform, decode_tensor, pretrain_decode_size  # noqa: E402


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[bytes]:
    photos = [Image.open(p).convert("RGB") for p in photo_paths()]
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for index in range(count):
        photo = photos[index % len(photos)]
        width = rng.randint(photo.width * 2 // 3, photo.width)
        height = width * 3 // 4
        left, top = rng.randint(0, photo.width - width), rng.randint(0, max(0, photo.height - height))
        image = photo.crop((left, top, left + width, top + height)).resize(size, Image.BICUBIC)
        image.save(folder / f"{index:04d}.jpg", quality=90)
    return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def torchvision_baseline(blobs: list[bytes], img_size: int, rounds: int) -> float:
    """decode + RandomResizedCrop + flip + ToTensor + Normalize, per image (float32 tensors)."""
    transform = T1.Compose([
        T1.RandomResizedCrop(img_size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)), T1.RandomHorizontalFlip(),
        T1.ToTensor(), T1.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
    start = cpu_seconds()
    for _ in range(rounds):
        for blob in blobs:
            transform(Image.open(io.BytesIO(blob)).convert("RGB"))
    return rounds * len(blobs) / (cpu_seconds() - start)


def shard_stream(shards: Path, img_size: int, rounds: int, batch_size: int = 32) -> float:
    """The pretraining pipeline: tar reading, shuffling, decoding, crop, flip, mask, uint8 batches."""
    dataset = ShardStream(resolve_shards(str(shards)), PretrainTransform(img_size, MaskGenerator(img_size, 32, 16)),
                          batch_size, workers=1, decode=partial(decode_tensor, min_size=pretrain_decode_size(img_size)))
    images = 0
    start = cpu_seconds()
    for epoch in range(rounds):
        dataset.set_epoch(epoch)
        loader = iter(make_loader(dataset))
        for batch in loader:
            images += batch["image"].shape[0]
        del loader  # joins the worker, so its CPU time is counted
    return images / (cpu_seconds() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the images, alternating pipelines")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core
    with tempfile.TemporaryDirectory() as tmp:
        for size in ((500, 375), (1000, 750)):
            folder = Path(tmp) / f"{size[0]}x{size[1]}"
            blobs = make_jpegs(folder / "images", args.images, size)
            write_shards(folder / "images", folder / "shards", maxcount=64)
            baseline, ours = [], []
            for _ in range(args.rounds):  # interleaved, so both see the same machine load
                baseline.append(torchvision_baseline(blobs, args.img_size, 1))
                ours.append(shard_stream(folder / "shards", args.img_size, 1))
            best_baseline, best_ours = max(baseline), max(ours)
            print(json.dumps({"jpeg_size": f"{size[0]}x{size[1]}", "img_size": args.img_size,
                              "torchvision_pil_img_per_cpu_s": round(best_baseline, 1),
                              "simmim_img_per_cpu_s": round(best_ours, 1), "ratio": round(best_ours / best_baseline, 2),
                              "threads": 1}), flush=True)


if __name__ == "__main__":
    main()
