"""Frozen features of a data set (centre crops through an encoder), computed once and cached on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoints, distributed
from .config import KnnConfig, LinearProbeConfig
from .models import ProbeModel
from .pipeline import EvalStream, make_loader
from .precision import autocast, resolve_precision
from .shards import resolve_shards
from .transforms import CropTransform, normalize


def _cache_key(config: LinearProbeConfig | KnnConfig, data: str) -> str:
    source = Path(config.pretrained).resolve() if config.pretrained else None
    stamp = [str(source), source.stat().st_size, source.stat().st_mtime_ns] if source else ["random", config.seed]
    description = {"weights": stamp, "model": config.model, "kwargs": config.model_kwargs, "size": config.img_size,
                   "crop": config.crop_pct, "layer": config.layer, "pool": config.pool,
                   "data": resolve_shards(data).urls}
    return hashlib.sha1(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def extract_features(features_of: Callable[[torch.Tensor], torch.Tensor], stream: EvalStream, device: torch.device,
                     precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``features_of(normalised images)`` and the labels of every sample ``stream`` deals this process."""
    features, labels = [], []
    for batch in make_loader(stream):
        if batch["label"].numel():
            with autocast(precision, device):
                features.append(features_of(normalize(batch["image"].to(device))).float().cpu())
            labels.append(batch["label"])
    return (torch.cat(features) if features else torch.empty(0),
            torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))


def data_features(model: ProbeModel, config: LinearProbeConfig | KnnConfig, data: str,
                  context: distributed.Context, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of this process's share of ``data`` (centre crops), computed now."""
    stream = EvalStream(resolve_shards(data), CropTransform(config.img_size, config.crop_pct), config.batch_size,
                        workers=config.workers, rank=context.rank, world_size=context.world_size,
                        num_classes=len(classes))
    model.to(context.device).eval()
    return extract_features(model.features, stream, context.device,
                            resolve_precision(config.precision, context.device))


@torch.no_grad()
def cached_features(model: ProbeModel, config: LinearProbeConfig | KnnConfig, data: str,
                    context: distributed.Context, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every sample of ``data`` (centre crops), computed once and kept under --cache-dir.

    Each rank extracts its share into its own file; then every rank reads all files."""
    folder = Path(config.cache_dir) / _cache_key(config, data)
    parts = [folder / f"part-{rank:03d}-of-{context.world_size:03d}.pt" for rank in range(context.world_size)]
    if not all(p.is_file() for p in parts):
        features, labels = data_features(model, config, data, context, classes)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoints.save_checkpoint({"features": features, "labels": labels}, parts[context.rank])
        distributed.barrier()
    loaded = [checkpoints.load_checkpoint(p) for p in parts]
    return torch.cat([p["features"] for p in loaded]), torch.cat([p["labels"] for p in loaded])
