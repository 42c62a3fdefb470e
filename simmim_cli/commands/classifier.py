"""What finetune and linear-probe share: labelled data, the architecture from --pretrained, checked before launch."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import FinetuneConfig, LinearProbeConfig
from ..data_sources import labelled_shards, training_shards
from ..errors import SimmimError
from ..image_spec import ImageSpec, fix_image_spec
from ..models import check_img_size, make_classifier
from ..pipeline import EvalStream
from ..weights import architecture_of, classifier_kwargs, load_encoder, read_weights
from .training import prepare_data


def resolve_classifier(config: FinetuneConfig | LinearProbeConfig, keep_pretrain_architecture: bool) -> nn.Module:
    """Fixes model, kwargs and image size from --pretrained (explicit options win), the channels and normalisation
    from the data (``image_spec.py``), and checks that the weights fit and the image size works, on the meta
    device (no memory, no compute). Image folders become shards first. Returns that meta model."""
    prepare_data(config, "data", "val_data", labels=True)
    shards = training_shards(config.data, config.epoch_size, labels=True)
    if config.val_data:
        val = labelled_shards(config.val_data, option="--val-data")
        if val.classes != shards.classes:
            raise SimmimError(f"--val-data has other classes than --data ({len(val.classes)} vs "
                              f"{len(shards.classes)}); make both from folders with the same class sub-folders")
    return resolve_architecture(config, len(shards.classes), keep_pretrain_architecture, shards.images,
                                val.images if config.val_data else None)


def resolve_architecture(config, num_classes: int, keep_pretrain_architecture: bool, images: dict | None,
                         val_images: dict | None = None) -> nn.Module:
    """Fixes model, kwargs and image size from --pretrained (explicit options win), the channels and normalisation
    from the data's image record ``images`` (``image_spec.py``; ``val_images`` must agree), and checks that the
    weights fit and the image size works, on the meta device; also for embed, whose encoder has no classes.
    Returns that meta model (a probe's with ``keep_pretrain_architecture``)."""
    weights = read_weights(config.pretrained) if config.pretrained else None
    if weights is not None:
        name, kwargs, img_size = architecture_of(weights)
        if not keep_pretrain_architecture:
            kwargs = classifier_kwargs(config.model or name, kwargs)
        config.model = config.model or name
        config.model_kwargs = {**kwargs, **config.model_kwargs}
        config.img_size = config.img_size or img_size
    config.img_size = config.img_size or 224
    # after the checkpoint's kwargs: the data sets in_chans; the encoder's bands and normalisation by default
    spec = fix_image_spec(config, images, (weights.config or {}).get("image_spec") if weights is not None else None)
    if val_images is not None:
        spec.for_data(val_images, "--val-data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "copying into a meta parameter is a no-op": we know
        with torch.device("meta"):
            model = make_classifier(config, num_classes, keep_pretrain_architecture)
        # outside the meta context: timm's table resizing makes new tensors, which must share the checkpoint's device
        if weights is not None:
            load_encoder(model.backbone if hasattr(model, "backbone") else model, weights, config.allow_missing)
        check_img_size(model, config.img_size, config.model)
    return model


def val_stream(config, context, classes: list[str], transform) -> EvalStream | None:
    if not config.val_data:
        return None
    shards = labelled_shards(config.val_data, option="--val-data")
    return EvalStream(shards, transform, config.batch_size, workers=config.workers, rank=context.rank,
                      world_size=context.world_size, num_classes=len(classes),
                      decode=ImageSpec.from_dict(config.image_spec).for_data(shards.images).image_decoder())


def print_load_report(path: str, report) -> None:
    print(f"loaded {path}" + "".join(f"; {note}" for note in report.adapted)
          + (f"; {len(report.missing)} backbone key(s) missing, {len(report.unexpected)} unexpected "
             "(--allow-missing)" if report.missing or report.unexpected else ""), flush=True)
