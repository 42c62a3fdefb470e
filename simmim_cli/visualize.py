"""Reconstruction panels: original | masked input | reconstruction | reconstruction with visible patches pasted back."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from . import storage
from .image_spec import IMAGENET_RGB, ImageSpec
from .models import pixel_mask

STRETCH = (2.0, 98.0)  # percentiles of each shown band of an image mapped to black and white (not 8-bit RGB)
COLUMNS = ("original", "masked input", "reconstruction", "visible + reconstruction")
MIN_TILE = 160  # small images are enlarged (nearest neighbour) so patches stay visible


def recon_panel(
    images: torch.Tensor,
    mask: torch.Tensor,
    reconstruction: torch.Tensor,
    patch_size: int,
    captions: list[str] | None = None,
    spec: ImageSpec = IMAGENET_RGB,
    bands: list[int] | None = None,
) -> Image.Image:
    """One row per image. ``images`` and ``reconstruction`` are normalised (B, C, H, W) as ``spec`` says; ``mask``
    is the bool token mask (B, H/p, W/p). ``bands`` are the channels shown as red, green and blue (one: grey);
    by default the first three, or the first in grey."""
    images, reconstruction = images.detach().float().cpu(), reconstruction.detach().float().cpu()
    weight = pixel_mask(mask.detach().cpu(), patch_size).float()  # (B, 1, H, W), 1 = masked
    original, predicted = display_values(spec.values(images), spec.values(reconstruction), spec, bands)
    grey = torch.full_like(original, 0.5)
    masked_input = original * (1 - weight) + grey * weight
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


def display_values(original: torch.Tensor, predicted: torch.Tensor, spec: ImageSpec,
                   bands: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and their reconstructions (B, C, H, W, in ``spec.values`` units) → (B, 3, H, W) in [0, 1] to show:
    8-bit RGB photos as they are; other data as a band triple (or one band in grey), each band of an image
    stretched from its 2nd to its 98th percentile, the reconstruction with the original's stretch."""
    channels = original.shape[1]
    if bands is None and spec.scale == 255.0 and channels == 3:  # ImageNet-normalised 8-bit RGB: values in [0, 1]
        return original.clamp(0, 1), predicted.clamp(0, 1)
    bands = bands if bands is not None else ([0, 1, 2] if channels >= 3 else [0])
    original, predicted = original[:, bands], predicted[:, bands]
    flat = original.flatten(2)
    low = torch.quantile(flat, STRETCH[0] / 100, dim=2)[..., None, None]
    high = torch.quantile(flat, STRETCH[1] / 100, dim=2)[..., None, None]
    span = (high - low).clamp(min=1e-12)
    original, predicted = ((original - low) / span).clamp(0, 1), ((predicted - low) / span).clamp(0, 1)
    if len(bands) == 1:
        original, predicted = original.expand(-1, 3, -1, -1), predicted.expand(-1, 3, -1, -1)
    return original, predicted


def picture_of(data: bytes) -> Image.Image:
    """Any image file's bytes as an RGB picture to look at: a photo as it is; TIFF, DICOM, .npy and 16-bit PNG as
    the first three bands (or the first in grey), stretched as the previews are. Raises what the readers raise
    for a file that does not decode."""
    from .image_formats import read_array, sniff

    if sniff(data) == "photo":
        from .transforms import decode_image

        return decode_image(data)
    values = torch.from_numpy(read_array(data).array.astype("float32"))[None]
    shown, _ = display_values(values, values, ImageSpec(scale=1.0))
    return Image.fromarray((shown[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8"))


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


SHEET_TILE = 128


def contact_sheet(rows: list[tuple[Image.Image | None, str, list[tuple[Image.Image | None, str, str]]]]) -> Image.Image:
    """One row per query: the query image and its caption, then each neighbour with two caption lines (name,
    similarity), most similar first. A missing image (its shard unreadable) is a grey tile."""
    columns = 1 + max((len(neighbours) for _, _, neighbours in rows), default=0)
    tile, gap, header, caption = SHEET_TILE, 6, 22, 34
    font = ImageFont.load_default(size=12)
    sheet = Image.new("RGB", (columns * (tile + gap) + gap, header + len(rows) * (tile + caption + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(["query", *(f"{n}" for n in range(1, columns))]):
        draw.text((gap + column * (tile + gap), 4), title if column == 0 else f"neighbour {title}", fill="black",
                  font=font)
    for row, (query, name, neighbours) in enumerate(rows):
        top = header + row * (tile + caption + gap)
        cells = [(query, name, ""), *neighbours]
        for column, (image, first, second) in enumerate(cells):
            left = gap + column * (tile + gap)
            if image is None:
                draw.rectangle((left, top, left + tile - 1, top + tile - 1), fill=(200, 200, 200))
            else:
                thumb = ImageOps.contain(image, (tile, tile))  # small images enlarged, large ones shrunk
                sheet.paste(thumb, (left + (tile - thumb.width) // 2, top + (tile - thumb.height) // 2))
            if column == 0:
                draw.rectangle((left - 2, top - 2, left + tile + 1, top + tile + 1), outline=(30, 90, 200), width=2)
            draw.text((left, top + tile + 2), _fit(first, draw, font, tile), fill="black", font=font)
            draw.text((left, top + tile + 17), second, fill=(90, 90, 90), font=font)
    return sheet


def _fit(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
    """``text`` cut from the left (the end of a name tells most) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text
