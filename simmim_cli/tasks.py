"""Training tasks, what a batch's loss is: SimMIM pretraining, fine-tuning and linear probing.

A task owns the model and its optimizer's parameter groups and says how to compute the loss of a batch; the
engine (``engine.py``) does everything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoints, distributed, parallelize, storage
from .config import FinetuneConfig, PretrainConfig, TrainConfig
from .evaluation import evaluate_classifier, image_logits, knn_classify
from .features import extract_features
from .image_spec import ImageSpec
from .masking import MaskGenerator
from .models import FeatureExtractor, SimMIM, masked_l1_per_image
from .optim import build_optimizer
from .pipeline import EvalStream, TensorStream, make_loader
from .precision import autocast, resolve_precision
from .storage import StorageError
from .visualize import confusion_png, prune_previews, recon_panel, save_png

MAX_NONFINITE_IN_A_ROW = 25  # fp16 loss scaling may skip a few steps at the start; 25 in a row is divergence


class Task:
    """What a training command trains and how; the engine calls these hooks. Subclasses set ``kind`` and
    ``model`` and implement :meth:`build_optimizer` and :meth:`training_step`; the other hooks do nothing."""

    kind: str
    model: nn.Module
    spec: ImageSpec  # what the model takes, and how its images are normalised on the training device

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Returns at least ``{"loss": scalar}``; ``model`` is the (compiled, DDP-wrapped) training module."""
        raise NotImplementedError

    def observe_batch(self, batch: dict[str, Any]) -> None:
        """Sees each training batch, on the training device (e.g. to keep a few images for previews)."""

    def after_optimizer_step(self, step: int) -> None:
        """After each optimizer step, on every rank (e.g. to update an EMA of the weights)."""

    def after_checkpoint(self, output: Path, step: int) -> dict[str, float]:
        """Rank-0 work after a checkpoint (previews); returns figures to log."""
        return {}

    def after_epoch(self, output: Path, epoch: int, step: int) -> dict[str, float]:
        """At each epoch's end, on every rank (evaluation); returns figures to log."""
        return {}

    def set_grad_checkpointing(self) -> None:
        """Recompute activations in the backward pass to save memory."""
        self.model.set_grad_checkpointing(True)

    def sharded_modules(self) -> list[nn.Module]:
        """What ``--shard-model`` shards (each a root of its own), asked once, before the sharding: the model, and
        any copy of it the task keeps (a sharded module cannot be copied)."""
        return [self.model]

    def extra_state(self) -> dict[str, Any]:
        """More to save in checkpoints (plain values and tensors only)."""
        return {}

    def load_extra_state(self, checkpoint: dict[str, Any]) -> None:
        """Takes back what :meth:`extra_state` saved."""


PREVIEW_IMAGES = 8


class PretrainTask(Task):
    """SimMIM: the masked L1 loss of the reconstruction; a reconstruction preview (and with ``knn`` a k-NN score)
    with every checkpoint; with ``val`` the masked L1 of held-out images after every epoch."""

    kind = "pretrain"

    def __init__(self, model: SimMIM, config: PretrainConfig, val: EvalStream | None = None,
                 masks: MaskGenerator | None = None, knn: tuple[EvalStream, EvalStream, int] | None = None):
        self.model = model
        self.config = config
        self.spec = ImageSpec.from_dict(config.image_spec)
        self.preview: dict[str, torch.Tensor] | None = None  # the first images seen, reused for every preview
        self.val = val  # centre crops of held-out images, masked by ``masks`` with a fixed seed each epoch
        self.masks = masks
        self.knn = knn  # (memory bank stream, query stream, number of classes)

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(self.model, lr, self.config.weight_decay, param_groups=self.config.param_groups)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss, _ = model(self.spec.normalize(batch["image"]), batch["mask"])
        return {"loss": loss}

    def observe_batch(self, batch: dict[str, Any]) -> None:
        if self.preview is None:
            self.preview = {k: batch[k][:PREVIEW_IMAGES].clone() for k in ("image", "mask")}

    def set_grad_checkpointing(self) -> None:
        self.model.encoder.backbone.set_grad_checkpointing(True)

    @torch.no_grad()
    def after_checkpoint(self, output: Path, step: int) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        if self.preview is not None:
            images = self.spec.normalize(self.preview["image"].to(device))
            mask = self.preview["mask"].to(device)
            _, reconstruction = self.model(images, mask)
            losses = masked_l1_per_image(images, reconstruction, mask, self.model.patch_size)
            captions = [f"masked L1 {value:.3f}" for value in losses.tolist()]
            panel = recon_panel(images, mask, reconstruction, self.model.patch_size, captions, self.spec)
            with storage.best_effort("preview pictures", output / f"preview-{step:08d}.png"):
                save_png(panel, output / f"preview-{step:08d}.png")
                prune_previews(output, self.config.keep_previews)
            figures.update(preview_loss=round(float(losses.mean()), 5), preview=panel)
        if self.knn is not None:
            bank, queries, num_classes = self.knn
            extractor = FeatureExtractor(self.model.encoder.backbone)  # the last block, mean-pooled
            precision = resolve_precision(self.config.precision, device)
            result = knn_classify(*extract_features(extractor, bank, device, precision, self.spec),
                                  *extract_features(extractor, queries, device, precision, self.spec), num_classes,
                                  device=device)
            figures.update(knn_top1=result["top1"], knn_top5=result["top5"])
        self.model.train(was_training)
        return figures

    @torch.no_grad()
    def after_epoch(self, output: Path, epoch: int, step: int) -> dict[str, float]:
        """The masked L1 of the held-out images, the same masks every epoch (summed over ranks)."""
        if self.val is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        precision = resolve_precision(self.config.precision, device)
        generator = torch.Generator().manual_seed(self.config.seed + 1000 * self.val.rank)
        loss_sum, count = 0.0, 0
        for batch in make_loader(self.val):
            if len(batch["image"]) == 0:
                continue
            images = self.spec.normalize(batch["image"].to(device))
            mask = self.masks(len(images), generator).to(device)
            with autocast(precision, device):
                _, reconstruction = self.model(images, mask)
            loss_sum += float(masked_l1_per_image(images, reconstruction, mask, self.model.patch_size).sum())
            count += len(images)
        self.model.train(was_training)
        loss_sum, count = distributed.all_reduce_sum([loss_sum, float(count)], device)
        return {"val_loss": round(loss_sum / max(count, 1), 5)}


def save_model_file(path: Path, kind: str, model: nn.Module | dict[str, torch.Tensor], config: TrainConfig,
                    classes: list[str], metrics: dict[str, Any]) -> None:
    """A weights-only checkpoint for evaluate, export and predict: model (or its state dict), config, class names,
    metrics."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    checkpoints.save_checkpoint({"kind": kind, "model": state, "config": config.to_dict(),
                                 "classes": classes, "metrics": metrics}, path)


class ClassifierTask(Task):
    """Shared by finetune and linear-probe: evaluation each epoch, ``best.pth`` and ``last.pth``."""

    def __init__(self, model: nn.Module, config: TrainConfig, classes: list[str], val: EvalStream | None):
        self.model = model
        self.config = config
        self.spec = ImageSpec.from_dict(config.image_spec)
        self.classes = classes
        self.val = val
        self.best_top1: float | None = None

    def evaluation_model(self) -> nn.Module:
        return self.model

    def predict(self, model: nn.Module):
        device = next(model.parameters()).device
        return image_logits(model, lambda: autocast(resolve_precision(self.config.precision, device), device),
                            self.spec)

    def after_epoch(self, output: Path, epoch: int, step: int) -> dict[str, float]:
        figures: dict[str, float] = {}
        if self.val is not None:
            model = self.evaluation_model()
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            result = evaluate_classifier(self.predict(model), make_loader(self.val), len(self.classes), device,
                                         with_confusion=bool(self.config.log_to))
            model.train(was_training)
            figures = {k: result[k] for k in ("val_top1", "val_top5", "val_loss")}
        failure = None
        state = parallelize.full_state_dict(self.evaluation_model())  # sharded: every rank, rank 0 gets it whole
        if distributed.is_main():
            try:
                save_model_file(output / "last.pth", self.kind, state, self.config, self.classes,
                                {"epoch": epoch, "step": step, **figures})
                if figures and (self.best_top1 is None or figures["val_top1"] > self.best_top1):
                    self.best_top1 = figures["val_top1"]
                    save_model_file(output / "best.pth", self.kind, state, self.config,
                                    self.classes, {"epoch": epoch, "step": step, **figures})
            except StorageError as error:
                failure = str(error)
        self.best_top1, failure = distributed.broadcast_object((self.best_top1, failure))
        if failure:  # every rank stops with rank 0's reason (none waits for it), naming where to resume from
            raise StorageError(f"{failure}; {distributed.resume_hint(self.config)}")
        if figures and self.config.log_to and distributed.is_main():  # the trackers show it as an image
            return {**figures, "confusion": confusion_png(result["confusion"], self.classes)}
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
        return build_optimizer(self.model, lr, self.config.weight_decay, layer_decay=self.config.layer_decay,
                               param_groups=self.config.param_groups)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = self.spec.normalize(batch["image"]), batch["label"]
        if self.config.reprob > 0:
            if self.random_erasing is None or self.random_erasing.device != images.device:
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

    def sharded_modules(self) -> list[nn.Module]:
        self._ensure_ema()  # copied from the whole model, then sharded like it
        return [self.model] + ([self.ema.module] if self.ema is not None else [])

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
            parallelize.load_model_state(self.ema.module, checkpoint["model_ema"])



class LinearProbeTask(ClassifierTask):
    kind = "linear-probe"

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(self.model.head, lr, self.config.weight_decay, name=self.config.optimizer,
                               momentum=0.9)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "features" in batch:
            logits = model(features=batch["features"])
        else:
            logits = model(self.spec.normalize(batch["image"]))
        return {"loss": nn.functional.cross_entropy(logits, batch["label"])}

    def set_grad_checkpointing(self) -> None:
        """Nothing to recompute: the encoder runs without gradients."""

    def predict(self, model: nn.Module):
        if isinstance(self.val, TensorStream):
            return lambda batch: model(features=batch["features"])
        return super().predict(model)
