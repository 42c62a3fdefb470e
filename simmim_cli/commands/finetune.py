"""``simmim finetune``: a pretrained encoder with a new head, trained on labelled shards."""

from __future__ import annotations

from typing import Any

from .. import dali, distributed
from ..config import FinetuneConfig
from ..data_sources import mixture_summary, training_shards
from ..defaults import choose_finetune, encoder_depth
from ..image_spec import ImageSpec
from ..models import make_classifier, model_family
from ..pipeline import ShardStream
from ..tasks import FinetuneTask, Task
from ..transforms import ArrayClassifierTrainTransform, ClassifierTrainTransform, CropTransform
from ..weights import load_encoder, read_weights
from .classifier import print_load_report, resolve_classifier, val_stream
from .training import prepare_run, run_training


def prepare_finetune(config: FinetuneConfig) -> None:
    if config.decode == "gpu":
        dali.require_dali(config.device)
    prepare_run(config)
    model = resolve_classifier(config, keep_pretrain_architecture=False)
    shards = training_shards(config.data, config.epoch_size, labels=True)
    summary = choose_finetune(config, shards.num_samples, encoder_depth(model))
    report = "\n".join(filter(None, [mixture_summary(shards), summary]))
    if config.node_rank == 0:  # every node makes the same choices; node 0 reports them
        if report:
            print(report, flush=True)
        spec = ImageSpec.from_dict(config.image_spec)
        if not spec.rgb8 and (config.auto_augment or config.color_jitter):
            print(f"note: RandAugment and colour jitter are for 8-bit RGB images; turned off for these "
                  f"{spec.describe()} (the crops and flips stay)", flush=True)
    if config.decode == "gpu":
        dali.classifier_augment(config.img_size, config.auto_augment)  # a policy DALI has, or a one-line error
        dali.ensure_indexes(shards)
    if config.layer_decay is None:  # the official values: ViT-B 0.65; Swin-B 0.9 (100-epoch pretraining)
        config.layer_decay = 0.9 if model_family(config.model).startswith("swin") else 0.65


def build_finetune(config: FinetuneConfig, context: distributed.Context) -> tuple[Task, Any]:
    shards = training_shards(config.data, config.epoch_size, labels=True)
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
        spec = ImageSpec.from_dict(config.image_spec)
        if spec.rgb8:
            augment = ClassifierTrainTransform(config.img_size, config.auto_augment, config.color_jitter,
                                               config.min_crop_scale, config.hflip)
        else:  # colour operations mean nothing for other bands (prepare_finetune said so)
            augment = ArrayClassifierTrainTransform(config.img_size, config.min_crop_scale, config.hflip)
        dataset = ShardStream(shards, augment,
                              config.batch_size, workers=config.workers, rank=context.rank,
                              world_size=context.world_size, seed=config.seed, labels=True, num_classes=len(classes),
                              accumulation=config.grad_accum, decode=spec.image_decoder())
    val = val_stream(config, context, classes, CropTransform(config.img_size, config.crop_pct))
    return FinetuneTask(model, config, classes, val), dataset


def finetune(config: FinetuneConfig) -> None:
    """``simmim finetune``."""
    run_training(config, prepare_finetune, build_finetune)
