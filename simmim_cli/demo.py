"""The built-in demo: a small image set cut from the two photos scikit-learn ships, and settings that pretrain
a small ViT on it on a CPU in a few minutes (``simmim pretrain --demo``)."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from .errors import SimmimError

# a recipe layered under --recipe and the command line: explicit options still win
DEMO_SETTINGS = {
    "model": "vit_tiny_patch16_224",
    "model_kwargs": {"patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3},
    "img_size": 96,
    "mask_patch_size": 16,
    "epochs": 12,
    "warmup_epochs": 1,
    "batch_size": 32,
    "base_lr": 0.01,  # × 32/512: 6.3e-4 at a batch of 32
    "warmup_lr": 1e-4,
    "min_lr": 1e-4,
    "workers": 2,
    "log_every": 5,
}


def photo_paths() -> list[Path]:
    try:
        import sklearn.datasets
    except ImportError as error:
        raise SimmimError("the demo images come from scikit-learn: pip install scikit-learn") from error
    folder = Path(sklearn.datasets.__file__).parent / "images"
    paths = sorted(folder.glob("*.jpg"))
    if not paths:
        raise SimmimError(f"scikit-learn's sample photos are missing from {folder}; reinstall scikit-learn")
    return paths


def make_demo_images(folder: Path, count: int = 640, size: int = 128, seed: int = 0) -> Path:
    """Writes ``count`` JPEG crops (random position, scale and flip) of the sample photos into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(path).convert("RGB") for path in photo_paths()]
    rng = random.Random(seed)
    for index in range(count):
        photo = photos[index % len(photos)]
        side = rng.randint(size, min(photo.size) * 2 // 3)
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(folder / f"crop_{index:04d}.jpg", quality=92)
    return folder
