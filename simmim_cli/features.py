"""Frozen features of a data set (centre crops through an encoder), the one extractor of the toolkit: ``knn``,
linear-probe's cached features, pretraining's ``--knn-*`` monitoring and ``embed`` all take their features from
:func:`feature_batches`, of the encoder :func:`feature_encoder` builds. For knn and linear-probe each process
extracts its share, the shares are gathered, and the whole may be cached on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import checkpoints, distributed, hf, storage
from .config import LinearProbeConfig
from .image_spec import IMAGENET_RGB, ImageSpec
from .models import FeatureExtractor, create_backbone
from .pipeline import EvalStream, make_loader
from .precision import autocast, resolve_precision
from .redact import without_credentials
from .shards import resolve_shards
from .tool_configs import EmbedConfig, KnnConfig
from .transforms import CropTransform
from .weights import load_encoder, read_weights


def _cache_key(config: LinearProbeConfig | KnnConfig, data: str) -> str:
    stamp = weights_stamp(config.pretrained) if config.pretrained else ["random", config.seed]
    description = {"weights": stamp, "model": config.model, "kwargs": config.model_kwargs, "size": config.img_size,
                   "crop": config.crop_pct, "layer": config.layer, "pool": config.pool,
                   "data": [without_credentials(url) for url in resolve_shards(data).urls]}  # the same data re-signed
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


def feature_encoder(config: KnnConfig | EmbedConfig) -> FeatureExtractor:
    """The frozen encoder knn and embed take features from, in eval mode: a timm backbone drawn with
    ``config.seed`` (the draw linear-probe makes with that seed: the random baseline) holding ``--pretrained``'s
    weights, pooled at ``--layer`` with ``--pool``. ``config.model``/``model_kwargs``/``img_size`` are resolved
    already (from the checkpoint where not given)."""
    torch.manual_seed(config.seed)
    backbone = create_backbone(config.model, config.img_size, config.model_kwargs, 0.0, num_classes=0,
                               norm_all_tokens=True)
    extractor = FeatureExtractor(backbone, config.layer, config.pool)
    if config.pretrained:
        load_encoder(backbone, read_weights(config.pretrained), config.allow_missing)
    return extractor.eval()


@torch.no_grad()
def feature_batches(features_of: Callable[[torch.Tensor], torch.Tensor], stream: EvalStream, device: torch.device,
                    precision: str, spec: ImageSpec = IMAGENET_RGB) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """(float32 features on the CPU, the batch) for each batch ``stream`` deals this process: ``features_of``
    takes the images on ``device``, normalised as ``spec`` says. On a GPU each batch's features are copied out
    while the next batch computes (the result comes one batch late), so that the GPU never waits on the host."""
    pending = None
    for batch in make_loader(stream):
        features = torch.empty(0)
        if len(batch["image"]):
            with autocast(precision, device):
                features = features_of(spec.normalize(batch["image"].to(device, non_blocking=True))).float()
        copied = _to_host(features)
        if pending is not None:
            yield _arrived(*pending[0]), pending[1]
        pending = copied, batch
    if pending is not None:
        yield _arrived(*pending[0]), pending[1]


def _to_host(features: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """An asynchronous copy of CUDA features into pinned host memory, and its event; CPU features as they are."""
    if not features.is_cuda:
        return features, None
    host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
    host.copy_(features, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _arrived(features: torch.Tensor, event: Any) -> torch.Tensor:
    if event is not None:
        event.synchronize()
    return features


def extract_features(features_of: Callable[[torch.Tensor], torch.Tensor], stream: EvalStream, device: torch.device,
                     precision: str, spec: ImageSpec = IMAGENET_RGB) -> tuple[torch.Tensor, torch.Tensor]:
    """``features_of(images normalised as spec says)`` and the labels of every sample ``stream`` deals this
    process."""
    features, labels = [], []
    for batch_features, batch in feature_batches(features_of, stream, device, precision, spec):
        if len(batch_features):
            features.append(batch_features)
            labels.append(batch["label"])
    return (torch.cat(features) if features else torch.empty(0),
            torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))


def data_features(features_of: Callable[[torch.Tensor], torch.Tensor], config: LinearProbeConfig | KnnConfig,
                  data: str, context: distributed.Context, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of ``data`` (centre crops), computed now: each process extracts its
    share, and the shares are gathered so that every process holds them all, in the same order."""
    shards = resolve_shards(data)
    spec = ImageSpec.from_dict(config.image_spec).for_data(shards.images)
    stream = EvalStream(shards, CropTransform(config.img_size, config.crop_pct), config.batch_size,
                        workers=config.workers, rank=context.rank, world_size=context.world_size,
                        num_classes=len(classes), decode=spec.image_decoder())
    features, labels = extract_features(features_of, stream, context.device,
                                        resolve_precision(config.precision, context.device), spec)
    return distributed.gather_rows(features, context), distributed.gather_rows(labels, context)


@torch.no_grad()
def cached_features(features_of: Callable[[torch.Tensor], torch.Tensor], config: LinearProbeConfig | KnnConfig,
                    data: str, context: distributed.Context, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`data_features`, kept in one file under --cache-dir and read back by later runs with any number of
    processes. A node-local cache folder works too: each node's first process writes its copy, and the features
    are computed again whenever any process lacks the file."""
    path = Path(config.cache_dir) / _cache_key(config, data) / "features.pt"
    if not distributed.any_rank(not path.is_file(), context):
        loaded = checkpoints.load_checkpoint(path)
        return loaded["features"], loaded["labels"]
    features, labels = data_features(features_of, config, data, context, classes)
    if context.local_rank == 0:  # a cache: when it cannot be written, a warning, and the next run computes again
        with storage.best_effort("feature cache", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            checkpoints.save_checkpoint({"features": features, "labels": labels}, path)
    return features, labels


def embedding_model(config: EmbedConfig, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], int,
                                                                       torch.device, str]:
    """(features_of, feature width, device, precision) for ``embed`` and ``search``'s image queries: the encoder
    knn uses (:func:`feature_encoder`), or an ``.onnx`` file of ``export --what features`` in onnxruntime (which
    places itself: on the GPU when its provider is CUDA, where it reads the images in place)."""
    if config.onnx:
        from .inference import OnnxClassifier

        model = OnnxClassifier(config.pretrained, config.device, what="features")
        return model, model.num_outputs, torch.device("cuda" if model.on_gpu else "cpu"), "fp32"
    encoder = feature_encoder(config).to(device)
    return encoder, encoder.num_features, device, resolve_precision(config.precision, device)
