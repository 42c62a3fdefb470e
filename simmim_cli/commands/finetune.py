"""``simmim finetune``: a pretrained encoder with a new head, trained on labelled shards."""

from __future__ import annotations

from typing import Any

from .. import dali, distributed
from ..config import FinetuneConfig
from ..data_sources import labelled_shards
from ..defaults import choose_finetune, encoder_depth
from ..models import make_classifier, model_family
from ..pipeline import ShardStream
from ..tasks import FinetuneTask, Task
from ..transforms import ClassifierTrainTransform, CropTransform
from ..weights import load_encoder, read_weights
from .classifier import print_load_report, resolve_classifier, val_stream
from .training import prepare_run, run_training


def prepare_finetune(config: FinetuneConfig) -> None:
    if config.decode == "gpu":
        dali.require_dali(config.device)
    prepare_run(config)
    model = resolve_classifier(config, keep_pretrain_architecture=False)
    summary = choose_finetune(config, labelled_shards(config.data, config.epoch_size).num_samples,
                              encoder_depth(model))
    if config.node_rank == 0 and summary:  # every node makes the same choices; node 0 reports them
        print(summary, flush=True)
    if config.decode == "gpu":
        dali.classifier_augment(config.img_size, config.auto_augment)  # a policy DALI has, or a one-line error
        dali.ensure_indexes(labelled_shards(config.data, config.epoch_size))
    if config.layer_decay is None:  # the official values: ViT-B 0.65; Swin-B 0.9 (100-epoch pretraining)
        config.layer_decay = 0.9 if model_family(config.model).startswith("swin") else 0.65


def build_finetune(config: FinetuneConfig, context: distributed.Context) -> tuple[Task, Any]:
    shards = labelled_shards(config.data, config.epoch_size)
    classes = shards.classes
    model = make_classifier(config, len(classes), probe=False)
    if config.pretrained:
        report = load_encoder(model, read_weights(config.pretrained), config.allow_missing)
        if context.is_main:
            print_load_report(config.pretrained, report)
    if config.decode == "gpu":  # mixup/cutmix and random erasing follow on the GPU batch, as with --decode cpu
        augment = dali.classifier_augment(config.img_size, config.auto_augment, config.color_jitter,
                                          config.min_crop_scale, config.hflip)
        dataset = dali.DaliStream(shards, augment, config.batch_size, context.device, rank=context.rank,
                                  world_size=context.world_size, seed=config.seed, workers=config.workers,
                                  labels=True, num_classes=len(classes), accumulation=config.grad_accum)
    else:
        augment = ClassifierTrainTransform(config.img_size, config.auto_augment, config.color_jitter,
                                           config.min_crop_scale, config.hflip)
        dataset = ShardStream(shards, augment,
                              config.batch_size, workers=config.workers, rank=context.rank,
                              world_size=context.world_size, seed=config.seed, labels=True, num_classes=len(classes),
                              accumulation=config.grad_accum)
    val = val_stream(config, context, classes, CropTransform(config.img_size, config.crop_pct))
    return FinetuneTask(model, config, classes, val), dataset


def finetune(config: FinetuneConfig) -> None:
    """``simmim finetune``."""
    run_training(config, prepare_finetune, build_finetune)
