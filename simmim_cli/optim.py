"""Optimizer and learning-rate schedule, through timm's helpers.

Parameter groups, ``--param-groups timm`` (the default): from ``timm.optim.create_optimizer_v2``, no weight decay
on 1-D parameters (norms, biases) or on what the model lists in ``no_weight_decay()`` (position tables, class and
mask tokens), and layer-wise lr decay as an ``lr_scale`` per group, which timm's schedulers apply exactly once.

``--param-groups official`` (the paper's recipes): the rules of the authors' ``optimizer.py`` (microsoft/SimMIM),
applied to timm's parameter names. They differ from timm's in two places: a Swin patch merging (``downsample``)
belongs to the last block of the stage before it (timm: the first block of the stage after it, one layer higher),
and the weight decay skips only 1-D parameters, biases, and the names the authors' models list, as their code
matches them: their ViT decays its relative position tables (and, pretraining, its mask token); their Swin
pretraining decays its tables too, because the keyword it skips is prefixed with ``encoder.`` and so never matches.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler

from .errors import SimmimError

LR_REFERENCE_BATCH = 512  # learning rates are given per 512 images, as in the official code


def lr_scale_for_batch(global_batch: int) -> float:
    """lr = base_lr × global batch / 512 (the global batch counts every process and accumulation step)."""
    return global_batch / LR_REFERENCE_BATCH


PARAM_GROUPS = ("timm", "official")


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    name: str = "adamw",
    layer_decay: float | None = None,
    param_groups: str = "timm",
    **kwargs: Any,
) -> torch.optim.Optimizer:
    if name == "adamw":
        # the fused kernel (CPU and CUDA) steps ViT-S in a fifth of the time of the foreach one
        kwargs = {"betas": (0.9, 0.999), "eps": 1e-8, "fused": True, **kwargs}
    if param_groups == "official":
        groups = official_param_groups(model, weight_decay, layer_decay)
        return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, **kwargs)


def official_param_groups(model: torch.nn.Module, weight_decay: float,
                          layer_decay: float | None = None) -> list[dict[str, Any]]:
    """The authors' parameter groups for a SimMIM model (pretraining) or a timm classifier (fine-tuning):
    ``{"params", "weight_decay", "lr_scale"}`` per (layer, decay) pair, ``lr_scale = layer_decay ** (top - layer)``
    (1 everywhere without layer decay)."""
    from .models import SimMIM, model_family

    pretrain = isinstance(model, SimMIM)
    backbone = model.encoder.backbone if pretrain else model
    family = model_family(backbone.pretrained_cfg["architecture"])
    if family not in ("vit", "beit", "swin"):
        raise SimmimError("--param-groups official follows the authors' SimMIM code, which has the ViT (BEiT-style) "
                          f"and Swin V1, not {family}; use --param-groups timm")
    if family == "swin":
        depths = [len(stage.blocks) for stage in backbone.layers]
        top = sum(depths) + 1
    else:
        depths, top = [], len(backbone.blocks) + 1
    skip, keywords = _authors_no_decay(family, pretrain)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        authors = _authors_name(name, family, pretrain)
        decay = not (param.ndim == 1 or authors.endswith(".bias") or authors in skip
                     or any(keyword in authors for keyword in keywords))
        layer = _authors_layer(authors, depths, top) if layer_decay is not None else top
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (top - layer) if layer_decay is not None else 1.0})
        group["params"].append(param)
    return list(groups.values())


def _authors_no_decay(family: str, pretrain: bool) -> tuple[set[str], set[str]]:
    """The names (exact) and keywords (substrings) the authors' models exclude from weight decay. In pretraining
    their SimMIM wrapper prefixes both with ``encoder.``: right for the exact names, never a match as a keyword."""
    if family == "swin":
        skip = {"absolute_pos_embed", "mask_token"} if pretrain else {"absolute_pos_embed"}
        keywords = {"relative_position_bias_table"}
    else:  # their VisionTransformer (BEiT-style, or with absolute position embeddings)
        skip, keywords = {"pos_embed", "cls_token"}, set()
    if pretrain:
        return {f"encoder.{name}" for name in skip}, {f"encoder.{word}" for word in keywords}
    return skip, keywords


def _authors_name(name: str, family: str, pretrain: bool) -> str:
    """A parameter's name in the authors' models: no ``backbone.`` level in the SimMIM encoder, Swin's patch merging
    at the end of stage i (timm: start of stage i+1), Swin's classifier ``head`` (timm: ``head.fc``)."""
    if pretrain:
        name = name.replace("encoder.backbone.", "encoder.", 1)
    if family == "swin":
        name = re.sub(r"layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", name)
        name = re.sub(r"^head\.fc\.", "head.", name)
    return name


def _authors_layer(name: str, depths: list[int], top: int) -> int:
    """The authors' layer id of a (fine-tuning) parameter: 0 for the embeddings, block k for the k-th block counted
    from 1 over all stages, ``top`` for the final norm and the head. A Swin patch merging at the end of stage i
    shares the layer of that stage's last block."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if match := re.match(r"blocks\.(\d+)\.", name):  # ViT
        return int(match.group(1)) + 1
    if match := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", name):  # Swin
        stage, block = int(match.group(1)), int(match.group(2))
        return sum(depths[:stage]) + block + 1
    if match := re.match(r"layers\.(\d+)\.downsample\.", name):
        return sum(depths[: int(match.group(1)) + 1])
    return top  # the final norm, the head, and the ViT's shared relative position bias


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    warmup_lr: float,
    min_lr: float,
    milestones: list[int] | None = None,
) -> Scheduler:
    """A per-step schedule: linear warmup from ``warmup_lr``, then cosine to ``min_lr`` or ×0.1 at each milestone.

    ``milestones`` are steps counted from the start of training (warmup included).
    """
    # a one-step cosine (tiny smoke runs) makes timm log a warning about it; nothing is wrong then
    logging.getLogger("timm.scheduler.cosine_lr").setLevel(logging.ERROR)
    if schedule == "multistep":
        return MultiStepLRScheduler(optimizer, decay_t=list(milestones or []), decay_rate=0.1, warmup_t=warmup_steps,
                                    warmup_lr_init=warmup_lr, warmup_prefix=False, t_in_epochs=False)
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=warmup_lr, warmup_prefix=True,
                             cycle_limit=1, t_in_epochs=False)
