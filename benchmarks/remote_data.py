"""Loader speed from remote shards: local disk against loopback HTTP (streamed through remote.py) and a warm
``--shard-cache``, in one run, as ratios to local disk; and ``make-shards`` images/s with 1 and all cores.

The pretraining pipeline as `simmim pretrain` runs it (tar reading, shuffling, JPEG decoding, crop, flip, mask,
uint8 batches), in ``--workers`` loader processes; the HTTP server (the tests' loopback server, with byte ranges)
runs in this process. The sources alternate, ``--rounds`` times, and each keeps its best wall-clock img/s, so
the other tenants of a shared machine disturb the ratios little. Prints one JSON line:

    python benchmarks/remote_data.py [--images 512] [--img-size 192] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from data_pipeline import make_jpegs  # noqa: E402
from test_remote import ShardServer  # noqa: E402

from simmim_cli.masking import MaskGenerator  # noqa: E402
from simmim_cli.pipeline import ShardStream, make_loader  # noqa: E402
from simmim_cli.shards import resolve_shards, write_shards  # noqa: E402
from simmim_cli.transforms import PretrainTransform, decode_tensor, pretrain_decode_size  # noqa: E402


def loader_rate(data: str, img_size: int, workers: int, epoch: int, batch_size: int = 32) -> float:
    """Images/s of one epoch of the pretraining stream over ``data`` (wall clock, loader start included)."""
    stream = ShardStream(resolve_shards(data), PretrainTransform(img_size, MaskGenerator(img_size, 32, 16)),
                         batch_size, workers=workers, decode=partial(decode_tensor,
                                                                     min_size=pretrain_decode_size(img_size)))
    stream.set_epoch(epoch)
    start, images = time.perf_counter(), 0
    for batch in make_loader(stream):
        images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--img-size", type=int, default=192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root / "images", args.images, (500, 375))
        make_shards_rate = {}
        for workers in (1, os.cpu_count() or 1):  # the second run's output is the one read below (identical)
            start = time.perf_counter()
            write_shards(root / "images", root / "shards", maxcount=64, workers=workers, force=True)
            make_shards_rate[workers] = args.images / (time.perf_counter() - start)
        rates: dict[str, list[float]] = {"local": [], "http": [], "cache": []}
        with ShardServer(root / "shards") as server:
            url = f"{server.url}/"
            os.environ["SIMMIM_SHARD_CACHE"] = str(root / "cache")
            loader_rate(url, args.img_size, args.workers, 0)  # fills the cache
            for round_index in range(args.rounds):  # alternating, so all see the same machine load
                for source in rates:
                    if source == "cache":
                        os.environ["SIMMIM_SHARD_CACHE"] = str(root / "cache")
                    else:
                        os.environ.pop("SIMMIM_SHARD_CACHE", None)
                    data = str(root / "shards") if source == "local" else url
                    rates[source].append(loader_rate(data, args.img_size, args.workers, round_index))
        best = {source: max(values) for source, values in rates.items()}
        print(json.dumps({
            "images": args.images, "jpeg_size": "500x375", "img_size": args.img_size, "workers": args.workers,
            "local_img_s": round(best["local"], 1), "http_img_s": round(best["http"], 1),
            "cache_img_s": round(best["cache"], 1), "http_ratio": round(best["http"] / best["local"], 2),
            "cache_ratio": round(best["cache"] / best["local"], 2),
            "make_shards_img_s": {f"{n}_workers": round(rate, 1) for n, rate in make_shards_rate.items()},
            "cpus": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
