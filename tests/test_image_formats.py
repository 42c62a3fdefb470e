"""image_formats.py: every band and every bit of TIFF/GeoTIFF, DICOM, 16-bit PNG and .npy images, the size limit
read from the header, and make-shards' record of a set (kind, band names, exact per-channel statistics)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_cli import limits
from simmim_cli.errors import SimmimError
from simmim_cli.image_formats import MissingExtra, Moments, decode_array, read_array, require, sniff
from simmim_cli.shards import write_shards

tifffile = pytest.importorskip("tifffile")
pydicom = pytest.importorskip("pydicom")

GDAL_BANDS = ("blue", "green", "red", "nir")


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def geotiff_bytes(array: np.ndarray, names=GDAL_BANDS) -> bytes:
    """A band-interleaved TIFF with GDAL's band descriptions, as GDAL and rasterio write GeoTIFFs."""
    items = "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{n}</Item>' for i, n in enumerate(names))
    return tiff_bytes(array, photometric="minisblack", planarconfig="separate",
                      extratags=[(42112, "s", 0, f"<GDALMetadata>{items}</GDALMetadata>", True)])


def known_bands(channels: int = 4, height: int = 20, width: int = 24, seed: int = 0) -> np.ndarray:
    """uint16 (C, H, W) using the whole 16-bit range, so that any lost bit shows."""
    values = np.random.default_rng(seed).integers(0, 65536, (channels, height, width), dtype=np.uint16)
    values[0, 0, 0], values[-1, -1, -1] = 65535, 1  # the top bit and the bottom bit
    return values


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("layout", ["separate", "contig", "contig-zlib", "contig-lzw", "pages"])
def test_multiband_uint16_tiffs_come_back_exactly(layout):
    bands = known_bands()
    if layout == "separate":  # band-interleaved
        data = tiff_bytes(bands, photometric="minisblack", planarconfig="separate")
    elif layout == "pages":  # one page per band
        data = tiff_bytes(bands, photometric="minisblack")
    else:  # pixel-interleaved, compressed ones through imagecodecs
        compression = {"contig": None, "contig-zlib": "zlib", "contig-lzw": "lzw"}[layout]
        data = tiff_bytes(bands.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig",
                          compression=compression)
    decoded = read_array(data)
    assert decoded.format == "tiff" and decoded.array.dtype == np.uint16
    np.testing.assert_array_equal(decoded.array, bands)
    tensor = decode_array(data, bands=[3, 0])
    assert tensor.dtype == torch.float32  # exact for 16-bit values
    np.testing.assert_array_equal(tensor.numpy(), bands[[3, 0]].astype(np.float32))


def test_a_geotiff_names_its_bands():
    decoded = read_array(geotiff_bytes(known_bands()))
    assert decoded.band_names == list(GDAL_BANDS)


def test_dicom_ct_values_are_hounsfield_units():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    expected = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    decoded = read_array(open(path, "rb").read())
    assert decoded.format == "dicom" and decoded.array.shape == (1, 128, 128)
    np.testing.assert_array_equal(decoded.array[0].astype(np.float64), expected)
    assert decoded.array.min() == dataset.pixel_array.min() - 1024  # in Hounsfield units: the intercept applied


def test_dicom_mr_keeps_its_integers_and_monochrome1_is_inverted(tmp_path):
    path = pydicom.data.get_testdata_file("MR_small.dcm")
    dataset = pydicom.dcmread(path)
    plain = read_array(open(path, "rb").read()).array
    assert plain.dtype == np.int16
    np.testing.assert_array_equal(plain[0], dataset.pixel_array)
    dataset.PhotometricInterpretation = "MONOCHROME1"  # higher is darker: read back as MONOCHROME2
    dataset.save_as(tmp_path / "inverted.dcm")
    inverted = read_array((tmp_path / "inverted.dcm").read_bytes()).array
    np.testing.assert_array_equal(inverted, -1 - plain)


def test_sixteen_bit_pngs_keep_every_bit():
    grey = known_bands(1)[0]
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    assert sniff(buffer.getvalue()) == "png16"
    np.testing.assert_array_equal(read_array(buffer.getvalue()).array[0], grey)
    imagecodecs = pytest.importorskip("imagecodecs")
    colour = np.ascontiguousarray(known_bands(3).transpose(1, 2, 0))
    np.testing.assert_array_equal(read_array(imagecodecs.png_encode(colour)).array, colour.transpose(2, 0, 1))


def test_npy_arrays_are_read_without_pickle():
    for array in (known_bands(1)[0].astype(np.int32), np.random.default_rng(1).random((6, 7, 5), np.float32)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        decoded = read_array(buffer.getvalue()).array
        np.testing.assert_array_equal(decoded, array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}] * 4, dtype=object).reshape(2, 2), allow_pickle=True)
    with pytest.raises(ValueError):  # never unpickled: a bad sample, skipped
        read_array(buffer.getvalue())


def test_photos_still_decode_as_rgb():
    buffer = io.BytesIO()
    Image.new("RGB", (10, 8), (200, 100, 50)).save(buffer, format="PNG")
    decoded = read_array(buffer.getvalue())
    assert decoded.format == "photo" and decoded.array.shape == (3, 8, 10)
    assert decoded.array[:, 0, 0].tolist() == [200, 100, 50]


def test_a_dicom_file_with_a_tiff_preamble_is_read_as_dicom():
    data = open(pydicom.data.get_testdata_file("CT_small.dcm"), "rb").read()
    dual = b"II*\0" + data[4:]  # DICOM-TIFF dual-personality files put a TIFF header in the preamble
    assert sniff(dual) == "dicom"


def test_the_size_limit_is_read_from_the_header_before_decoding(monkeypatch):
    data = tiff_bytes(known_bands(4, 40, 50), photometric="minisblack", planarconfig="separate")
    monkeypatch.setattr(limits, "max_image_pixels", 40 * 50)  # 4 bands count as 2 × the pixels
    decoded = []
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", lambda *a, **k: decoded.append(1))
    with pytest.raises(limits.SampleTooLarge, match="50×40×4"):  # width × height × bands
        read_array(data)
    assert not decoded
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((100, 100), np.uint8))
    with pytest.raises(limits.SampleTooLarge):
        read_array(buffer.getvalue())


def test_broken_files_are_bad_samples_not_crashes():
    data = tiff_bytes(known_bands(), photometric="minisblack", planarconfig="separate")
    for broken in (data[:200], data[:8] + b"\xff" * 64, b"\x93NUMPY\x01\x00" + b"{" * 40):
        with pytest.raises((ValueError, OSError)):
            read_array(broken)


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_pydicom(name, *args):
        if name == "pydicom":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_pydicom)
    with pytest.raises(MissingExtra, match=r'DICOM images need pydicom: pip install "simmim-cli\[dicom\]"'):
        require("pydicom")


# ---------------------------------------------------------------------------------------------- a set of images


def test_moments_merge_to_numpy_whatever_the_split():
    rng = np.random.default_rng(2)
    images = [rng.normal(1000, 300, (3, rng.integers(5, 30), rng.integers(5, 30))) for _ in range(7)]
    pixels = np.concatenate([image.reshape(3, -1) for image in images], axis=1)
    total = Moments()
    for image in images:
        total.merge(Moments.of(image))
    np.testing.assert_allclose(total.mean, pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(total.std, pixels.std(axis=1), rtol=1e-12)


def write_tiff_folder(folder, count: int = 8, classes: bool = False):
    """uint16 4-band TIFFs of different sizes (some GeoTIFF-named); returns their arrays."""
    arrays = []
    for index in range(count):
        array = known_bands(4, 16 + index, 20 + 2 * index, seed=index)
        target = folder / (f"class{index % 2}" if classes else "") / f"img{index}.tif"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(geotiff_bytes(array))
        arrays.append(array)
    return arrays


@pytest.mark.parametrize("workers", [1, 2])
def test_make_shards_records_exact_statistics_for_any_workers(tmp_path, workers):
    arrays = write_tiff_folder(tmp_path / "images")
    info = write_shards(tmp_path / "images", tmp_path / "shards", workers=workers)
    record = info["images"]
    assert record["channels"] == 4 and record["dtype"] == "uint16" and record["formats"] == {"tiff": 8}
    assert record["band_names"] == list(GDAL_BANDS)
    pixels = np.concatenate([a.reshape(4, -1).astype(np.float64) for a in arrays], axis=1)
    np.testing.assert_allclose(record["mean"], pixels.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(record["std"], pixels.std(axis=1), rtol=1e-6)
    assert record["value_range"] == np.stack([pixels.min(1), pixels.max(1)], axis=1).tolist()
    assert json.loads((tmp_path / "shards" / "_info.json").read_text())["images"] == record
    if workers == 2:  # the same figures, to the last bit, as one process
        assert write_shards(tmp_path / "images", tmp_path / "single", workers=1)["images"] == record


def test_shards_keep_the_original_bytes(tmp_path):
    write_tiff_folder(tmp_path / "images", count=2)
    write_shards(tmp_path / "images", tmp_path / "shards", workers=1)
    import tarfile

    with tarfile.open(next((tmp_path / "shards").glob("*.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    originals = {p.read_bytes() for p in (tmp_path / "images").glob("*.tif")}
    assert set(members.values()) == originals and all(name.endswith(".tif") for name in members)


def test_statistics_over_a_seeded_sample(tmp_path):
    write_tiff_folder(tmp_path / "images")
    first = write_shards(tmp_path / "images", tmp_path / "a", workers=1, stats_images=3, seed=5)["images"]
    again = write_shards(tmp_path / "images", tmp_path / "b", workers=1, stats_images=3, seed=5)["images"]
    assert first["statistics"] == {"images": 3, "pixels_per_channel": first["statistics"]["pixels_per_channel"],
                                   "sampled": True, "seed": 5}
    assert first == again  # the same sample for the same seed


def test_mixed_kinds_stop_make_shards_naming_one_file_of_each(tmp_path):
    write_tiff_folder(tmp_path / "images", count=3)
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "photo.jpg")
    with pytest.raises(SimmimError, match=r"mixed images: .*img\d.tif has 4 channel\(s\) of uint16, .*photo.jpg has "
                                          r"3 channel\(s\) of uint8|mixed images: .*photo.jpg has 3 .*img\d.tif has 4"):
        write_shards(tmp_path / "images", tmp_path / "shards", workers=1)
    assert not list((tmp_path / "shards").glob("*.tar"))  # nothing half done stays


def test_unreadable_tiffs_are_skipped_and_named(tmp_path):
    write_tiff_folder(tmp_path / "images", count=3)
    (tmp_path / "images" / "broken.tif").write_bytes(b"II*\0" + b"\0" * 50)
    skipped = []
    info = write_shards(tmp_path / "images", tmp_path / "shards", workers=1,
                        on_skip=lambda path, why: skipped.append(path.name))
    assert skipped == ["broken.tif"] and info["splits"]["train"]["num_samples"] == 3
