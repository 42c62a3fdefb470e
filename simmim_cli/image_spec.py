"""What a model takes, the one place for it: channels, the bands picked from the files, the value type, and the
normalisation (mean, std, scale), chosen from a data set's own statistics (``_info.json``) or, for 8-bit RGB
photos, the paper's ImageNet values. Every run config, checkpoint and export carries it as a dict
(:meth:`ImageSpec.to_dict`), so that evaluation, prediction and exported models scale their inputs exactly as
training did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import SimmimError

# ImageNet's statistics, the paper's normalisation of 8-bit RGB (timm's IMAGENET_DEFAULT_MEAN/STD, without
# importing timm where only the numbers are needed)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

PHOTO_RECORD = {"channels": 3, "dtype": "uint8", "formats": {"photo": 0}}  # shards made before the record


@dataclass(frozen=True)
class ImageSpec:
    """A model's input. Normalised images are ``(values / scale - mean) / std`` per channel: ImageNet's mean and
    std with scale 255 for 8-bit RGB photos (the paper's), the data's own mean and std in its units (16-bit
    counts, Hounsfield units, ...) with scale 1 for everything else."""

    channels: int = 3
    dtype: str = "uint8"  # of the decoded values: uint8, uint16, int16, float32, ...
    mean: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    std: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
    scale: float = 255.0
    bands: tuple[int, ...] | None = None  # bands of the files taken, in this order; None: all of them
    band_names: tuple[str, ...] | None = None  # the names of the channels, where the files name their bands
    photo: bool = True  # every image an 8-bit photo (JPEG, PNG, ...): decoded by transforms.py's fast path
    source_channels: int = 3  # bands in each file

    @property
    def rgb8(self) -> bool:
        """3 channels of 8 bits: colour augmentations (RandAugment, jitter) and ImageNet defaults apply."""
        return self.channels == 3 and self.dtype == "uint8"

    def describe(self) -> str:
        what = "8-bit RGB photos" if self.photo else f"{self.source_channels}-band {self.dtype} images"
        return what + (f" (bands {', '.join(map(str, self.bands))})" if self.bands is not None else "")

    # ------------------------------------------------------------------------------------------ normalisation

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded images (B, C, H, W) of any type, on any device → float32 normalised."""
        mean, std = _constants(self.mean, self.std, images.device)
        values = images.float()
        if self.scale != 1.0:  # a copy of uint8 images is divided in place, as the toolkit always did
            values = values.div_(self.scale) if images.dtype != torch.float32 else values / self.scale
        return (values - mean) / std

    def values(self, images: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: back to ``values / scale`` (photos: [0, 1]; other data: its units)."""
        mean, std = _constants(self.mean, self.std, images.device)
        return images.float() * std + mean

    # ------------------------------------------------------------------------------------------ decoding

    def tensor_decoder(self, min_size: int | None = None) -> Callable[[bytes], torch.Tensor]:
        """bytes → (C, H, W) tensor: the photo fast path (uint8, JPEGs at a reduced scale down to ``min_size``),
        or the files' chosen bands at full precision."""
        from .image_formats import decode_array
        from .transforms import decode_tensor

        if self.photo:
            return functools.partial(decode_tensor, min_size=min_size)
        return functools.partial(decode_array, bands=self.bands, channels=self.source_channels)

    def image_decoder(self) -> Callable[[bytes], Any]:
        """bytes → what the classifier and evaluation views take: a PIL image for 8-bit RGB (timm's colour
        augmentations work on those), else a (C, H, W) tensor at full precision."""
        from .image_formats import decode_array, decode_pil
        from .transforms import decode_image

        if self.photo:
            return decode_image
        if self.rgb8:
            return functools.partial(decode_pil, bands=self.bands, channels=self.source_channels)
        return functools.partial(decode_array, bands=self.bands, channels=self.source_channels)

    # ------------------------------------------------------------------------------------------ records

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for config.yaml, checkpoints and export metadata."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ImageSpec:
        """A spec back from :meth:`to_dict`; None (checkpoints from before specs) is the RGB-photo default."""
        if not values:
            return cls()
        known = {key: value for key, value in values.items() if key in cls.__dataclass_fields__}
        for key in ("mean", "std", "bands", "band_names"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)

    def for_data(self, record: dict | None, option: str = "--data") -> ImageSpec:
        """This spec reading another set (evaluate, predict, --val-data): its files must have the bands this spec
        takes; whether they are decoded as photos is the set's own affair."""
        record = record or PHOTO_RECORD
        channels, dtype = int(record["channels"]), str(record["dtype"])
        if (channels, dtype) != (self.source_channels, self.dtype):
            theirs = "8-bit RGB photos" if is_photo_record(record) else f"{channels}-band {dtype} images"
            raise SimmimError(f"{option} holds {theirs}, and the model takes {self.describe()}; give it data like "
                              "the data it was trained on")
        return ImageSpec(**{**asdict(self), "photo": is_photo_record(record)})


IMAGENET_RGB = ImageSpec()  # the paper's normalisation of 8-bit RGB photos


@functools.cache
def _constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    # one copy per device: copying the constants from pageable memory every step would stall the GPU's queue
    shape = (1, len(mean), 1, 1)
    return torch.tensor(mean).view(shape).to(device), torch.tensor(std).view(shape).to(device)


def is_photo_record(record: dict) -> bool:
    return set(record.get("formats") or {"photo": 0}) == {"photo"}


def parse_bands(bands: list[Any] | str | None, count: int, names: list[str] | tuple[str, ...] | None,
                option: str = "--bands") -> tuple[int, ...] | None:
    """``--bands 3,2,1,7`` (0-based indices) or band names → indices into the files' bands, checked."""
    if bands is None or bands == []:
        return None
    words = [word.strip() for item in ([bands] if isinstance(bands, str) else bands)
             for word in str(item).split(",") if word.strip()]
    if not words:
        return None
    chosen = []
    for word in words:
        if word.isdigit():
            index = int(word)
        elif names and word in names:
            index = list(names).index(word)
        else:
            known = f"the bands are named {', '.join(names)}" if names else "the files do not name their bands"
            raise SimmimError(f"{option} {word}: not a band index (0 to {count - 1}) nor a band name; {known}")
        if index >= count:
            raise SimmimError(f"{option} {index} is out of range: the images have {count} band(s), 0 to {count - 1}")
        chosen.append(index)
    return tuple(chosen)


def _per_channel(values: list[float] | None, channels: int, option: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        values = [float(v) for item in ([values] if isinstance(values, str) else values)
                  for v in str(item).split(",") if v.strip()]
    except ValueError:
        raise SimmimError(f"{option} takes numbers, comma-separated (one per channel, or one for all), e.g. "
                          f"{option} 1200.5,980,1100,2400") from None
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise SimmimError(f"{option} has {len(values)} values for {channels} channels; give one per channel "
                          "(comma-separated) or one for all")
    return tuple(values)


def spec_for_data(record: dict | None, bands: Any = None, mean: Any = None, std: Any = None) -> ImageSpec:
    """The spec of a training set: its ``_info.json`` image record (None: 8-bit photos, shards made before the
    record existed), ``--bands``, and ``--mean``/``--std`` in the data's units (0–255 for 8-bit images) when
    given. Defaults: ImageNet's statistics for 8-bit RGB, the set's own for anything else."""
    record = record or PHOTO_RECORD
    photo = is_photo_record(record)
    source, dtype = int(record["channels"]), str(record["dtype"])
    names = record.get("band_names")
    chosen = parse_bands(bands, source, names)
    if chosen is not None and photo:
        raise SimmimError("--bands picks bands of multi-band images (TIFF, DICOM, .npy, 16-bit PNG); these images "
                          "are 8-bit photos, decoded as RGB: drop --bands")
    indices = list(chosen) if chosen is not None else list(range(source))
    channels = len(indices)
    common = {"channels": channels, "dtype": dtype, "bands": chosen, "photo": photo, "source_channels": source,
              "band_names": tuple(names[i] for i in indices) if names else None}
    given_mean, given_std = _per_channel(mean, channels, "--mean"), _per_channel(std, channels, "--std")
    if channels == 3 and dtype == "uint8" and given_mean is None and given_std is None:
        return ImageSpec(**common)  # the paper's ImageNet normalisation, exactly as always
    if channels == 3 and dtype == "uint8":
        imagenet_mean = tuple(255 * v for v in IMAGENET_DEFAULT_MEAN)
        imagenet_std = tuple(255 * v for v in IMAGENET_DEFAULT_STD)
        return ImageSpec(**common, mean=given_mean or imagenet_mean, std=given_std or imagenet_std, scale=1.0)
    if (given_mean is None or given_std is None) and not record.get("mean"):
        raise SimmimError("these shards' _info.json has no per-channel statistics; re-make them with simmim "
                          "make-shards (which measures them), or give --mean and --std")
    data_mean = tuple(record["mean"][i] for i in indices) if record.get("mean") else None
    data_std = tuple(record["std"][i] if record["std"][i] > 0 else 1.0 for i in indices) if record.get("std") else None
    chosen_std = given_std or data_std
    if any(value <= 0 for value in chosen_std):
        raise SimmimError("--std values must be above 0")
    return ImageSpec(**common, mean=given_mean or data_mean, std=chosen_std, scale=1.0)


def fix_image_spec(config: Any, record: dict | None, trained: dict | None = None) -> ImageSpec:
    """A command's spec from its data's record and ``--bands``/``--mean``/``--std``: stored in the config
    (``config.image_spec``, carried by config.yaml and every checkpoint), and the encoder's ``in_chans`` set to its
    channels in ``--model-kwargs`` (the data decides it). ``--decode gpu`` takes 8-bit photos only.

    ``trained``: the spec an encoder was trained with (a checkpoint's). When none of the three options is given and
    the data has the bands it was trained on, its bands and normalisation are kept: the encoder sees its inputs as
    in pretraining, not rescaled by a small labelled set's own statistics."""
    bands, mean, std = config.bands, config.mean, config.std
    if trained and bands is None and mean is None and std is None:
        encoder = ImageSpec.from_dict(trained)
        data = record or PHOTO_RECORD
        if encoder.scale == 1.0 and (int(data["channels"]), str(data["dtype"])) == (encoder.source_channels,
                                                                                    encoder.dtype):
            bands, mean, std = (list(encoder.bands) if encoder.bands is not None else None), encoder.mean, encoder.std
    spec = spec_for_data(record, bands, mean, std)
    check_gpu_decode(spec, getattr(config, "decode", "cpu"))
    config.image_spec = spec.to_dict()
    if spec.channels != 3:
        config.model_kwargs["in_chans"] = spec.channels
    else:
        config.model_kwargs.pop("in_chans", None)
    return spec


def check_gpu_decode(spec: ImageSpec, decode: str) -> None:
    """``--decode gpu`` (DALI) decodes 8-bit photos; anything else is read by the loader processes."""
    if decode == "gpu" and not spec.photo:
        raise SimmimError(f"--decode gpu decodes 8-bit JPEG and PNG photos, and these are {spec.describe()}; use "
                          "--decode cpu")
