"""``simmim knn``: weighted k-NN classification on frozen features, the training shards as memory bank."""

from __future__ import annotations

import time
from typing import Any

from .. import distributed
from ..data_sources import labelled_shards
from ..evaluation import knn_classify
from ..features import cached_features, data_features, feature_encoder
from ..tool_configs import KnnConfig
from .classifier import resolve_classifier


def knn(config: KnnConfig) -> dict[str, Any]:
    """Features of --data (the memory bank) and --val-data (the queries), then DINO's weighted k-NN; with
    ``--gpus N``/``--nproc N`` the images are split over N processes for the features and the queries.

    Returns the scores (``top1``, ``top5``, ``k``, ...) and what was measured, for the command line to print."""
    # image folders become cached shards; the architecture is checked on the meta device
    resolve_classifier(config, keep_pretrain_architecture=True)
    if config.cache_features:
        config.cache_dir = config.cache_dir or "runs/features"
    if not distributed.needs_launch(config):
        return _knn_process(config)
    distributed.check_devices(config)
    return distributed.launch(_knn_process, config)


def _knn_process(config: KnnConfig) -> dict[str, Any]:
    """This process's share of the features, gathered; rank 0 then scores every query on its device (a few
    seconds even for ImageNet on a GPU: the features are the slow part)."""
    context = distributed.setup(config)
    try:
        classes = labelled_shards(config.data).classes
        encoder = feature_encoder(config).to(context.device)  # the encoder embed and linear-probe use too
        started = time.perf_counter()
        features_of = cached_features if config.cache_features else data_features
        bank = features_of(encoder, config, config.data, context, classes)
        queries = features_of(encoder, config, config.val_data, context, classes)
        if not context.is_main:
            return {}
        result = knn_classify(*bank, *queries, len(classes), config.k, config.temperature, context.device)
        return {**result, "layer": config.layer, "pool": config.pool, "model": config.model,
                "pretrained": config.pretrained, "seconds": round(time.perf_counter() - started, 2)}
    finally:
        distributed.teardown()
