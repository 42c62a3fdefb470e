"""``simmim pretrain``: check data and model, build the SimMIM task and its stream, train."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .. import dali, distributed
from ..config import PretrainConfig
from ..data_sources import labelled_shards, mixture_summary, training_shards
from ..defaults import choose_pretrain
from ..errors import SimmimError
from ..image_spec import ImageSpec, fix_image_spec
from ..masking import MaskGenerator
from ..models import build_simmim
from ..pipeline import EvalStream, ShardStream
from ..shards import resolve_shards, write_shards
from ..tasks import PretrainTask, Task
from ..transforms import CropTransform, PretrainTransform, pretrain_decode_size
from .training import prepare_data, prepare_run, run_training


def _prepare_demo(config: PretrainConfig) -> None:
    """Writes the demo image set into the run folder as shards and points ``--data`` at them."""
    from ..demo import make_demo_images

    shards = Path(config.output) / "demo-shards"
    if not (shards / "_info.json").is_file():
        with tempfile.TemporaryDirectory() as folder:
            write_shards(make_demo_images(Path(folder)), shards, maxcount=160, seed=config.seed)
    config.data = str(shards)


def check_model(config: PretrainConfig) -> int:
    """Builds the model on the meta device (no memory) so bad --model/--model-kwargs/sizes fail before launching;
    returns its patch size."""
    with torch.device("meta"):
        return build_simmim(config.model, config.img_size, config.model_kwargs, config.drop_path).patch_size


def check_masks(config: PretrainConfig, patch_size: int) -> None:
    MaskGenerator(config.img_size, config.mask_patch_size, patch_size, config.mask_ratio)


def prepare_pretrain(config: PretrainConfig) -> None:
    """Fixes the run folder and checks data and model, so that mistakes surface before any worker starts."""
    if config.decode == "gpu":
        dali.require_dali(config.device)
    prepare_run(config)
    if config.demo:
        Path(config.output).mkdir(parents=True, exist_ok=True)
        _prepare_demo(config)
    prepare_data(config, "data", "val_data")
    prepare_data(config, "knn_data", "knn_val_data", labels=True)
    shards = training_shards(config.data, config.epoch_size)
    spec = fix_image_spec(config, shards.images)  # the channels and normalisation the model takes
    if config.val_data:
        spec.for_data(resolve_shards(config.val_data).images, "--val-data")
    if config.knn_data:
        bank, queries = labelled_shards(config.knn_data, option="--knn-data"), labelled_shards(
            config.knn_val_data, option="--knn-val-data")
        if bank.classes != queries.classes:
            raise SimmimError(f"--knn-val-data has other classes than --knn-data ({len(queries.classes)} vs "
                              f"{len(bank.classes)}); make both from folders with the same class sub-folders")
        spec.for_data(bank.images, "--knn-data"), spec.for_data(queries.images, "--knn-val-data")
    patch_size = check_model(config)
    summary = choose_pretrain(config, shards.num_samples, patch_size)
    check_masks(config, patch_size)
    report = "\n".join(filter(None, [mixture_summary(shards), summary]))
    if config.node_rank == 0 and report:  # every node makes the same choices; node 0 reports them
        print(report, flush=True)  # after the checks, so that a mistake stays a one-line error
    if config.decode == "gpu":
        dali.ensure_indexes(shards)


def build_pretrain(config: PretrainConfig, context: distributed.Context) -> tuple[Task, ShardStream]:
    shards = training_shards(config.data, config.epoch_size)
    spec = ImageSpec.from_dict(config.image_spec)
    model = build_simmim(config.model, config.img_size, config.model_kwargs, config.drop_path)
    masks = MaskGenerator(config.img_size, config.mask_patch_size, model.patch_size, config.mask_ratio)
    if config.decode == "gpu":
        dataset = dali.DaliStream(shards, dali.pretrain_augment(config.img_size), config.batch_size, context.device,
                                  rank=context.rank, world_size=context.world_size, seed=config.seed,
                                  workers=config.workers, masks=masks,
                                  accumulation=config.grad_accum)
    else:
        dataset = ShardStream(
            shards, PretrainTransform(config.img_size, masks), config.batch_size, workers=config.workers,
            rank=context.rank, world_size=context.world_size, seed=config.seed, accumulation=config.grad_accum,
            decode=spec.tensor_decoder(min_size=pretrain_decode_size(config.img_size)),
        )
    val = knn = None
    if config.val_data:  # centre crops of held-out images
        held_out = resolve_shards(config.val_data)
        val = EvalStream(held_out, CropTransform(config.img_size, 1.0), config.batch_size, workers=config.workers,
                         rank=context.rank, world_size=context.world_size, labels=False,
                         decode=spec.for_data(held_out.images).image_decoder())
    if config.knn_data:  # scored on rank 0 only, at each checkpoint
        bank, queries = labelled_shards(config.knn_data), labelled_shards(config.knn_val_data)
        streams = [EvalStream(s, CropTransform(config.img_size), config.batch_size, workers=config.workers,
                              num_classes=len(bank.classes), decode=spec.for_data(s.images).image_decoder())
                   for s in (bank, queries)]
        knn = (*streams, len(bank.classes))
    return PretrainTask(model, config, val, masks, knn), dataset


def pretrain(config: PretrainConfig) -> None:
    """``simmim pretrain``."""
    run_training(config, prepare_pretrain, build_pretrain)
