"""``simmim linear-probe``: a linear classifier on a frozen encoder, on images or on cached features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import dali, distributed
from ..config import LinearProbeConfig
from ..data_sources import mixture_summary, training_shards
from ..features import cached_features
from ..image_spec import ImageSpec
from ..models import make_classifier
from ..pipeline import ShardStream, TensorStream
from ..tasks import LinearProbeTask, Task
from ..transforms import CropTransform
from ..weights import load_encoder, read_weights
from .classifier import print_load_report, resolve_classifier, val_stream
from .training import prepare_run, run_training


def prepare_linear_probe(config: LinearProbeConfig) -> None:
    if config.decode == "gpu" and not config.cache_features:
        dali.require_dali(config.device)
    prepare_run(config)
    resolve_classifier(config, keep_pretrain_architecture=True)
    shards = training_shards(config.data, config.epoch_size, labels=True)
    summary = mixture_summary(shards)
    if summary and config.node_rank == 0:
        print(summary, flush=True)
    if config.decode == "gpu" and not config.cache_features:
        dali.ensure_indexes(shards)
    if config.cache_features and config.cache_dir is None:
        config.cache_dir = str(Path(config.output) / "features")


def build_linear_probe(config: LinearProbeConfig, context: distributed.Context) -> tuple[Task, Any]:
    shards = training_shards(config.data, config.epoch_size, labels=True)
    classes = shards.classes
    model = make_classifier(config, len(classes), probe=True)
    if config.pretrained:
        report = load_encoder(model.backbone, read_weights(config.pretrained), config.allow_missing)
        if context.is_main:
            print_load_report(config.pretrained, report)
    if config.cache_features:
        features_of = model.to(context.device).eval().features  # the frozen extractor, as knn and embed use it
        features, labels = cached_features(features_of, config, config.data, context, classes)
        dataset = TensorStream(features, labels, config.batch_size, context.rank, context.world_size, config.seed,
                               accumulation=config.grad_accum)
        val = None
        if config.val_data:
            val_features, val_labels = cached_features(features_of, config, config.val_data, context, classes)
            val = TensorStream(val_features, val_labels, config.batch_size, context.rank, context.world_size,
                               shuffle=False)
    elif config.decode == "gpu":  # the same views as CropTransform(random=True): crop 0.08-1, bicubic, flip
        dataset = dali.DaliStream(shards, dali.classifier_augment(config.img_size), config.batch_size,
                                  context.device, rank=context.rank, world_size=context.world_size,
                                  seed=config.seed, workers=config.workers, labels=True, num_classes=len(classes),
                                  accumulation=config.grad_accum)
        val = val_stream(config, context, classes, CropTransform(config.img_size, config.crop_pct))
    else:
        dataset = ShardStream(shards, CropTransform(config.img_size, random=True), config.batch_size,
                              workers=config.workers, rank=context.rank, world_size=context.world_size,
                              seed=config.seed, labels=True, num_classes=len(classes),
                              accumulation=config.grad_accum,
                              decode=ImageSpec.from_dict(config.image_spec).image_decoder())
        val = val_stream(config, context, classes, CropTransform(config.img_size, config.crop_pct))
    return LinearProbeTask(model, config, classes, val), dataset


def linear_probe(config: LinearProbeConfig) -> None:
    """``simmim linear-probe``."""
    run_training(config, prepare_linear_probe, build_linear_probe)
