"""``simmim pretrain``: check data and model, build the SimMIM task and its stream, train."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from .. import distributed
from ..config import PretrainConfig
from ..defaults import choose_pretrain
from ..masking import MaskGenerator
from ..models import build_simmim
from ..pipeline import ShardStream
from ..shards import resolve_shards, write_shards
from ..tasks import PretrainTask, Task
from ..transforms import PretrainTransform, decode_tensor, pretrain_decode_size
from .training import prepare_run, run_training


def _prepare_demo(config: PretrainConfig) -> None:
    """Writes the demo image set into the run folder as shards and points ``--data`` at them."""
    from ..demo import make_demo_images

    shards = Path(config.output) / "demo-shards"
    if not (shards / "_info.json").is_file():
        with tempfile.TemporaryDirectory() as folder:
            write_shards(make_demo_images(Path(folder)), shards, maxcount=160, seed=config.seed)
    config.data = str(shards)


def check_model(config: PretrainConfig) -> None:
    """Builds the model on the meta device (no memory) so bad --model/--model-kwargs/sizes fail before launching."""
    with torch.device("meta"):
        model = build_simmim(config.model, config.img_size, config.model_kwargs, config.drop_path)
    MaskGenerator(config.img_size, config.mask_patch_size, model.patch_size, config.mask_ratio)


def prepare_pretrain(config: PretrainConfig) -> None:
    """Fixes the run folder and checks data and model, so that mistakes surface before any worker starts."""
    prepare_run(config)
    if config.demo:
        Path(config.output).mkdir(parents=True, exist_ok=True)
        _prepare_demo(config)
    shards = resolve_shards(config.data, epoch_size=config.epoch_size)
    summary = choose_pretrain(config, shards.num_samples)
    check_model(config)
    if config.node_rank == 0:  # every node makes the same choices; node 0 reports them
        print(summary, flush=True)  # after the checks, so that a mistake stays a one-line error


def build_pretrain(config: PretrainConfig, context: distributed.Context) -> tuple[Task, ShardStream]:
    shards = resolve_shards(config.data, epoch_size=config.epoch_size)
    model = build_simmim(config.model, config.img_size, config.model_kwargs, config.drop_path)
    masks = MaskGenerator(config.img_size, config.mask_patch_size, model.patch_size, config.mask_ratio)
    dataset = ShardStream(
        shards, PretrainTransform(config.img_size, masks), config.batch_size, workers=config.workers,
        rank=context.rank, world_size=context.world_size, seed=config.seed,
        decode=functools.partial(decode_tensor, min_size=pretrain_decode_size(config.img_size)),
    )
    return PretrainTask(model, config), dataset


def pretrain(config: PretrainConfig) -> None:
    """``simmim pretrain``."""
    run_training(config, prepare_pretrain, build_pretrain)
