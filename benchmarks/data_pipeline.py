"""Input pipeline speed per core: `simmim pretrain`'s shard stream against a plain torchvision-PIL pipeline.

The baseline runs in this process, ours in one loader worker as in training (this process only receives the
batches). Speed is images per CPU-second (this process plus its finished workers, from getrusage), which the
other tenants of a shared machine disturb far less than wall-clock time. They run side by side, alternating,
on the same JPEGs
(crops of the photos scikit-learn ships, saved at 500×375 as in the issue, and at 1000×750 where reduced
JPEG decoding pays). Prints one JSON line per image size:

    python benchmarks/data_pipeline.py [--images 300] [--img-size 192]

With ``--domain`` it measures images that are not 8-bit photos instead: the same pretraining stream over 16-bit
4-band TIFFs and 16-bit DICOM slices against 8-bit RGB PNGs of the same pixel count (the photo fast path), with
where one image's time goes (decode, crop and flip) from timing the steps alone in this process (needs
simmim-cli[tiff,dicom]):

    python benchmarks/data_pipeline.py --domain [--images 256] [--domain-size 512x384]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T1

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simmim_cli.demo import photo_paths  # noqa: E402
from simmim_cli.image_spec import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, spec_for_data  # noqa: E402
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


def shard_stream(shards: Path, img_size: int, rounds: int, batch_size: int = 32, decode=None) -> float:
    """The pretraining pipeline: tar reading, shuffling, decoding, crop, flip, mask, batches (uint8 for photos;
    ``decode`` as ``simmim pretrain`` chooses it from the shards' record for other images)."""
    decode = decode or partial(decode_tensor, min_size=pretrain_decode_size(img_size))
    dataset = ShardStream(resolve_shards(str(shards)), PretrainTransform(img_size, MaskGenerator(img_size, 32, 16)),
                          batch_size, workers=1, decode=decode)
    images = 0
    start = cpu_seconds()
    for epoch in range(rounds):
        dataset.set_epoch(epoch)
        loader = iter(make_loader(dataset))
        for batch in loader:
            images += batch["image"].shape[0]
        del loader  # joins the worker, so its CPU time is counted
    return images / (cpu_seconds() - start)


# ---------------------------------------------------------------------------------------------- domain images


def photo_crops(count: int, size: tuple[int, int]) -> list:
    """uint8 (H, W, 3) crops of the sample photos, all of one size: the same content in every format."""
    import numpy as np

    photos = [Image.open(p).convert("RGB") for p in photo_paths()]
    rng = random.Random(1)
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width = rng.randint(photo.width * 2 // 3, photo.width)
        left, top = rng.randint(0, photo.width - width), rng.randint(0, max(0, photo.height - width * 3 // 4))
        crop = photo.crop((left, top, left + width, top + width * 3 // 4)).resize(size, Image.BICUBIC)
        crops.append(np.asarray(crop))
    return crops


def write_domain_sets(folder: Path, count: int, size: tuple[int, int]) -> dict[str, Path]:
    """The same photo crops as 8-bit RGB PNGs, 16-bit 4-band TIFFs (RGB and a fourth band, × 257: every bit used)
    and 16-bit DICOM slices (grey, CT_small.dcm's header: int16 with a rescale intercept)."""
    import numpy as np
    import pydicom
    import tifffile

    template = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    folders = {name: folder / name for name in ("png", "tiff", "dicom")}
    for path in folders.values():
        path.mkdir(parents=True)
    for index, crop in enumerate(photo_crops(count, size)):
        Image.fromarray(crop).save(folders["png"] / f"{index:04d}.png")
        wide = crop.astype(np.uint16) * 257
        bands = np.concatenate([wide, wide.mean(axis=2, keepdims=True).astype(np.uint16)], axis=2)
        tifffile.imwrite(folders["tiff"] / f"{index:04d}.tif", bands.transpose(2, 0, 1), photometric="minisblack",
                         planarconfig="separate")
        ct = template.copy()
        ct.Rows, ct.Columns = crop.shape[:2]
        ct.PixelData = (wide.mean(axis=2) / 16).astype(np.int16).tobytes()  # 12 bits, as CT scanners store
        ct.save_as(folders["dicom"] / f"{index:04d}.dcm")
    return folders


def step_times(shards: Path, img_size: int, decode, samples: int = 64) -> dict[str, float]:
    """Milliseconds per image of decoding and of crop + flip + mask, timed alone in this process."""
    import webdataset as wds

    from simmim_cli.pipeline import sample_image_bytes

    blobs = [sample_image_bytes(s) for s in wds.tariterators.tarfile_samples(
        iter([{"url": u} for u in resolve_shards(str(shards)).urls]))][:samples]
    transform = PretrainTransform(img_size, MaskGenerator(img_size, 32, 16))
    started = time.process_time()
    images = [decode(blob) for blob in blobs]
    decoded = time.process_time()
    for image in images:
        transform(image)
    done = time.process_time()
    return {"decode_ms": round(1000 * (decoded - started) / len(blobs), 2),
            "crop_flip_mask_ms": round(1000 * (done - decoded) / len(blobs), 2)}


def domain(args: argparse.Namespace, tmp: str) -> None:
    width, height = (int(v) for v in args.domain_size.split("x"))
    folders = write_domain_sets(Path(tmp) / "domain", args.images, (width, height))
    decoders, shards = {}, {}
    for name, folder in folders.items():
        shards[name] = folder.with_name(f"{name}-shards")
        info = write_shards(folder, shards[name], maxcount=64)
        # the decoder simmim pretrain takes from the shards' record (image_spec.py)
        decoders[name] = spec_for_data(info["images"]).tensor_decoder(pretrain_decode_size(args.img_size))
    rates: dict[str, list[float]] = {name: [] for name in folders}
    for _ in range(args.rounds):  # interleaved, so all see the same machine load
        for name in folders:
            rates[name].append(shard_stream(shards[name], args.img_size, 1, decode=decoders[name]))
    png = max(rates["png"])
    for name in folders:
        best = max(rates[name])
        print(json.dumps({"format": {"png": "png 8-bit RGB", "tiff": "tiff 16-bit 4-band",
                                     "dicom": "dicom 16-bit grey"}[name],
                          "pixels": args.domain_size, "img_size": args.img_size,
                          "simmim_img_per_cpu_s": round(best, 1), "ratio_to_png": round(best / png, 2),
                          **step_times(shards[name], args.img_size, decoders[name]), "threads": 1}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the images, alternating pipelines")
    parser.add_argument("--domain", action="store_true", help="16-bit TIFF and DICOM sets against 8-bit PNGs")
    parser.add_argument("--domain-size", default="512x384", help="with --domain: width x height of every image")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core
    with tempfile.TemporaryDirectory() as tmp:
        if args.domain:
            domain(args, tmp)
            return
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
