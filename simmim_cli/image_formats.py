"""Images as their files hold them: the bytes of a shard member (or a file) → an array of C channels at full
precision, and the per-channel statistics of a set of them.

Each format is read by the library made for it: TIFF and GeoTIFF by tifffile (compressed ones with imagecodecs;
band- and pixel-interleaved; band names from GDAL's metadata), DICOM by pydicom (rescale slope and intercept to
real units such as Hounsfield units; MONOCHROME1 inverted so that higher is brighter), 16-bit PNG without loss,
and ``.npy`` arrays (``allow_pickle=False``). Every reader looks at the header first and refuses an image over the
size limit (``limits.check_image_size``) before decoding it. 8-bit photos (JPEG, 8-bit PNG, WebP, ...) keep their
fast path in ``transforms.py``; here they are only read when they share a set with arrays.
"""

from __future__ import annotations

import importlib
import io
import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import SimmimError
from .limits import check_image_size

ARRAY_SUFFIXES = {".tif", ".tiff", ".dcm", ".npy"}  # and .png, when it is 16-bit
EXTRAS = {"tifffile": "tiff", "imagecodecs": "tiff", "pydicom": "dicom"}
MAX_BANDS = 4096  # a 3-D volume read as bands is no image; this keeps a bad header from asking for millions
STATS_ROWS = 2**20  # pixels per block of the statistics: float64 copies stay a few MB whatever the image


class MissingExtra(SimmimError):
    """A format's library is not installed: the one-line error names the extra to install."""


def require(module: str, what: str | None = None) -> Any:
    """Imports ``module``, or stops with the extra that installs it (``what`` needs it: TIFF images by default for
    tifffile and imagecodecs, DICOM images for pydicom)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module]
        what = what or {"tiff": "TIFF images", "dicom": "DICOM images"}[extra]
        raise MissingExtra(f'{what} need {module}: pip install "simmim-cli[{extra}]"') from None


def sniff(data: bytes) -> str:
    """The format of an image's bytes: ``tiff``, ``dicom``, ``npy``, ``png16`` (a PNG of 16 bits per sample), or
    ``photo`` (anything PIL reads as an 8-bit picture)."""
    if data[128:132] == b"DICM":  # first: a DICOM file's preamble may hold a TIFF header (dual-personality files)
        return "dicom"
    if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "tiff"
    if data[:6] == b"\x93NUMPY":
        return "npy"
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24 and data[24] == 16:
        return "png16"
    return "photo"


@dataclass
class Decoded:
    """An image at full precision: ``array`` (C, H, W) in the file's own dtype (or float32 for DICOM values
    rescaled to real units), with its band names where the file has them."""

    array: np.ndarray
    format: str
    band_names: list[str] | None = None

    @property
    def kind(self) -> tuple[int, str]:
        """(channels, dtype): what must be the same for every image of a set."""
        return self.array.shape[0], self.array.dtype.name


def read_array(data: bytes, name: str = "image") -> Decoded:
    """Bytes of any supported image → :class:`Decoded`. Raises ValueError (or OSError) for a file that does not
    decode, :class:`~simmim_cli.limits.SampleTooLarge` (a ValueError) for one over the size limit, and
    :class:`MissingExtra` where the format's library is missing."""
    kind = sniff(data)
    readers = {"tiff": _read_tiff, "dicom": _read_dicom, "npy": _read_npy, "png16": _read_png16}
    if kind in readers:
        try:
            return readers[kind](data, name)
        except (SimmimError, ValueError, OSError, MemoryError):
            raise
        except Exception as error:  # a broken or hostile file trips the readers in many ways: a bad sample
            raise ValueError(f"cannot decode this {kind} file ({type(error).__name__}: {error})") from error
    from .transforms import decode_image

    photo = np.asarray(decode_image(data))  # (H, W, 3) uint8; PIL checks its own size limit from the header
    return Decoded(np.ascontiguousarray(photo.transpose(2, 0, 1)), "photo")


def decode_array(data: bytes, bands: tuple[int, ...] | list[int] | None = None,
                 channels: int | None = None) -> torch.Tensor:
    """Bytes → a (C, H, W) tensor of the chosen ``bands`` (all when None) of an image of ``channels`` bands (any
    when None): uint8 stays uint8 (as photos are batched), every other type becomes float32, which holds 16-bit
    values (and 24 bits of anything wider) exactly."""
    return to_tensor(select_bands(read_array(data).array, bands, channels))


def decode_pil(data: bytes, bands: tuple[int, ...] | list[int] | None = None, channels: int | None = None):
    """Bytes of 8-bit RGB data (3 bands, or 3 chosen ones) → an RGB PIL image, for timm's colour augmentations."""
    return to_pil(select_bands(read_array(data).array, bands, channels))


def select_bands(array: np.ndarray, bands: tuple[int, ...] | list[int] | None,
                 channels: int | None = None) -> np.ndarray:
    """``array[bands]``; a ValueError (a bad sample) for an image with another number of bands than the set's."""
    if channels is not None and array.shape[0] != channels:
        raise ValueError(f"the image has {array.shape[0]} band(s), not the {channels} of the images the model "
                         "was trained on")
    if bands is None:
        return array
    if max(bands) >= array.shape[0]:
        raise ValueError(f"the image has {array.shape[0]} band(s), and band {max(bands)} was asked for (--bands)")
    return array[list(bands)]


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(C, H, W) array → tensor: uint8 as it is, anything else as float32."""
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def to_pil(array: np.ndarray):
    """A (3, H, W) uint8 array → an RGB PIL image (for the colour augmentations of 8-bit RGB data)."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)))  # (H, W, 3) uint8: RGB


# ---------------------------------------------------------------------------------------------- the formats


def _channels_first(array: np.ndarray, axes: str) -> np.ndarray:
    """An array with named axes (tifffile's: Y, X, S samples, C channels, I/Q/Z pages...) → (C, H, W), every axis
    other than Y and X flattened into channels, in the file's order."""
    others = [index for index, axis in enumerate(axes) if axis not in "YX"]
    order = others + [axes.index("Y"), axes.index("X")]
    height, width = array.shape[axes.index("Y")], array.shape[axes.index("X")]
    return np.ascontiguousarray(array.transpose(order).reshape(-1, height, width))


def _check_dtype(array_dtype: np.dtype, what: str) -> None:
    if array_dtype.kind not in "biuf" or array_dtype.itemsize > 8:
        raise ValueError(f"{what} holds {array_dtype} values; simmim reads integer and floating-point images")


def _read_tiff(data: bytes, name: str) -> Decoded:
    tifffile = require("tifffile")
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        if "Y" not in axes or "X" not in axes:
            raise ValueError(f"a TIFF whose first series has no Y and X axes ({axes})")
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        bands = math.prod(shape) // max(1, height * width)
        if bands > MAX_BANDS:
            raise ValueError(f"a TIFF of {bands} planes ({axes} {shape}); simmim reads 2-D images of up to "
                             f"{MAX_BANDS} bands")
        check_image_size(width, height, bands, name)
        _check_dtype(series.dtype, "the TIFF")
        try:
            array = series.asarray()
        except ValueError as error:
            if "imagecodecs" in str(error):  # tifffile needs it for LZW, Deflate, ZSTD, JPEG... compressed TIFFs
                raise MissingExtra('compressed TIFF images need imagecodecs: pip install "simmim-cli[tiff]"'
                                   ) from None
            raise
        names = _gdal_band_names(tif.gdal_metadata, bands)
    return Decoded(_channels_first(array, axes), "tiff", names)


def _gdal_band_names(metadata: Any, bands: int) -> list[str] | None:
    """Band descriptions from a GeoTIFF's GDAL_METADATA tag (``<Item name="DESCRIPTION" sample="i">``), which
    GDAL and rasterio write for named bands."""
    if isinstance(metadata, dict):  # some tifffile versions parse it
        metadata = metadata.get("GDALMetadata", metadata)
        return None if not isinstance(metadata, str) else _gdal_band_names(metadata, bands)
    if not isinstance(metadata, str) or len(metadata) > 2**20:
        return None
    try:
        root = ElementTree.fromstring(metadata)
    except ElementTree.ParseError:
        return None
    names: dict[int, str] = {}
    for item in root.iter("Item"):
        if item.get("name", "").upper() == "DESCRIPTION" and (item.get("sample") or "").isdigit():
            names[int(item.get("sample"))] = (item.text or "").strip()
    if not names or not all(names.get(index) for index in range(bands)):
        return None
    return [names[index] for index in range(bands)]


def _read_dicom(data: bytes, name: str) -> Decoded:
    pydicom = require("pydicom")
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frames = int(dataset.get("NumberOfFrames") or 1)
        samples = int(dataset.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, KeyError) as error:
        raise ValueError(f"a DICOM file without image pixels ({error})") from None
    except pydicom.errors.InvalidDicomError as error:
        raise ValueError(f"not a readable DICOM file ({error})") from None
    check_image_size(columns, rows, frames * samples, name)
    try:
        pixels = dataset.pixel_array
    except (NotImplementedError, RuntimeError) as error:  # a compressed transfer syntax without its decoder
        syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None)
        raise ValueError(f"cannot decode its pixel data ({getattr(syntax, 'name', syntax)}): install a decoder "
                         "for it, e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg") from error
    _check_dtype(pixels.dtype, "the DICOM file")
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = _inverted(pixels, int(dataset.get("BitsStored") or pixels.dtype.itemsize * 8))
    slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
    if slope is not None or intercept is not None:
        slope = float(slope if slope is not None else 1.0)
        intercept = float(intercept if intercept is not None else 0.0)
        if (slope, intercept) != (1.0, 0.0):  # to real units (Hounsfield units for CT)
            pixels = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    # (H, W), (H, W, S), (F, H, W) or (F, H, W, S) → (C, H, W): frames and samples become channels
    if samples > 1:
        pixels = np.moveaxis(pixels, -1, -3)
    return Decoded(np.ascontiguousarray(pixels.reshape(-1, rows, columns)), "dicom")


def _inverted(pixels: np.ndarray, bits: int) -> np.ndarray:
    """MONOCHROME1 (higher is darker) → MONOCHROME2 over the stored bit range, the same for every file of a set:
    unsigned v → 2^bits − 1 − v, signed v → −1 − v."""
    if pixels.dtype.kind == "u":
        return (np.asarray((1 << bits) - 1, dtype=pixels.dtype) - pixels).astype(pixels.dtype)
    if pixels.dtype.kind == "i":
        return (-1 - pixels).astype(pixels.dtype)
    return -pixels


def _read_npy(data: bytes, name: str) -> Decoded:
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(buffer)  # the header only: no data read yet
    if len(shape) not in (2, 3):
        raise ValueError(f"a .npy array of shape {shape}; an image is (H, W) or (H, W, C)")
    height, width = shape[0], shape[1]
    check_image_size(width, height, shape[2] if len(shape) == 3 else 1, name)
    _check_dtype(dtype, "the .npy array")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    return Decoded(np.ascontiguousarray(array), "npy")


def _read_png16(data: bytes, name: str) -> Decoded:
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    colour = data[25]
    bands = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour, 1)  # grey, RGB, grey + alpha, RGBA
    check_image_size(width, height, bands, name)
    if colour == 0:  # grey: PIL reads it losslessly (mode I;16)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image)
        return Decoded(array.astype(np.uint16)[None], "png16")
    codecs = require("imagecodecs", "16-bit colour PNG images")  # PIL reads them as 8 bits
    array = codecs.png_decode(data)
    return Decoded(np.ascontiguousarray(np.moveaxis(array, -1, 0)), "png16")


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class Moments:
    """Running per-channel statistics: pixel count, mean, sum of squared deviations (float64), minimum and
    maximum. Merged in a fixed order, they give the same figures however the images were shared out."""

    count: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    low: np.ndarray = field(default_factory=lambda: np.zeros(0))
    high: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def of(cls, array: np.ndarray) -> Moments:
        """The moments of one (C, H, W) image, in blocks of rows (bounded float64 copies)."""
        channels, height, width = array.shape
        total = cls()
        rows = max(1, STATS_ROWS // max(width, 1))
        for top in range(0, height, rows):
            block = array[:, top:top + rows].reshape(channels, -1).astype(np.float64)
            mean = block.mean(axis=1)
            total.merge(cls(block.shape[1], mean, ((block - mean[:, None]) ** 2).sum(axis=1),
                            block.min(axis=1), block.max(axis=1)))
        return total

    def merge(self, other: Moments) -> None:
        """Chan et al.'s pairwise update: this set and ``other`` as one."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2, self.low, self.high = (other.count, other.mean.copy(), other.m2.copy(),
                                                                   other.low.copy(), other.high.copy())
            return
        count = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / count)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        self.low, self.high = np.minimum(self.low, other.low), np.maximum(self.high, other.high)
        self.count = count

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation of every pixel value of the set, per channel."""
        return np.sqrt(self.m2 / max(self.count, 1))


# ---------------------------------------------------------------------------------------------- a set of images

FORMAT_EXTENSIONS = {"tiff": "tif", "dicom": "dcm", "npy": "npy", "png16": "png"}  # shard member extensions


@dataclass
class ImageFacts:
    """What make-shards learns from one image: its kind, format, band names and (when measured) moments."""

    kind: tuple[int, str]
    format: str
    band_names: list[str] | None = None
    moments: Moments | None = None


def array_facts(data: bytes, name: str, statistics: bool) -> ImageFacts:
    """Decodes an image that is not an 8-bit photo completely (which checks it) → its facts."""
    decoded = read_array(data, name)
    return ImageFacts(decoded.kind, decoded.format, decoded.band_names,
                      Moments.of(decoded.array) if statistics else None)


def describe_kind(kind: tuple[int, str]) -> str:
    return f"{kind[0]} channel(s) of {kind[1]}"


class SetSurvey:
    """The image record of a set, gathered image by image in the set's order: one kind (channels, dtype) for
    all, the formats, band names, and exact per-channel statistics (merged in the same order whatever the
    processes that measured them)."""

    def __init__(self) -> None:
        self.first: dict[tuple[int, str], str] = {}  # kind → the first file of that kind
        self.formats: dict[str, int] = {}
        self.band_names: list[str] | None = None
        self.moments = Moments()
        self.measured = 0

    def add(self, name: str, facts: ImageFacts) -> None:
        if self.first and facts.kind not in self.first:
            (kind, first), = self.first.items()
            raise SimmimError(f"mixed images: {first} has {describe_kind(kind)}, {name} has "
                              f"{describe_kind(facts.kind)}; a set holds one kind of image: make one set of each kind, "
                              "or convert them to one")
        self.first.setdefault(facts.kind, name)
        self.formats[facts.format] = self.formats.get(facts.format, 0) + 1
        if self.band_names is None and facts.band_names:
            self.band_names = list(facts.band_names)
        if facts.moments is not None:
            self.moments.merge(facts.moments)
            self.measured += 1

    def record(self, sampled: bool = False, seed: int = 0) -> dict[str, Any] | None:
        """The ``images`` entry of ``_info.json`` (None for an empty set)."""
        if not self.first:
            return None
        (channels, dtype), = self.first
        record: dict[str, Any] = {"channels": channels, "dtype": dtype, "formats": dict(sorted(self.formats.items())),
                                  "band_names": self.band_names}
        if self.measured:
            record.update(mean=self.moments.mean.tolist(), std=self.moments.std.tolist(),
                          value_range=[[float(lo), float(hi)] for lo, hi in zip(self.moments.low, self.moments.high,
                                                                                strict=True)],
                          statistics={"images": self.measured, "pixels_per_channel": int(self.moments.count),
                                      "sampled": sampled, "seed": seed})
        return record
