"""Reconstruction panels: original | masked input | reconstruction | reconstruction with visible patches pasted back."""

from __future__ import annotations

from pathlib import Path

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


def save_png(image: Image.Image, path: Path) -> None:
    """Atomic PNG write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with storage.writing(path, temporary=tmp):
        image.save(tmp, format="PNG")
        tmp.replace(path)


def confusion_png(confusion: torch.Tensor, classes: list[str]) -> Image.Image:
    """A confusion matrix as a picture: rows are true classes, columns predictions, each row normalised (its
    diagonal cell is the class's accuracy). Names and percentages are drawn when there are few classes."""
    counts = confusion.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    cell = max(2, min(40, 900 // max(n, 1)))
    labelled = cell >= 24
    font = ImageFont.load_default(size=max(9, min(14, cell // 3)))
    margin = (max(len(f"{i} {c}") for i, c in enumerate(classes)) * 7 + 10 if labelled else 10)
    size = margin + n * cell + 10
    image = Image.new("RGB", (size, size + 24), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), "rows: true class, columns: predicted class (% of the row)", fill="black", font=font)
    top = 24 + (margin if labelled else 10) - 10
    for i in range(n):
        for j in range(n):
            value = float(rates[i, j])
            shade = int(255 * (1 - value))
            colour = (shade, shade, 255) if i != j else (shade, 255, shade)
            x, y = margin + j * cell, top + i * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour)
            if labelled and counts[i, j] > 0:
                draw.text((x + 2, y + cell // 3), f"{100 * value:.0f}", fill="black" if value < 0.6 else "white",
                          font=font)
        if labelled:
            draw.text((4, top + i * cell + cell // 3), f"{i} {classes[i]}", fill="black", font=font)
    if labelled:  # columns by index: names rarely fit above a cell
        for j in range(n):
            draw.text((margin + j * cell + 2, top - 14), str(j), fill="black", font=font)
    return image.crop((0, 0, size, top + n * cell + 10))




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
