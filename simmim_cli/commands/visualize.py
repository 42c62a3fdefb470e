"""``simmim visualize-recon``: reconstruction panels of images from a pretraining checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoints, distributed, storage
from ..errors import SimmimError
from ..image_inputs import image_readers, image_views
from ..image_spec import ImageSpec, parse_bands
from ..masking import MaskGenerator
from ..models import masked_l1_per_image
from ..tool_configs import VisualizeConfig
from ..visualize import recon_panel, save_png
from ..weights import load_simmim


def visualize_recon(config: VisualizeConfig) -> dict[str, Any]:
    """``simmim visualize-recon``: reconstructs each image from a masked view and writes one panel.

    Returns what it did (paths, per-image losses, skipped images, notes) for the command line to report."""
    output = Path(config.output)
    for path in (output, Path(config.save_arrays) if config.save_arrays else None):
        if path is not None and path.exists() and not config.force:
            raise SimmimError(f"{path} exists; pass --force to replace it or choose another name")
    if config.checkpoint is None:
        found = checkpoints.newest_run_checkpoint(Path("runs"), "pretrain")
        if found is None:
            raise SimmimError("no --checkpoint given and no pretrain run under runs/; give --checkpoint PATH")
        config.checkpoint = str(found)
    model, weights, _ = load_simmim(config.checkpoint, config.model, config.model_kwargs, config.img_size)
    trained = weights.config or {}
    spec = ImageSpec.from_dict(trained.get("image_spec"))
    shown = parse_bands(config.show_bands, spec.channels, spec.band_names, "--show-bands")
    if shown is not None and len(shown) not in (1, 3):
        raise SimmimError(f"--show-bands takes one channel (grey) or three (red, green, blue), got {len(shown)}")
    for band in range(spec.channels) if config.per_band and not config.force else []:
        path = output.with_name(f"{output.stem}-band{band}{output.suffix}")
        if path.exists():
            raise SimmimError(f"{path} exists; pass --force to replace it or choose another name")
    img_size = model.encoder.backbone.patch_embed.img_size[0]
    masks = MaskGenerator(img_size, config.mask_patch_size or trained.get("mask_patch_size", 32), model.patch_size,
                          config.mask_ratio or trained.get("mask_ratio", 0.6))
    notes = [] if weights.decoder else [
        f"WARNING: {config.checkpoint} has no decoder weights, so the pixel head is random and the "
        "reconstructions mean nothing; use a pretraining checkpoint"]

    skipped: list[str] = []
    views = list(image_views(image_readers(config.images, config.limit), img_size, 1.0, skipped, notes, spec))
    names, images = [name for name, _ in views], [tensor for _, tensor in views]
    if not images:
        raise SimmimError("none of the images could be read" + (f" ({skipped[0]})" if skipped else ""))

    if config.mask:
        try:
            array = np.load(config.mask, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise SimmimError(f"cannot read --mask {config.mask}: {error}; save a 0/1 array with numpy.save") from error
        mask = masks.from_array(array).expand(len(images), -1, -1)
    else:
        mask = masks(len(images), torch.Generator().manual_seed(config.seed))
    device = distributed.pick_device(config.device)
    model.to(device)
    batch = spec.normalize(torch.stack(images).to(device))
    with torch.no_grad():
        _, reconstruction = model(batch, mask.to(device))
        losses = masked_l1_per_image(batch, reconstruction, mask.to(device), model.patch_size).cpu()
    captions = [f"{_short(name)}  masked L1 {loss:.3f}" for name, loss in zip(names, losses.tolist(), strict=True)]
    shown = list(shown) if shown is not None else None
    save_png(recon_panel(batch, mask, reconstruction, model.patch_size, captions, spec, shown), output)
    band_panels = []
    for band in range(spec.channels) if config.per_band else []:
        band_panels.append(output.with_name(f"{output.stem}-band{band}{output.suffix}"))
        band_captions = [f"{caption}  band {spec.band_names[band] if spec.band_names else band}"
                         for caption in captions]
        save_png(recon_panel(batch, mask, reconstruction, model.patch_size, band_captions, spec, [band]),
                 band_panels[-1])
    if config.save_arrays:
        arrays = Path(config.save_arrays)
        tmp = arrays.with_name(f".{arrays.stem}.tmp.npz")
        with storage.writing(arrays, temporary=tmp):
            np.savez(tmp, input=batch.cpu().numpy(), mask=mask.cpu().numpy(),
                     reconstruction=reconstruction.cpu().numpy(), loss=losses.numpy(), names=np.array(names))
            tmp.replace(arrays)
    return {"output": output, "arrays": config.save_arrays, "band_panels": band_panels, "names": names,
            "losses": losses.tolist(),
            "skipped": skipped, "notes": notes, "checkpoint": config.checkpoint}


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
