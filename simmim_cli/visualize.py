"""Reconstruction panels: original | masked input | reconstruction | reconstruction with visible patches pasted back."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import storage
from .models import pixel_mask
from .transforms import denormalize

COLUMNS = ("original", "masked input", "reconstruction", "visible + reconstruction")
MIN_TILE = 160  # small images are enlarged (nearest neighbour) so patches stay visible


def recon_panel(
    images: torch.Tensor,
    mask: torch.Tensor,
    reconstruction: torch.Tensor,
    patch_size: int,
    captions: list[str] | None = None,
) -> Image.Image:
    """One row per image. ``images`` and ``reconstruction`` are normalised (B, 3, H, W); ``mask`` is the bool
    token mask (B, H/p, W/p)."""
    images, reconstruction = images.detach().float().cpu(), reconstruction.detach().float().cpu()
    weight = pixel_mask(mask.detach().cpu(), patch_size).float()  # (B, 1, H, W), 1 = masked
    original = denormalize(images)
    grey = torch.full_like(original, 0.5)
    masked_input = original * (1 - weight) + grey * weight
    predicted = denormalize(reconstruction)
    pasted = original * (1 - weight) + predicted * weight
    rows = torch.stack([original, masked_input, predicted, pasted], dim=1)  # (B, 4, 3, H, W)

    batch, _, _, height, width = rows.shape
    zoom = max(1, -(-MIN_TILE // max(height, width)))
    tile_h, tile_w = height * zoom, width * zoom
    font = ImageFont.load_default(size=14)
    header, caption_h, gap = 22, 20 if captions else 0, 4
    panel = Image.new("RGB", (4 * tile_w + 5 * gap, header + batch * (tile_h + caption_h + gap) + gap), "white")
    draw = ImageDraw.Draw(panel)
    for column, title in enumerate(COLUMNS):
        draw.text((gap + column * (tile_w + gap), 4), title, fill="black", font=font)
    for row in range(batch):
        top = header + row * (tile_h + caption_h + gap)
        for column in range(4):
            array = (rows[row, column].permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
            tile = Image.fromarray(array).resize((tile_w, tile_h), Image.NEAREST)
            panel.paste(tile, (gap + column * (tile_w + gap), top))
        if captions:
            draw.text((gap, top + tile_h + 2), captions[row], fill="black", font=font)
    return panel


def prune_previews(output: Path, keep: int) -> None:
    """Leaves ``keep`` of the run's ``preview-<step>.png`` (0: all): the first, the newest, and between them the
    most evenly spread: while there are too many, the one whose neighbours are closest together goes."""
    if keep <= 0:
        return
    found = sorted((int(match.group(1)), path) for path in Path(output).glob("preview-*.png")
                   if (match := re.fullmatch(r"preview-(\d+)\.png", path.name)))
    while len(found) > max(keep, 2):
        steps = [step for step, _ in found]
        drop = min(range(1, len(found) - 1), key=lambda i: steps[i + 1] - steps[i - 1])
        found.pop(drop)[1].unlink(missing_ok=True)


def save_png(image: Image.Image, path: Path) -> None:
    """Atomic PNG write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with storage.writing(path, temporary=tmp):
        image.save(tmp, format="PNG")
        tmp.replace(path)


def confusion_png(confusion: torch.Tensor, classes: list[str]) -> Image.Image:
    """A confusion matrix as a picture: rows are true classes, columns predictions, each row normalised (its
    diagonal cell is the class's accuracy). Cells shrink with the class count (40 px for a few classes, 1 px from
    1,200 on); names and percentages are drawn while cells are large enough to hold them, and the picture is
    always wide enough for its title."""
    counts = confusion.double()
    rates = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    n = len(classes)
    cell = max(1, min(40, 1200 // max(n, 1)))
    labelled = cell >= 24
    font = ImageFont.load_default(size=14 if labelled else 13)
    line, pad = 18, 8
    title = ["rows: true class, columns: predicted class",
             "% of the row: the diagonal is each class's accuracy" + ("" if labelled else
                                                                     f" (classes 0-{n - 1} in confusion.json)")]
    names = [f"{i} {name}" for i, name in enumerate(classes)]
    left = pad + (int(max(font.getlength(text) for text in names)) + pad if labelled else 0)
    top = pad + len(title) * line + (line if labelled else 4)
    width = max(left + n * cell, pad + int(max(font.getlength(text) for text in title))) + pad
    image = Image.new("RGB", (width, top + n * cell + pad), "white")
    # the cells as one array, enlarged: a white-to-green diagonal, white-to-blue elsewhere
    shade = (255 * (1 - rates)).round().astype("uint8")
    full = np.full_like(shade, 255)
    diagonal = np.eye(n, dtype=bool)
    grid = np.stack([shade, np.where(diagonal, full, shade), np.where(diagonal, shade, full)], axis=-1)
    image.paste(Image.fromarray(grid, "RGB").resize((n * cell, n * cell), Image.NEAREST), (left, top))
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, top - 1, left + n * cell, top + n * cell), outline="grey")
    for k, text in enumerate(title):
        draw.text((pad, pad + k * line), text, fill="black", font=font)
    if labelled:
        for i in range(n):
            draw.text((pad, top + i * cell + cell // 2), names[i], fill="black", font=font, anchor="lm")
            draw.text((left + i * cell + cell // 2, top - 4), str(i), fill="black", font=font, anchor="mb")
            for j in range(n):
                if counts[i, j] > 0:
                    draw.text((left + j * cell + cell // 2, top + i * cell + cell // 2), f"{100 * rates[i, j]:.0f}",
                              fill="white" if rates[i, j] >= 0.6 and i != j else "black", font=font, anchor="mm")
    return image
