"""Training tasks (what a batch's loss is) and the functions the CLI calls to run them."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .config import PretrainConfig
from .data import (
    PretrainTransform,
    ShardStream,
    decode_tensor,
    normalize,
    pretrain_decode_size,
    resolve_shards,
    write_shards,
)
from .engine import Trainer, resolve_run_paths
from .masking import MaskGenerator
from .models import SimMIM, build_simmim, masked_l1_per_image
from .optim import build_optimizer
from .visualize import recon_panel, save_png

PREVIEW_IMAGES = 8


class PretrainTask:
    """SimMIM: the masked L1 loss of the reconstruction, and a reconstruction preview with every checkpoint."""

    kind = "pretrain"

    def __init__(self, model: SimMIM, config: PretrainConfig):
        self.model = model
        self.config = config
        self.preview: dict[str, torch.Tensor] | None = None  # the first images seen, reused for every preview

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(self.model, lr, self.config.weight_decay)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss, _ = model(normalize(batch["image"]), batch["mask"])
        return {"loss": loss}

    def observe_batch(self, batch: dict[str, Any]) -> None:
        if self.preview is None:
            self.preview = {k: batch[k][:PREVIEW_IMAGES].clone() for k in ("image", "mask")}

    def set_grad_checkpointing(self) -> None:
        self.model.encoder.backbone.set_grad_checkpointing(True)

    @torch.no_grad()
    def after_checkpoint(self, output: Path, step: int) -> dict[str, float]:
        if self.preview is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        images = normalize(self.preview["image"].to(device))
        mask = self.preview["mask"].to(device)
        _, reconstruction = self.model(images, mask)
        losses = masked_l1_per_image(images, reconstruction, mask, self.model.patch_size)
        captions = [f"masked L1 {value:.3f}" for value in losses.tolist()]
        save_png(recon_panel(images, mask, reconstruction, self.model.patch_size, captions),
                 output / f"preview-{step:08d}.png")
        self.model.train(was_training)
        return {"preview_loss": round(float(losses.mean()), 5)}


def _prepare_demo(config: PretrainConfig) -> None:
    """Writes the demo image set into the run folder as shards and points ``--data`` at them."""
    from .demo import make_demo_images

    shards = Path(config.output) / "demo-shards"
    if not (shards / "_info.json").is_file():
        with tempfile.TemporaryDirectory() as folder:
            write_shards(make_demo_images(Path(folder)), shards, maxcount=160, seed=config.seed)
    config.data = str(shards)


def _check_model(config: PretrainConfig) -> None:
    """Builds the model on the meta device (no memory) so bad --model/--model-kwargs/sizes fail before launching."""
    with torch.device("meta"):
        model = build_simmim(config.model, config.img_size, config.model_kwargs, config.drop_path)
    MaskGenerator(config.img_size, config.mask_patch_size, model.patch_size, config.mask_ratio)


def prepare_pretrain(config: PretrainConfig) -> None:
    """Fixes the run folder and checks data and model, so that mistakes surface before any worker starts.

    On the other nodes of a multi-node job the run folder is node 0's business (its rank 0 hands its paths to
    every rank when training starts)."""
    distributed.check_devices(config)
    if config.node_rank == 0:
        resolve_run_paths(config)
    if config.demo:
        Path(config.output).mkdir(parents=True, exist_ok=True)
        _prepare_demo(config)
    resolve_shards(config.data, epoch_size=config.epoch_size)
    _check_model(config)


def pretrain(config: PretrainConfig) -> None:
    """``simmim pretrain``: trains here, in ``--gpus``/``--nproc`` workers, or as one worker of torchrun/SLURM."""
    if distributed.launched_env() is not None:
        run_pretrain(config, prepare=True)
        return
    prepare_pretrain(config)
    if distributed.needs_launch(config):
        distributed.launch(run_pretrain, config)
    else:
        run_pretrain(config)


def run_pretrain(config: PretrainConfig, prepare: bool = False) -> None:
    """One training process (of one or many). ``prepare``: started by torchrun/SLURM, so rank 0 prepares the
    run and the others take its paths."""
    context = distributed.setup(config)
    try:
        if prepare and context.is_main:
            prepare_pretrain(config)
        # every rank takes rank 0's run folder, checkpoint and data (other nodes did not resolve them)
        config.output, config.resume, config.data = distributed.broadcast_object(
            (config.output, config.resume, config.data))
        shards = resolve_shards(config.data, epoch_size=config.epoch_size)
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = build_simmim(config.model, config.img_size, config.model_kwargs, config.drop_path)
        torch.manual_seed(config.seed + context.rank)  # different drop-path draws per rank
        masks = MaskGenerator(config.img_size, config.mask_patch_size, model.patch_size, config.mask_ratio)
        dataset = ShardStream(
            shards, PretrainTransform(config.img_size, masks), config.batch_size, workers=config.workers,
            rank=context.rank, world_size=context.world_size, seed=config.seed,
            decode=functools.partial(decode_tensor, min_size=pretrain_decode_size(config.img_size)),
        )
        Trainer(PretrainTask(model, config), config, context).fit(dataset, max_steps=config.max_steps or None)
    finally:
        distributed.teardown()
