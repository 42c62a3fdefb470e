"""Training tasks (what a batch's loss is) and the functions the CLI calls to run them."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoints, distributed
from .config import EvaluateConfig, FinetuneConfig, LinearProbeConfig, PretrainConfig, TrainConfig, from_dict
from .data import (
    ClassifierTrainTransform,
    CropTransform,
    EvalStream,
    PretrainTransform,
    ShardSet,
    ShardStream,
    decode_tensor,
    make_loader,
    normalize,
    pretrain_decode_size,
    resolve_shards,
    write_shards,
)
from .engine import Task, Trainer, autocast, resolve_precision, resolve_run_paths
from .errors import SimmimError
from .evaluation import evaluate_classifier, image_logits
from .masking import MaskGenerator
from .models import FeatureExtractor, SimMIM, build_simmim, create_backbone, masked_l1_per_image, model_family
from .optim import build_optimizer
from .visualize import recon_panel, save_png
from .weights import architecture_of, classifier_kwargs, load_encoder, read_weights

PREVIEW_IMAGES = 8


class PretrainTask(Task):
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
    """Fixes the run folder and checks data and model, so that mistakes surface before any worker starts."""
    _prepare_run(config)
    if config.demo:
        Path(config.output).mkdir(parents=True, exist_ok=True)
        _prepare_demo(config)
    resolve_shards(config.data, epoch_size=config.epoch_size)
    _check_model(config)


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


# ---------------------------------------------------------------------------------------------- running


def run_training(config: TrainConfig, prepare, build) -> None:
    """Trains here, in ``--gpus``/``--nproc`` workers, or as one worker of torchrun/SLURM.

    ``prepare(config)`` checks inputs and fixes paths once, before any worker starts (under torchrun/SLURM: on
    rank 0, which hands the result to the others); ``build(config, context) -> (task, dataset)`` runs in every
    training process.
    """
    if distributed.launched_env() is not None:
        _train_process(config, prepare, build, prepare_here=True)
        return
    prepare(config)
    if distributed.needs_launch(config):
        distributed.launch(_train_process, config, prepare, build, False)
    else:
        _train_process(config, prepare, build, False)


def _train_process(config: TrainConfig, prepare, build, prepare_here: bool) -> None:
    context = distributed.setup(config)
    try:
        if prepare_here and context.is_main:
            prepare(config)
        config = distributed.broadcast_object(config)  # rank 0's paths and resolved settings on every rank
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        task, dataset = build(config, context)
        torch.manual_seed(config.seed + context.rank)  # different dropout and drop-path draws per rank
        Trainer(task, config, context).fit(dataset, max_steps=config.max_steps or None)
    finally:
        distributed.teardown()


def _prepare_run(config: TrainConfig) -> None:
    """The run folder; on the other nodes of a multi-node job it is node 0's business."""
    distributed.check_devices(config)
    if config.node_rank == 0:
        resolve_run_paths(config)


# ---------------------------------------------------------------------------------------------- classifiers


def labelled_shards(data: str, epoch_size: int | None = None, option: str = "--data") -> ShardSet:
    """Shards with labels and class names, or a clear error."""
    shards = resolve_shards(data, epoch_size=epoch_size)
    if not shards.classes:
        raise SimmimError(f"{option} {data} has no class names in _info.json, so no labels; make the shards from a "
                          "folder with one sub-folder per class (simmim make-shards IMAGES/ OUT/)")
    return shards


def _resolve_classifier(config: FinetuneConfig | LinearProbeConfig, keep_pretrain_architecture: bool) -> None:
    """Fixes model, kwargs and image size from --pretrained (explicit options win), and checks that the weights
    fit and the image size works, on the meta device (no memory, no compute)."""
    shards = labelled_shards(config.data, config.epoch_size)
    if config.val_data:
        val = labelled_shards(config.val_data, option="--val-data")
        if val.classes != shards.classes:
            raise SimmimError(f"--val-data has other classes than --data ({len(val.classes)} vs "
                              f"{len(shards.classes)}); make both from folders with the same class sub-folders")
    weights = read_weights(config.pretrained) if config.pretrained else None
    if weights is not None:
        name, kwargs, img_size = architecture_of(weights)
        if not keep_pretrain_architecture:
            kwargs = classifier_kwargs(config.model or name, kwargs)
        config.model = config.model or name
        config.model_kwargs = {**kwargs, **config.model_kwargs}
        config.img_size = config.img_size or img_size
    config.img_size = config.img_size or 224
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "copying into a meta parameter is a no-op": we know
        model = _make_classifier(config, len(shards.classes), keep_pretrain_architecture)
        if weights is not None:
            load_encoder(model.backbone if hasattr(model, "backbone") else model, weights, config.allow_missing)
        patch = (model.backbone if hasattr(model, "backbone") else model).patch_embed.patch_size[0]
        if config.img_size % patch:
            raise SimmimError(f"--img-size {config.img_size} is not a multiple of {config.model}'s patch size {patch}; "
                              f"use e.g. {round(config.img_size / patch) * patch}")
        try:
            model.eval()(torch.empty(2, 3, config.img_size, config.img_size))
        except (AssertionError, RuntimeError, ValueError) as error:
            raise SimmimError(f"--img-size {config.img_size} does not work with {config.model}: "
                              f"{str(error).splitlines()[0]}; choose a size the model takes") from error


def _make_classifier(config, num_classes: int, probe: bool) -> nn.Module:
    if probe:
        backbone = create_backbone(config.model, config.img_size, config.model_kwargs, 0.0, num_classes=0,
                                   norm_all_tokens=True)
        return ProbeModel(FeatureExtractor(backbone, config.layer, config.pool), num_classes)
    kwargs = {**config.model_kwargs, **({"global_pool": config.global_pool} if config.global_pool else {})}
    return create_backbone(config.model, config.img_size, kwargs, config.drop_path, num_classes=num_classes,
                           norm_all_tokens=False)


def save_model_file(path: Path, kind: str, model: nn.Module, config: TrainConfig, classes: list[str],
                    metrics: dict[str, Any]) -> None:
    """A weights-only checkpoint for evaluate, export and predict: model, config, class names, metrics."""
    checkpoints.save_checkpoint({"kind": kind, "model": model.state_dict(), "config": config.to_dict(),
                                 "classes": classes, "metrics": metrics}, path)


class ClassifierTask(Task):
    """Shared by finetune and linear-probe: evaluation each epoch, ``best.pth`` and ``last.pth``."""

    def __init__(self, model: nn.Module, config: TrainConfig, classes: list[str], val: EvalStream | None):
        self.model = model
        self.config = config
        self.classes = classes
        self.val = val
        self.best_top1: float | None = None

    def evaluation_model(self) -> nn.Module:
        return self.model

    def predict(self, model: nn.Module):
        device = next(model.parameters()).device
        return image_logits(model, lambda: autocast(resolve_precision(self.config.precision, device), device))

    def after_epoch(self, output: Path, epoch: int, step: int) -> dict[str, float]:
        figures: dict[str, float] = {}
        if self.val is not None:
            model = self.evaluation_model()
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            result = evaluate_classifier(self.predict(model), make_loader(self.val), len(self.classes), device)
            model.train(was_training)
            figures = {k: result[k] for k in ("val_top1", "val_top5", "val_loss")}
        if distributed.is_main():
            save_model_file(output / "last.pth", self.kind, self.evaluation_model(), self.config, self.classes,
                            {"epoch": epoch, "step": step, **figures})
            if figures and (self.best_top1 is None or figures["val_top1"] > self.best_top1):
                self.best_top1 = figures["val_top1"]
                save_model_file(output / "best.pth", self.kind, self.evaluation_model(), self.config, self.classes,
                                {"epoch": epoch, "step": step, **figures})
        self.best_top1 = distributed.broadcast_object(self.best_top1)
        return figures

    def extra_state(self) -> dict[str, Any]:
        return {"classes": self.classes, "best_top1": self.best_top1}

    def load_extra_state(self, checkpoint: dict[str, Any]) -> None:
        self.best_top1 = checkpoint.get("best_top1")


class FinetuneTask(ClassifierTask):
    """Fine-tuning: cross-entropy with label smoothing, Mixup/CutMix and random erasing (timm's), optional EMA."""

    kind = "finetune"

    def __init__(self, model: nn.Module, config: FinetuneConfig, classes: list[str], val: EvalStream | None):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        super().__init__(model, config, classes, val)
        self.mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                               label_smoothing=config.label_smoothing, num_classes=len(classes))
            self.criterion = SoftTargetCrossEntropy()
        elif config.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(config.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.random_erasing = None
        self.ema = None

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(self.model, lr, self.config.weight_decay, layer_decay=self.config.layer_decay)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = normalize(batch["image"]), batch["label"]
        if self.config.reprob > 0:
            if self.random_erasing is None:
                from timm.data.random_erasing import RandomErasing

                self.random_erasing = RandomErasing(self.config.reprob, mode="pixel", device=images.device)
            images = self.random_erasing(images)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        return {"loss": self.criterion(model(images), labels)}

    def _ensure_ema(self) -> None:
        if self.config.model_ema and self.ema is None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=self.config.model_ema_decay)

    def after_optimizer_step(self, step: int) -> None:
        if self.config.model_ema:
            self._ensure_ema()
            self.ema.update(self.model, step=step)

    def evaluation_model(self) -> nn.Module:
        """With --model-ema the averaged weights are the ones evaluated and kept."""
        return self.ema.module if self.ema is not None else self.model

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return state

    def load_extra_state(self, checkpoint: dict[str, Any]) -> None:
        super().load_extra_state(checkpoint)
        if "model_ema" in checkpoint:
            self._ensure_ema()
            self.ema.module.load_state_dict(checkpoint["model_ema"])


def prepare_finetune(config: FinetuneConfig) -> None:
    _prepare_run(config)
    _resolve_classifier(config, keep_pretrain_architecture=False)
    if config.layer_decay is None:  # the official values: ViT-B 0.65; Swin-B 0.9 (100-epoch pretraining)
        config.layer_decay = 0.9 if model_family(config.model).startswith("swin") else 0.65


def _val_stream(config, context, classes: list[str], transform) -> EvalStream | None:
    if not config.val_data:
        return None
    return EvalStream(labelled_shards(config.val_data, option="--val-data"), transform, config.batch_size,
                      workers=config.workers, rank=context.rank, world_size=context.world_size,
                      num_classes=len(classes))


def build_finetune(config: FinetuneConfig, context: distributed.Context) -> tuple[Task, ShardStream]:
    shards = labelled_shards(config.data, config.epoch_size)
    classes = shards.classes
    model = _make_classifier(config, len(classes), probe=False)
    if config.pretrained:
        report = load_encoder(model, read_weights(config.pretrained), config.allow_missing)
        if context.is_main:
            _print_load_report(config.pretrained, report)
    augment = ClassifierTrainTransform(config.img_size, config.auto_augment, config.color_jitter,
                                       config.min_crop_scale, config.hflip)
    dataset = ShardStream(shards, augment,
                          config.batch_size, workers=config.workers, rank=context.rank,
                          world_size=context.world_size, seed=config.seed, labels=True, num_classes=len(classes))
    val = _val_stream(config, context, classes, CropTransform(config.img_size, config.crop_pct))
    return FinetuneTask(model, config, classes, val), dataset


def _print_load_report(path: str, report) -> None:
    print(f"loaded {path}" + "".join(f"; {note}" for note in report.adapted)
          + (f"; {len(report.missing)} backbone key(s) missing, {len(report.unexpected)} unexpected "
             "(--allow-missing)" if report.missing or report.unexpected else ""), flush=True)


def finetune(config: FinetuneConfig) -> None:
    """``simmim finetune``."""
    run_training(config, prepare_finetune, build_finetune)


# ---------------------------------------------------------------------------------------------- linear probe


class ProbeModel(nn.Module):
    """A frozen encoder (always in eval mode) and a trainable BatchNorm (no affine) + linear head."""

    def __init__(self, extractor: FeatureExtractor, num_classes: int):
        super().__init__()
        self.extractor = extractor
        self.extractor.requires_grad_(False)
        self.head = nn.Sequential(nn.BatchNorm1d(extractor.num_features, affine=False, eps=1e-6),
                                  nn.Linear(extractor.num_features, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    @property
    def backbone(self) -> nn.Module:
        return self.extractor.backbone

    def train(self, mode: bool = True) -> ProbeModel:
        super().train(mode)
        self.extractor.eval()  # frozen means frozen: no dropout, no drop path, no batch statistics
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.extractor(images).float()

    def forward(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(images) if features is None else features)


class LinearProbeTask(ClassifierTask):
    kind = "linear-probe"

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(self.model.head, lr, self.config.weight_decay, name=self.config.optimizer,
                               momentum=0.9)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "features" in batch:
            logits = model(features=batch["features"])
        else:
            logits = model(normalize(batch["image"]))
        return {"loss": nn.functional.cross_entropy(logits, batch["label"])}

    def set_grad_checkpointing(self) -> None:
        """Nothing to recompute: the encoder runs without gradients."""

    def predict(self, model: nn.Module):
        if isinstance(self.val, TensorStream):
            return lambda batch: model(features=batch["features"])
        return super().predict(model)


class TensorStream(torch.utils.data.IterableDataset):
    """Cached features: every epoch a new shuffle (seed, epoch), dealt out to ranks in whole batches.
    With ``shuffle=False`` it is an evaluation stream (every sample once, the last batch short)."""

    workers = 0

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.features, self.labels = features, labels
        self.batch_size, self.rank, self.world_size, self.seed, self.shuffle = (
            batch_size, rank, world_size, seed, shuffle)
        self.batches_per_epoch = max(1, len(labels) // (batch_size * world_size))
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self):
        count = len(self.labels)
        if not self.shuffle:
            mine = torch.arange(self.rank, count, self.world_size)
            for start in range(0, len(mine), self.batch_size):
                index = mine[start:start + self.batch_size]
                yield {"features": self.features[index], "label": self.labels[index]}
            return
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        if count < self.batch_size * self.world_size:  # fewer samples than one global batch: repeat them
            order = order.repeat(-(-self.batch_size * self.world_size // count))
        for batch in range(self.skip, self.batches_per_epoch):
            start = (batch * self.world_size + self.rank) * self.batch_size
            index = order[start:start + self.batch_size]
            yield {"features": self.features[index], "label": self.labels[index]}


def prepare_linear_probe(config: LinearProbeConfig) -> None:
    _prepare_run(config)
    _resolve_classifier(config, keep_pretrain_architecture=True)
    if config.cache_features and config.cache_dir is None:
        config.cache_dir = str(Path(config.output) / "features")


def _cache_key(config: LinearProbeConfig, data: str) -> str:
    source = Path(config.pretrained).resolve() if config.pretrained else None
    stamp = [str(source), source.stat().st_size, source.stat().st_mtime_ns] if source else ["random", config.seed]
    description = {"weights": stamp, "model": config.model, "kwargs": config.model_kwargs, "size": config.img_size,
                   "crop": config.crop_pct, "layer": config.layer, "pool": config.pool,
                   "data": resolve_shards(data).urls}
    return hashlib.sha1(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def cached_features(model: ProbeModel, config: LinearProbeConfig, data: str, context: distributed.Context,
                    classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every sample of ``data`` (centre crops), computed once and kept under --cache-dir.

    Each rank extracts its share into its own file; then every rank reads all files."""
    folder = Path(config.cache_dir) / _cache_key(config, data)
    parts = [folder / f"part-{rank:03d}-of-{context.world_size:03d}.pt" for rank in range(context.world_size)]
    if not all(p.is_file() for p in parts):
        stream = EvalStream(resolve_shards(data), CropTransform(config.img_size, config.crop_pct), config.batch_size,
                            workers=config.workers, rank=context.rank, world_size=context.world_size,
                            num_classes=len(classes))
        device, precision = context.device, resolve_precision(config.precision, context.device)
        model.to(device).eval()
        features, labels = [], []
        for batch in make_loader(stream):
            if batch["label"].numel():
                with autocast(precision, device):
                    features.append(model.features(normalize(batch["image"].to(device))).cpu())
                labels.append(batch["label"])
        folder.mkdir(parents=True, exist_ok=True)
        checkpoints.save_checkpoint({"features": torch.cat(features) if features else torch.empty(0),
                                     "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)},
                                    parts[context.rank])
        distributed.barrier()
    loaded = [checkpoints.load_checkpoint(p) for p in parts]
    return torch.cat([p["features"] for p in loaded]), torch.cat([p["labels"] for p in loaded])


def build_linear_probe(config: LinearProbeConfig, context: distributed.Context) -> tuple[Task, Any]:
    shards = labelled_shards(config.data, config.epoch_size)
    classes = shards.classes
    model = _make_classifier(config, len(classes), probe=True)
    if config.pretrained:
        report = load_encoder(model.backbone, read_weights(config.pretrained), config.allow_missing)
        if context.is_main:
            _print_load_report(config.pretrained, report)
    if config.cache_features:
        features, labels = cached_features(model, config, config.data, context, classes)
        dataset = TensorStream(features, labels, config.batch_size, context.rank, context.world_size, config.seed)
        val = None
        if config.val_data:
            val_features, val_labels = cached_features(model, config, config.val_data, context, classes)
            val = TensorStream(val_features, val_labels, config.batch_size, context.rank, context.world_size,
                               shuffle=False)
    else:
        dataset = ShardStream(shards, CropTransform(config.img_size, random=True), config.batch_size,
                              workers=config.workers, rank=context.rank, world_size=context.world_size,
                              seed=config.seed, labels=True, num_classes=len(classes))
        val = _val_stream(config, context, classes, CropTransform(config.img_size, config.crop_pct))
    return LinearProbeTask(model, config, classes, val), dataset


def linear_probe(config: LinearProbeConfig) -> None:
    """``simmim linear-probe``."""
    run_training(config, prepare_linear_probe, build_linear_probe)


# ---------------------------------------------------------------------------------------------- evaluate


def load_classifier(path: str | Path) -> tuple[nn.Module, TrainConfig, list[str]]:
    """A finetune or linear-probe checkpoint → (model in eval mode, its run config, class names)."""
    weights = read_weights(path)
    config_class = {"finetune": FinetuneConfig, "linear-probe": LinearProbeConfig}.get(weights.kind or "")
    if config_class is None:
        raise SimmimError(f"{path} is a {weights.source} checkpoint, not a classifier; give the best.pth or "
                          "last.pth of a simmim finetune or linear-probe run")
    config = from_dict(config_class, weights.config or {}, strict=False)
    classes = weights.classes or [str(i) for i in range(_head_size(weights.encoder))]
    model = _make_classifier(config, len(classes), probe=weights.kind == "linear-probe")
    try:
        model.load_state_dict(weights.encoder)
    except RuntimeError as error:
        raise SimmimError(f"{path} does not fit the model its config describes: "
                          f"{str(error).splitlines()[1].strip()}") from error
    return model.eval(), config, classes


def _head_size(state: dict[str, torch.Tensor]) -> int:
    heads = [v for k, v in state.items() if k.endswith("weight") and k.startswith(("head", "head.fc"))]
    return heads[-1].shape[0] if heads else 0


def newest_classifier(runs_root: Path = Path("runs")) -> Path | None:
    """best.pth (else last.pth) of the newest finetune or linear-probe run."""
    found = [p for pattern in ("finetune-*/best.pth", "finetune-*/last.pth", "linear-probe-*/best.pth",
                               "linear-probe-*/last.pth") for p in runs_root.glob(pattern)]
    if not found:
        return None
    newest_run = max({p.parent for p in found}, key=lambda run: max(q.stat().st_mtime for q in run.glob("*.pth")))
    return newest_run / "best.pth" if (newest_run / "best.pth").is_file() else newest_run / "last.pth"


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """``simmim evaluate``: top-1/top-5 over every sample once, per-class accuracy and a confusion matrix."""
    from .data import labelled_source
    from .evaluation import write_report

    if config.checkpoint is None:
        found = newest_classifier()
        if found is None:
            raise SimmimError("no --checkpoint given and no finetune or linear-probe run under runs/; "
                              "give --checkpoint PATH")
        config.checkpoint = str(found)
    if Path(config.checkpoint).suffix == ".onnx":  # an exported model, e.g. to measure what --int8 costs
        from .export import OnnxClassifier

        model = OnnxClassifier(config.checkpoint, config.device)
        if not model.classes:
            raise SimmimError(f"{config.checkpoint} has no class names in its metadata; export it with simmim export")
        classes, img_size, crop_pct = model.classes, model.img_size, config.crop_pct or model.crop_pct
        device, precision = torch.device("cpu"), "fp32"  # onnxruntime places the work itself
    else:
        model, train_config, classes = load_classifier(config.checkpoint)
        img_size, crop_pct = train_config.img_size, config.crop_pct or train_config.crop_pct
        device = distributed.pick_device(config.device)
        model.to(device)
        precision = resolve_precision(config.precision, device)
    source, data_classes, count = labelled_source(config.data)
    if data_classes is not None and data_classes != classes:
        unknown = sorted(set(data_classes) - set(classes))
        if unknown:
            raise SimmimError(f"--data has classes the checkpoint does not know ({', '.join(unknown[:5])}); "
                              f"it was trained on: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}")
        if isinstance(source, list):  # a folder: map its class indices to the checkpoint's
            source = [(path, classes.index(data_classes[label])) for path, label in source]
        else:
            raise SimmimError("the shards' class list differs from the checkpoint's; re-make them with the same "
                              "class folders")
    output = Path(config.output or Path("runs") / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}")
    if (output / "metrics.json").exists() and not config.force:
        raise SimmimError(f"{output} already holds an evaluation; pass --force to replace it or choose --output")
    stream = EvalStream(source, CropTransform(img_size, crop_pct), config.batch_size,
                        workers=config.workers, num_classes=len(classes))
    from rich.progress import Progress

    with Progress(disable=not sys.stdout.isatty()) as progress:
        task = progress.add_task("evaluating", total=count)

        def batches():
            for batch in make_loader(stream):
                progress.advance(task, batch["label"].numel() + len(batch["skipped"]))
                yield batch

        result = evaluate_classifier(image_logits(model, lambda: autocast(precision, device)), batches(),
                                     len(classes), device, with_confusion=True)
    paths = write_report(output, result, classes, str(config.checkpoint))
    return {**result, "paths": paths, "classes": classes, "checkpoint": config.checkpoint}

