"""Settings that fit the user's data: what a command chooses for the options nobody gave.

The dataclass defaults in ``config.py`` are the paper's ImageNet settings (1.28M images, tens of thousands of
steps at a batch of 2048). On a few thousand images they barely move the weights: the linear lr rule shrinks the
lr with the batch, layer decay 0.65 all but freezes the lower blocks, and Mixup/CutMix, RandAugment m9 and 8%
crops hide what little signal a short run sees. So for every option not given on the command line or in a
recipe (``config.auto``), the functions below pick a value from the data set size, the image size and the number
of optimizer steps, and return one paragraph saying what they chose and why (nothing when they chose nothing). A
recipe keeps the paper's values.
"""

from __future__ import annotations

import math

from .config import FinetuneConfig, PretrainConfig, TrainConfig

LARGE_SET = 50_000  # images: from here on the paper's regularisation pays off
LONG_RUN = 10_000  # optimizer steps: the paper's runs have 60k+; below this the linear lr rule starves a run
SHORT_RUN_PEAK_LR = 1e-3  # the usual AdamW peak for small transformers; the lr a short run gets at least
MIN_STEPS_PER_EPOCH = 16
SMALL_IMAGE = 64  # px: RandAugment's shears and 8% crops leave too little of an image this small
MID_IMAGE = 96
MIN_MASK_GRID = 4  # mask patches per image side: fewer makes masking 60% of them nearly all-or-nothing


def encoder_depth(model) -> int:
    """Blocks of a timm ViT/BEiT (``blocks``) or Swin (``layers[i].blocks``)."""
    if hasattr(model, "layers"):
        return sum(len(stage.blocks) for stage in model.layers)
    return len(model.blocks)


def global_batch(config: TrainConfig, batch_size: int | None = None) -> int:
    from .distributed import procs_per_node

    if config.global_batch and batch_size is None:
        return config.global_batch
    return (batch_size or config.batch_size) * max(1, procs_per_node(config)) * config.nnodes * config.grad_accum


def total_steps(config: TrainConfig, num_images: int) -> int:
    return config.epochs * math.ceil(num_images / global_batch(config))


def _fitted_batch(config: TrainConfig, num_images: int, notes: list[str]) -> None:
    """A batch small enough for an epoch of at least 16 steps: a few hundred images in batches of 128 would give
    one or two steps an epoch."""
    if "batch_size" not in config.auto or config.global_batch:  # --global-batch: split in split_global_batch
        return
    processes = global_batch(config, 1) // config.grad_accum
    fitting = 2 ** int(math.log2(max(1, num_images // (MIN_STEPS_PER_EPOCH * processes))))
    batch = max(8, min(config.batch_size, fitting))
    if batch != config.batch_size:
        before = math.ceil(num_images / global_batch(config))
        config.batch_size = batch
        notes.append(f"batch {batch} per process, for {math.ceil(num_images / global_batch(config))} steps per "
                     f"epoch instead of {before}")


def _short_run_lr(config: TrainConfig, steps: int, notes: list[str]) -> None:
    """Short runs get a peak lr of at least 1e-3: the linear rule (lr ∝ batch) assumes the paper's step count,
    which makes up for a small lr per step."""
    if "base_lr" not in config.auto or steps >= LONG_RUN:
        return
    batch = global_batch(config)
    floor = SHORT_RUN_PEAK_LR * 512 / batch
    if config.base_lr < floor:
        config.base_lr = float(f"{floor:.3g}")
        notes.append(f"base lr {config.base_lr:g} (peak {SHORT_RUN_PEAK_LR:g} at {batch} images per step) because "
                     f"{steps:,} steps are too few for the paper's lr to move the weights")


def choose_finetune(config: FinetuneConfig, num_images: int, depth: int) -> str:
    """Fills in ``config``'s automatic settings for ``num_images`` labelled images and an encoder of ``depth``
    blocks; returns the summary to print."""
    notes: list[str] = []
    _fitted_batch(config, num_images, notes)
    steps = total_steps(config, num_images)
    small, short, size = num_images < LARGE_SET, steps < LONG_RUN, config.img_size
    _short_run_lr(config, steps, notes)
    if "layer_decay" in config.auto and short:
        # the lowest block learns at half the head's rate; the paper's 0.65 gives it 0.4% over 12 blocks, fine for
        # 60k steps, but in a short run the lower blocks would not adapt at all
        decay = round(0.5 ** (1 / (depth + 1)), 3)
        if config.layer_decay is None or decay > config.layer_decay:
            config.layer_decay = decay
            notes.append(f"layer decay {decay} so that the lowest of {depth} blocks still learns at half the rate")
    if small:
        dropped = [name for name in ("mixup", "cutmix") if name in config.auto and getattr(config, name)]
        for name in dropped:
            setattr(config, name, 0.0)
        if dropped:
            names = "/".join({"mixup": "Mixup", "cutmix": "CutMix"}[name] for name in dropped)
            notes.append(f"no {names}, which pay off only over long training on large sets")
        if "auto_augment" in config.auto and config.auto_augment:
            config.auto_augment = "rand-m5-mstd0.5-inc1" if size >= MID_IMAGE else None
            notes.append(f"RandAugment {'at magnitude 5' if config.auto_augment else 'off'} for {size}-px images "
                         "(magnitude 9 is for ImageNet)")
        if "min_crop_scale" in config.auto:
            config.min_crop_scale = 0.5 if size < SMALL_IMAGE else 0.25
            notes.append(f"crops keep at least {config.min_crop_scale:.0%} of the image")
        if "reprob" in config.auto and config.reprob:
            config.reprob = 0.0
            notes.append("no random erasing")
    return _summary("fine-tuning", num_images, steps, config, notes)


def _fitted_mask_patch(config: PretrainConfig, patch_size: int, notes: list[str]) -> None:
    """Small images get smaller mask patches: the paper's 32 px leave a 32-px image one patch, masked or not."""
    if "mask_patch_size" not in config.auto:
        return
    size = config.mask_patch_size
    while config.img_size // size < MIN_MASK_GRID and size // 2 >= patch_size and (size // 2) % patch_size == 0:
        size //= 2
    if size != config.mask_patch_size:
        grid, paper_grid = config.img_size // size, config.img_size // config.mask_patch_size
        notes.append(f"mask patches of {size} px ({grid}×{grid} per image; the paper's {config.mask_patch_size} px "
                     f"would give {paper_grid}×{paper_grid})")
        config.mask_patch_size = size


def choose_pretrain(config: PretrainConfig, num_images: int, patch_size: int) -> str:
    """Fills in ``config``'s automatic settings for ``num_images`` unlabelled images and an encoder of
    ``patch_size``-px patches; returns the summary."""
    notes: list[str] = []
    _fitted_mask_patch(config, patch_size, notes)
    _fitted_batch(config, num_images, notes)
    steps = total_steps(config, num_images)
    _short_run_lr(config, steps, notes)
    return _summary("pretraining", num_images, steps, config, notes)


def _summary(what: str, num_images: int, steps: int, config: TrainConfig, notes: list[str]) -> str:
    """What was chosen and why, in one paragraph; empty when nothing was (nothing to say)."""
    if not notes:
        return ""
    stop = f", stopping after {config.max_steps:,} (--max-steps)" if 0 < config.max_steps < steps else ""
    return (f"{what} settings fitted to {num_images:,} images of {config.img_size} px and a schedule of {steps:,} "
            f"steps{stop}, for the options not given (the paper's are for ImageNet: recipes/ has them): "
            + "; ".join(notes) + ".")
