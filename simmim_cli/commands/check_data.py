"""The data section of ``simmim check``: samples decoded and augmented through the stream's own decode and
transform, in one process, timed; for a mixture, each source's figures and read speed."""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from PIL import Image

from ..errors import SimmimError
from ..pipeline import sample_image_bytes, sample_label, seeded_rng

DATA_READ_SECONDS = 3.0  # the timed read of the shards stops after this long (or DATA_READ_IMAGES images)
DATA_READ_IMAGES = 256


def time_data(dataset: Any) -> dict[str, Any]:
    """Decode + augment of samples from a spread of the shards, through the stream's own decode and transform,
    in this one process: images/s of one loader process, sizes seen, unreadable samples (named). For a mixture,
    each source's figures (``sources``: samples, shards, its share of the epoch, read speed), and the speed of
    the mixture as a loader reads it (each source's time in its share)."""
    shards = getattr(dataset, "shards", None)
    figures: dict[str, Any] = {"shards": len(shards.urls) if shards else None,
                               "samples": shards.num_samples if shards else None,
                               "classes": shards.num_classes if shards else None,
                               "consumers": getattr(dataset, "num_consumers", None)}
    mix = getattr(shards, "mixture", None)
    if mix is not None:
        starts = mix.shard_starts()
        figures["sources"] = [
            {"name": source.name, "path": spec.path, "share": spec.share(), "samples": source.samples,
             "shards": source.shards, "per_epoch": source.per_epoch,
             "epoch_share": source.per_epoch / mix.epoch_samples}
            for source, spec in zip(mix.sources, shards.specs, strict=True)]
    if shards is None or not hasattr(dataset, "transform") or not hasattr(dataset, "decode"):
        figures["note"] = "batches are made on the GPU (DALI) or from cached features: timed in the steps only"
        return figures
    if mix is None:
        figures.update(_time_read(dataset, shards.urls, DATA_READ_SECONDS))
        return figures
    budget = max(1.0, DATA_READ_SECONDS / len(mix.sources))
    timed = [_time_read(dataset, shards.urls[a:b], budget) for a, b in itertools.pairwise(starts)]
    for entry, read in zip(figures["sources"], timed, strict=True):
        entry.update({key: read[key] for key in ("images_read", "read_seconds", "img_per_s_per_loader")})
    rates = [read["img_per_s_per_loader"] for read in timed]
    sizes = sorted({tuple(size) for read in timed for size in read["sizes"]})
    figures.update(
        images_read=sum(read["images_read"] for read in timed),
        read_seconds=sum(read["read_seconds"] for read in timed),
        # a loader spends each source's share of the epoch at that source's speed
        img_per_s_per_loader=(1 / sum(source["epoch_share"] / rate for source, rate in zip(figures["sources"], rates,
                                                                                          strict=True))
                              if all(rates) else None),
        sizes=sizes[:3] + sizes[-1:] if len(sizes) > 3 else sizes,
        distinct_sizes=sum(read["distinct_sizes"] for read in timed),
        unreadable=[line for read in timed for line in read["unreadable"]][:10],
        unreadable_count=sum(read["unreadable_count"] for read in timed))
    return figures


def _time_read(dataset: Any, shard_urls: list[str], budget: float) -> dict[str, Any]:
    """Decode + augment of samples from a spread of ``shard_urls`` for at most ``budget`` seconds, read as the
    loader reads them (remote stores, the per-sample limits; ``check`` redacts the whole report)."""
    from ..remote import shard_samples

    unreadable: list[str] = []
    step = max(1, len(shard_urls) // 8)
    urls = shard_urls[::step][:8]
    sizes: set[tuple[int, int]] = set()
    images, seconds = 0, 0.0
    deadline = time.perf_counter() + budget
    for sample in shard_samples(urls, unreadable):
        if images >= DATA_READ_IMAGES or time.perf_counter() > deadline:
            break
        started = time.perf_counter()
        try:
            image = dataset.decode(sample_image_bytes(sample))
            if dataset.labels:
                sample_label(sample, dataset.num_classes)
            with seeded_rng(images):
                dataset.transform(image)
        except SimmimError as error:
            unreadable.append(str(error))
            continue
        except (OSError, ValueError, KeyError, SyntaxError, RuntimeError, Image.DecompressionBombError) as error:
            unreadable.append(f"{sample.get('__url__')}:{sample.get('__key__')}: {type(error).__name__}: {error}")
            continue
        seconds += time.perf_counter() - started
        images += 1
        sizes.add(tuple(image.shape[-1:-3:-1]) if torch.is_tensor(image) else image.size)
    return {"images_read": images, "read_seconds": round(seconds, 3),
            "img_per_s_per_loader": images / seconds if seconds else None,
            "sizes": sorted(sizes)[:3] + (sorted(sizes)[-1:] if len(sizes) > 3 else []),
            "distinct_sizes": len(sizes), "unreadable": unreadable[:10], "unreadable_count": len(unreadable)}
