"""Shared fixtures: real small images (scikit-learn's digits and photos), tiny models, tiny shards."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where torch sees no CUDA device."""

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# tiny encoders of each family: a CPU step takes milliseconds
TINY_MODELS = {
    "vit": ("vit_tiny_patch16_224", {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}, 32),
    "beit": ("beit_base_patch16_224", {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                       "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False}, 32),
    "swin": ("swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2],
                                              "window_size": 2}, 32),
    "swinv2": ("swinv2_tiny_window8_256", {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2],
                                           "window_size": 2}, 32),
}


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def simmim(*arguments: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m simmim_cli ...` as a user would run it (a process of its own: launchers, signals)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)  # not a worker of some outer launcher
    return subprocess.run([sys.executable, "-m", "simmim_cli", *arguments], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def digit_images(count: int, size: int = 48) -> list[Image.Image]:
    """scikit-learn's 8×8 handwritten digits, upscaled and coloured: real images, no download."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for index in range(count):
        grey = (digits.images[index] / 16.0 * 255).astype(np.uint8)
        tint = np.array([[255, 160, 60], [60, 200, 255], [120, 255, 120]][digits.target[index] % 3], np.float32)
        rgb = (grey[..., None].astype(np.float32) / 255.0 * tint).astype(np.uint8)
        images.append(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    return images


def digit_labels(count: int) -> list[int]:
    from sklearn.datasets import load_digits

    return [int(t) for t in load_digits().target[:count]]


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """A flat folder: JPEG crops of the sample photos and digits as PNG, plus odd modes."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    for index, photo in enumerate(load_sample_images().images):
        image = Image.fromarray(photo)
        for crop in range(6):
            left = 40 * crop
            image.crop((left, 40, left + 160, 200)).save(folder / f"photo{index}_{crop}.jpg", quality=90)
    for index, image in enumerate(digit_images(12)):
        image.save(folder / f"digit{index:02d}.png")
    return folder


@pytest.fixture(scope="session")
def labelled_folder(tmp_path_factory) -> Path:
    """Class sub-folders of digits (3 classes)."""
    folder = tmp_path_factory.mktemp("labelled")
    labels = digit_labels(60)
    for index, (image, label) in enumerate(zip(digit_images(60), labels, strict=True)):
        if label > 2:
            continue
        (folder / f"class{label}").mkdir(exist_ok=True)
        image.save(folder / f"class{label}" / f"d{index}.png")
    return folder


def write_jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()

