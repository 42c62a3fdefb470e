"""A map of an embedding file: the vectors in 2-D (PCA, or UMAP when umap-learn is installed), one dot per image
coloured by label or source shard, with thumbnails of a spread-out sample of the images, as a PNG (matplotlib).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from . import storage
from .embeddings import Embeddings, read_images
from .errors import SimmimError

MAP_POINTS = 50_000  # dots drawn at most (a seeded sample): more only blacken the picture and slow the drawing
MAX_COLOURS = 20  # categories with a colour of their own; the rest are grey "other"
THUMBNAIL = 56  # pixels on the PNG


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SimmimError('the map is drawn with matplotlib: pip install "simmim-cli[embed]"') from None


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def project(vectors: torch.Tensor, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates of the rows and a description of the projection. ``auto``: UMAP (cosine) when
    umap-learn is installed, else PCA of the normalised vectors."""
    if method == "umap" and not umap_available():
        raise SimmimError('--projection umap needs umap-learn: pip install umap-learn (or use --projection pca)')
    rows = torch.nn.functional.normalize(vectors.float(), dim=1)
    if len(rows) < 3:
        raise SimmimError(f"a map needs at least 3 embeddings; {len(rows)} in the file")
    if method == "umap" or (method == "auto" and umap_available()):
        import umap

        reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, len(rows) - 1))
        return reducer.fit_transform(rows.numpy()), "UMAP (cosine)"
    centred = rows - rows.mean(dim=0)
    torch.manual_seed(seed)  # pca_lowrank draws a random start
    _, singular, directions = torch.pca_lowrank(centred, q=min(2, *centred.shape), center=False, niter=6)
    coordinates = centred @ directions[:, :2]
    explained = float((singular[:2] ** 2).sum() / centred.square().sum().clamp(min=1e-12))
    return coordinates.numpy(), f"PCA ({100 * explained:.0f}% of the variance)"


def spread_sample(coordinates: np.ndarray, count: int) -> list[int]:
    """``count`` rows far apart on the map (farthest-point sampling from the one nearest the middle): thumbnails
    that cover every region without piling up."""
    if count <= 0 or not len(coordinates):
        return []
    scale = coordinates.std(axis=0) + 1e-12
    points = coordinates / scale
    chosen = [int(np.argmin(((points - points.mean(axis=0)) ** 2).sum(axis=1)))]
    distance = ((points - points[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(min(count, len(points)) - 1):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, ((points - points[chosen[-1]]) ** 2).sum(axis=1))
    return chosen


def categories(embeddings: Embeddings, rows: np.ndarray, colour_by: str) -> tuple[list[str], str]:
    """The category of each row (its label, or its source shard's file name) and what they are."""
    if colour_by == "auto":
        colour_by = "label" if any(label is not None for label in embeddings.labels) else "source"
    if colour_by == "label":
        return [str(embeddings.labels[i]) if embeddings.labels[i] is not None else "(none)" for i in rows], "label"
    return [Path(embeddings.sources[i].rstrip("/")).name for i in rows], "source shard"


def draw_map(embeddings: Embeddings, output: Path, projection: str = "auto", colour_by: str = "auto",
             thumbnails: int = 40, seed: int = 0) -> dict:
    """Writes the map PNG (atomically); returns what it shows."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from PIL import Image, ImageOps

    from .visualize import picture_of

    count = len(embeddings)
    rows = np.arange(count)
    if count > MAP_POINTS:
        rows = np.sort(np.random.default_rng(seed).choice(count, MAP_POINTS, replace=False))
    coordinates, method = project(embeddings.vectors[torch.from_numpy(rows)], projection, seed)
    names, what = categories(embeddings, rows, colour_by)
    ranked = [name for name, _ in Counter(names).most_common()]
    coloured = sorted(ranked if len(ranked) <= MAX_COLOURS else ranked[:MAX_COLOURS - 1], key=_natural)
    palette = _palette(len(coloured))
    colour_of = {name: palette[i] for i, name in enumerate(coloured)}
    other = (0.6, 0.6, 0.6, 1.0)

    figure = Figure(figsize=(13, 10), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    size = float(np.clip(3000 / np.sqrt(len(rows)), 4, 60))
    for name in reversed([*coloured, *(["other"] if len(ranked) > len(coloured) else [])]):
        mask = np.array([n == name if name in colour_of else n not in colour_of for n in names])
        axes.scatter(coordinates[mask, 0], coordinates[mask, 1], s=size, color=colour_of.get(name, other),
                     label=f"{name} ({int(mask.sum())})", alpha=0.75, linewidths=0)
    handles, labels = axes.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith("other ("), _natural(labels[i])))
    axes.legend([handles[i] for i in order], [labels[i] for i in order], title=what, loc="upper left",
                bbox_to_anchor=(1.01, 1.0), fontsize=9, markerscale=max(1.0, 40 / size) ** 0.5, frameon=False)
    axes.set_xticks([])
    axes.set_yticks([])
    model = embeddings.metadata.get("model", {})
    encoder = Path(model.get("pretrained") or "").name or f"random {model.get('name')}"
    where = "" if model.get("onnx") else f", layer {embeddings.metadata.get('layer')}, " \
                                         f"{embeddings.metadata.get('pool')} pooling"
    sample = f" (a sample of {len(rows):,})" if len(rows) < count else ""
    axes.set_title(f"{count:,} images{sample}: {encoder}{where}; {method}", fontsize=12)
    figure.canvas.draw()  # the layout is final: data coordinates → pixels, so that thumbnails do not overlap
    pixels = axes.transData.transform(coordinates)
    shown = _without_overlap(spread_sample(coordinates, 20 * thumbnails), pixels)[:thumbnails]
    pictures = read_images([(embeddings.sources[rows[i]], embeddings.keys[rows[i]]) for i in shown])
    drawn = 0
    for i in shown:
        data = pictures.get((embeddings.sources[rows[i]], embeddings.keys[rows[i]]))
        if data is None:
            continue
        try:
            image = picture_of(data)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
        image = ImageOps.contain(image, (THUMBNAIL, THUMBNAIL))
        # zoom: OffsetImage draws a pixel per point; the PNG has figure.dpi pixels per 72 points
        picture = OffsetImage(np.asarray(image), zoom=72 / figure.dpi)
        box = AnnotationBbox(picture, coordinates[i], frameon=True, pad=0.1,
                             bboxprops={"edgecolor": colour_of.get(names[i], other), "linewidth": 2})
        axes.add_artist(box)
        drawn += 1
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    tmp = output.with_name(f".{output.name}.tmp")
    with storage.writing(output, temporary=tmp):
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(output)
    return {"map": str(output), "points": len(rows), "projection": method, "colour_by": what,
            "categories": len(ranked), "thumbnails": drawn}


def _without_overlap(candidates: list[int], pixels: np.ndarray) -> list[int]:
    """The candidates, in order, whose thumbnails would not cover one already placed."""
    placed: list[np.ndarray] = []
    kept = []
    for index in candidates:
        if all(np.abs(pixels[index] - other).max() > THUMBNAIL + 10 for other in placed):
            placed.append(pixels[index])
            kept.append(index)
    return kept


def _natural(text: str) -> list:
    """A sort key that puts digit2 before digit10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _palette(count: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    name = "tab10" if count <= 10 else "tab20"
    colours = colormaps[name].colors
    return [(*colours[i % len(colours)], 1.0) for i in range(count)]
