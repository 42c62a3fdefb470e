"""Frozen features of a data set (centre crops through an encoder): each process extracts its share, the shares
are gathered, and the whole is cached on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoints, distributed, hf, storage
from .config import LinearProbeConfig
from .image_spec import IMAGENET_RGB, ImageSpec
from .models import ProbeModel
from .pipeline import EvalStream, make_loader
from .precision import autocast, resolve_precision
from .shards import resolve_shards
from .tool_configs import KnnConfig
from .transforms import CropTransform


def _cache_key(config: LinearProbeConfig | KnnConfig, data: str) -> str:
    stamp = weights_stamp(config.pretrained) if config.pretrained else ["random", config.seed]
    description = {"weights": stamp, "model": config.model, "kwargs": config.model_kwargs, "size": config.img_size,
                   "crop": config.crop_pct, "layer": config.layer, "pool": config.pool,
                   "data": resolve_shards(data).urls}
    if ImageSpec.from_dict(config.image_spec) != IMAGENET_RGB:  # RGB photos keep the keys of their caches
        description["image"] = config.image_spec
    return hashlib.sha1(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_stamp(source: str) -> list:
    """What identifies a checkpoint's contents: its path, size and time; for a transformers folder or Hub id
    (whose cached snapshot path names the commit), those of its weights file."""
    path = Path(source)
    if hf.is_hf(source):
        folder = hf.local_folder(source)
        path = next((folder / name for name in hf.WEIGHT_FILES if (folder / name).is_file()), folder)
    path = path.resolve()
    return [str(path), path.stat().st_size, path.stat().st_mtime_ns]


@torch.no_grad()
def extract_features(features_of: Callable[[torch.Tensor], torch.Tensor], stream: EvalStream, device: torch.device,
                     precision: str, spec: ImageSpec = IMAGENET_RGB) -> tuple[torch.Tensor, torch.Tensor]:
    """``features_of(images normalised as spec says)`` and the labels of every sample ``stream`` deals this
    process."""
    features, labels = [], []
    for batch in make_loader(stream):
        if batch["label"].numel():
            with autocast(precision, device):
                features.append(features_of(spec.normalize(batch["image"].to(device))).float().cpu())
            labels.append(batch["label"])
    return (torch.cat(features) if features else torch.empty(0),
            torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))


def data_features(model: ProbeModel, config: LinearProbeConfig | KnnConfig, data: str,
                  context: distributed.Context, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of ``data`` (centre crops), computed now: each process extracts its
    share, and the shares are gathered so that every process holds them all, in the same order."""
    shards = resolve_shards(data)
    spec = ImageSpec.from_dict(config.image_spec).for_data(shards.images)
    stream = EvalStream(shards, CropTransform(config.img_size, config.crop_pct), config.batch_size,
                        workers=config.workers, rank=context.rank, world_size=context.world_size,
                        num_classes=len(classes), decode=spec.image_decoder())
    model.to(context.device).eval()
    features, labels = extract_features(model.features, stream, context.device,
                                        resolve_precision(config.precision, context.device), spec)
    return distributed.gather_rows(features, context), distributed.gather_rows(labels, context)


@torch.no_grad()
def cached_features(model: ProbeModel, config: LinearProbeConfig | KnnConfig, data: str,
                    context: distributed.Context, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`data_features`, kept in one file under --cache-dir and read back by later runs with any number of
    processes. A node-local cache folder works too: each node's first process writes its copy, and the features
    are computed again whenever any process lacks the file."""
    path = Path(config.cache_dir) / _cache_key(config, data) / "features.pt"
    if not distributed.any_rank(not path.is_file(), context):
        loaded = checkpoints.load_checkpoint(path)
        return loaded["features"], loaded["labels"]
    features, labels = data_features(model, config, data, context, classes)
    if context.local_rank == 0:  # a cache: when it cannot be written, a warning, and the next run computes again
        with storage.best_effort("feature cache", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            checkpoints.save_checkpoint({"features": features, "labels": labels}, path)
    return features, labels
