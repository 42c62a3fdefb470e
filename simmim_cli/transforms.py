"""Image decoding and augmentation: photo bytes to uint8 tensors (images of other formats and bit depths are
``image_formats.py``'s), the paper's crops on any number of channels and any value type, timm's classifier
augmentation, evaluation views. The normalisation is ``image_spec.py``'s.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import v2 as T

from . import limits
from .masking import MaskGenerator

# torchvision's libjpeg-turbo decoder (deprecated in 0.29 in favour of TorchCodec, still the fastest way from
# JPEG bytes to a tensor here); without it every JPEG goes through PIL
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # pragma: no cover - a future torchvision
        decode_jpeg = None

# PIL warns of images over its pixel limit; ours (set to the same, --max-image-pixels) refuses them instead, in
# open_image, so the warning would only repeat the skip line
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# ---------------------------------------------------------------------------------------------- decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK, I;16, I, F, ...) → 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grey: scale the real range to 8 bits (convert('L') would clip to white)
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # composite on white rather than dropping alpha (whatever colour hides under transparency)
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy open of encoded bytes (the header only), refused over ``--max-image-pixels`` before anything is
    decoded (:class:`limits.SampleTooLarge`, a bad sample that readers skip)."""
    if Image.MAX_IMAGE_PIXELS != limits.max_image_pixels:
        # PIL's own bomb check follows ours (it refuses at twice its limit, before our message could say why)
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL's own message names a memory address, which tells a user nothing
        raise UnidentifiedImageError("not an image format PIL reads") from None
    except Image.DecompressionBombError as error:  # PIL's own check, at twice the limit: said as ours says it
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels.group(1)) / 1e6:g} megapixels" if pixels else "too large"
        raise limits.SampleTooLarge(f"image is {size}, over the limit of {limits.max_image_pixels / 1e6:g} "
                                    "megapixels (--max-image-pixels)") from None
    limits.check_image_size(*image.size)
    return image


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
    """Bytes of any image format PIL reads → RGB. ``min_size`` lets a JPEG decode at a reduced scale
    (1/2, 1/4, 1/8) as long as both sides stay at least that large: much less work for small crops. An image over
    ``--max-image-pixels`` is refused from its header, before it is decoded."""
    image = open_image(data)
    if min_size and image.format == "JPEG":
        image.draft("RGB", (min_size, min_size))  # keeps the result >= min_size on both sides
    image.load()
    return to_rgb(image)


def decode_tensor(data: bytes, min_size: int | None = None) -> torch.Tensor:
    """Bytes → uint8 RGB tensor (3, H, W), the fast way for the common case.

    JPEGs decode with libjpeg-turbo straight into a tensor, or through PIL at a reduced scale when they are at
    least twice ``min_size``; everything else (PNG, 16-bit, alpha, CMYK) goes through :func:`decode_image`.
    """
    if data[:3] == b"\xff\xd8\xff":
        with open_image(data) as header:  # reads the header only (and refuses a pixel bomb from it)
            small_enough = not min_size or min(header.size) < 2 * min_size
            plain = header.mode in ("RGB", "L")
        if small_enough and plain and decode_jpeg is not None:
            # anything torchvision cannot read goes to PIL below
            with contextlib.suppress(RuntimeError), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return T.functional.pil_to_tensor(decode_image(data, min_size))


PRETRAIN_SCALE = (0.67, 1.0)  # RandomResizedCrop area fraction, as in the paper
PRETRAIN_RATIO = (3 / 4, 4 / 3)


class PretrainTransform:
    """The paper's augmentation (RandomResizedCrop 0.67–1, ratio 3/4–4/3, horizontal flip) of a (C, H, W) tensor
    from :func:`decode_tensor` (uint8) or ``image_formats.decode_array`` (any channels; uint8 or float32, which
    keeps 16-bit values exact), plus the sample's SimMIM mask. A class, so loader workers can be spawned."""

    def __init__(self, img_size: int, masks: MaskGenerator):
        self.img_size = img_size
        self.masks = masks

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        top, left, height, width = RandomResizedCrop.get_params(image, list(PRETRAIN_SCALE), list(PRETRAIN_RATIO))
        # antialiased bilinear on uint8: torch's vectorised kernel, several times faster than PIL's resize (and on
        # float32 for other data: no rounding of 16-bit values)
        size = [self.img_size, self.img_size]
        image = T.functional.resized_crop(image, top, left, height, width, size, antialias=True)
        if torch.rand(1).item() < 0.5:
            image = image.flip(-1)
        return {"image": image, "mask": self.masks(1)[0]}


def pretrain_decode_size(img_size: int) -> int:
    """Smallest image side that keeps the smallest RandomResizedCrop at least ``img_size`` wide: JPEGs larger
    than this decode at a reduced scale, with no loss in the crops."""
    return math.ceil(img_size / math.sqrt(PRETRAIN_SCALE[0] * PRETRAIN_RATIO[0]))


def _posterize_any_bits(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, where 0 bits gives a black image as Pillow < 13 did; Pillow 13 refuses 0 bits, which
    RandAugment's ``inc1`` policies draw at the top magnitude."""
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return posterize(image, bits_to_keep, **kwargs)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if auto_augment.NAME_TO_OP.get(name) is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_any_bits


class ClassifierTrainTransform:
    """timm's ImageNet training augmentation (RandomResizedCrop, flip, RandAugment or colour jitter) up to a uint8
    tensor; normalisation and random erasing follow on the training device."""

    def __init__(self, img_size: int, auto_augment: str | None, color_jitter: float, min_crop_scale: float = 0.08,
                 hflip: float = 0.5, interpolation: str = "bicubic"):
        from timm.data import create_transform

        _patch_timm_posterize()
        primary, secondary, _ = create_transform(img_size, is_training=True, auto_augment=auto_augment,
                                                 color_jitter=color_jitter, interpolation=interpolation,
                                                 scale=(min_crop_scale, 1.0), hflip=hflip, re_prob=0.0,
                                                 separate=True)
        self.augment = T.Compose([primary, secondary])

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": T.functional.pil_to_tensor(self.augment(image))}


class ArrayClassifierTrainTransform:
    """The classifier augmentation of images that are not 8-bit RGB (any channels, full precision): timm's
    RandomResizedCrop (bicubic) and flip on the (C, H, W) tensor; the colour operations (RandAugment, jitter) have
    no meaning for other bands and are left out."""

    def __init__(self, img_size: int, min_crop_scale: float = 0.08, hflip: float = 0.5):
        self.crop = T.RandomResizedCrop(img_size, scale=(min_crop_scale, 1.0),
                                        interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        self.hflip = hflip

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        image = self.crop(image)
        if torch.rand(1).item() < self.hflip:
            image = image.flip(-1)
        return {"image": image}


class CropTransform:
    """Evaluation (and linear-probe) views: resize to ``img_size / crop_pct`` and centre-crop, or with
    ``random=True`` a RandomResizedCrop and flip; a PIL image to a uint8 tensor, a (C, H, W) tensor (images that
    are not 8-bit RGB) to a tensor of its type."""

    def __init__(self, img_size: int, crop_pct: float = 0.875, random: bool = False):
        bicubic = T.InterpolationMode.BICUBIC
        if random:
            self.view = T.Compose([T.RandomResizedCrop(img_size, interpolation=bicubic), T.RandomHorizontalFlip()])
        else:
            self.view = T.Compose([T.Resize(int(img_size / crop_pct), interpolation=bicubic), T.CenterCrop(img_size)])

    def __call__(self, image: Image.Image | torch.Tensor) -> dict[str, torch.Tensor]:
        view = self.view(image)
        return {"image": view if torch.is_tensor(view) else T.functional.pil_to_tensor(view)}
