"""image_spec.py: the one normalisation (the paper's for 8-bit RGB, the data's own otherwise), bands, and what
models, augmentation and weight loading do with any number of channels."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from simmim_cli.config import FinetuneConfig, PretrainConfig
from simmim_cli.errors import SimmimError
from simmim_cli.image_spec import IMAGENET_RGB, ImageSpec, fix_image_spec, spec_for_data
from simmim_cli.masking import MaskGenerator
from simmim_cli.models import build_simmim, create_backbone
from simmim_cli.transforms import ArrayClassifierTrainTransform, CropTransform, PretrainTransform
from simmim_cli.weights import Weights, load_encoder

RECORD = {"channels": 4, "dtype": "uint16", "formats": {"tiff": 10}, "band_names": ["blue", "green", "red", "nir"],
          "mean": [1000.0, 1100.0, 1200.0, 3000.0], "std": [100.0, 110.0, 0.0, 300.0]}
TINY = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_rgb_photos_keep_the_papers_normalisation_bit_for_bit():
    spec = spec_for_data(None)
    assert spec == IMAGENET_RGB and spec.photo and spec.rgb8
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    assert torch.equal(spec.normalize(images), (images.float().div_(255) - mean) / std)  # the toolkit's formula
    assert torch.allclose(spec.values(spec.normalize(images)), images.float() / 255, atol=1e-6)


def test_other_data_is_normalised_with_its_own_statistics_in_its_units():
    spec = spec_for_data(RECORD)
    assert (spec.channels, spec.dtype, spec.scale, spec.photo) == (4, "uint16", 1.0, False)
    assert spec.std[2] == 1.0  # a constant band is centred, not divided by zero
    images = torch.tensor([1000.0, 1100.0, 1200.0, 3300.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    assert spec.normalize(images)[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert spec.normalize(images).dtype == torch.float32 and images[0, 0, 0, 0] == 1000.0  # not changed in place


def test_bands_by_index_or_name_pick_the_statistics_and_the_channels():
    spec = spec_for_data(RECORD, bands="nir,2,0")
    assert spec.bands == (3, 2, 0) and spec.channels == 3 and spec.band_names == ("nir", "red", "blue")
    assert spec.mean == (3000.0, 1200.0, 1000.0) and not spec.rgb8  # 16-bit: no ImageNet values
    assert spec_for_data(RECORD, mean="5", std="2,2,2,2").mean == (5.0,) * 4
    for bands, message in (("7", "out of range"), ("swir", "not a band index"), ("", None)):
        if message is None:
            assert spec_for_data(RECORD, bands=bands).bands is None
        else:
            with pytest.raises(SimmimError, match=message):
                spec_for_data(RECORD, bands=bands)


def test_bad_options_are_one_line_errors():
    with pytest.raises(SimmimError, match="--mean has 3 values for 4 channels"):
        spec_for_data(RECORD, mean="1,2,3")
    with pytest.raises(SimmimError, match="--std takes numbers"):
        spec_for_data(RECORD, std="wide")
    with pytest.raises(SimmimError, match="--bands picks bands of multi-band images"):
        spec_for_data(None, bands="0")
    with pytest.raises(SimmimError, match="no per-channel statistics"):
        spec_for_data({"channels": 2, "dtype": "uint16", "formats": {"npy": 3}})


def test_records_round_trip_and_other_data_is_refused():
    spec = spec_for_data(RECORD, bands="3,2,1")
    assert ImageSpec.from_dict(spec.to_dict()) == spec
    assert ImageSpec.from_dict(None) == IMAGENET_RGB  # checkpoints from before specs
    with pytest.raises(SimmimError, match="--val-data holds 8-bit RGB photos, and the model takes 4-band uint16"):
        spec.for_data(None, "--val-data")


def test_the_config_gets_the_spec_and_the_channels_and_gpu_decoding_is_refused():
    config = PretrainConfig(data="x", model_kwargs=dict(TINY))
    fix_image_spec(config, RECORD)
    assert config.model_kwargs["in_chans"] == 4 and config.image_spec["channels"] == 4
    with pytest.raises(SimmimError, match="--decode gpu decodes 8-bit JPEG and PNG photos.*use --decode cpu"):
        fix_image_spec(PretrainConfig(data="x", decode="gpu"), RECORD)
    rgb = PretrainConfig(data="x", model_kwargs={"in_chans": 4})
    fix_image_spec(rgb, None)
    assert "in_chans" not in rgb.model_kwargs and ImageSpec.from_dict(rgb.image_spec) == IMAGENET_RGB


def test_a_checkpoints_bands_and_normalisation_are_kept_for_other_data_of_its_kind():
    pretrained = PretrainConfig(data="x", model_kwargs=dict(TINY), bands="nir,red,green")
    fix_image_spec(pretrained, RECORD)
    labelled = {**RECORD, "mean": [10.0, 20.0, 30.0, 40.0], "std": [1.0, 2.0, 3.0, 4.0]}  # a small set's own
    kept = FinetuneConfig(data="y", model_kwargs=dict(TINY))
    spec = fix_image_spec(kept, labelled, pretrained.image_spec)
    assert spec == ImageSpec.from_dict(pretrained.image_spec) and spec.bands == (3, 2, 1)
    assert spec.mean == (3000.0, 1200.0, 1100.0)  # what pretraining normalised with, not the set's (40, 30, 20)
    own = FinetuneConfig(data="y", model_kwargs=dict(TINY), mean="0", std="1")  # an option given: the data's way
    assert fix_image_spec(own, labelled, pretrained.image_spec).mean == (0.0,) * 4
    other = {**labelled, "dtype": "float32"}  # other data than the encoder's: its own statistics, all its bands
    assert fix_image_spec(FinetuneConfig(data="y"), other, pretrained.image_spec).mean == (10.0, 20.0, 30.0, 40.0)
    assert fix_image_spec(FinetuneConfig(data="y"), None, pretrained.image_spec) == IMAGENET_RGB  # photos


# ---------------------------------------------------------------------------------------------- augmentation


def test_the_papers_crop_and_flip_keep_every_channel_and_16_bit_values():
    image = torch.arange(5 * 40 * 40, dtype=torch.float32).view(5, 40, 40) * 7 + 40000  # beyond 8 bits
    view = PretrainTransform(32, MaskGenerator(32, 8, 4))(image)
    assert view["image"].shape == (5, 32, 32) and view["image"].dtype == torch.float32
    assert view["image"].max() > 255 and view["mask"].shape == (8, 8)
    flat = torch.full((4, 40, 40), 51234.0)  # resampled in float32: a few float32 steps (0.004 here), far within
    resampled = PretrainTransform(32, MaskGenerator(32, 8, 4))(flat)["image"]  # one 16-bit step (uint8 would clip)
    assert (resampled - 51234).abs().max() < 0.1
    assert ArrayClassifierTrainTransform(24)(image)["image"].shape == (5, 24, 24)
    assert CropTransform(24)(image)["image"].shape == (5, 24, 24)


# ---------------------------------------------------------------------------------------------- models


def test_simmim_predicts_every_channel():
    model = build_simmim("vit_tiny_patch16_224", 32, {**TINY, "in_chans": 5})
    images, mask = torch.randn(2, 5, 32, 32), MaskGenerator(32, 8, 4)(2)
    loss, reconstruction = model(images, mask)
    assert reconstruction.shape == (2, 5, 32, 32) and torch.isfinite(loss)


def test_rgb_weights_load_into_more_channels_with_timms_adaptation():
    rgb = create_backbone("vit_tiny_patch16_224", 32, TINY)
    four = create_backbone("vit_tiny_patch16_224", 32, {**TINY, "in_chans": 4})
    report = load_encoder(four, Weights(encoder=rgb.state_dict(), source="timm", path="rgb.pth"))
    assert any("adapted the 3-channel patch embedding to 4 channels" in note for note in report.adapted)
    from timm.models import adapt_input_conv

    expected = adapt_input_conv(4, rgb.patch_embed.proj.weight.detach())
    assert torch.equal(four.patch_embed.proj.weight.detach(), expected)
    two = create_backbone("vit_tiny_patch16_224", 32, {**TINY, "in_chans": 2})
    with pytest.raises(SimmimError, match="these weights take 4 input channels and the data has 2"):
        load_encoder(two, Weights(encoder=four.state_dict(), source="timm", path="four.pth"))


def test_a_16_bit_tiff_decodes_through_the_spec_at_full_precision():
    tifffile = pytest.importorskip("tifffile")
    bands = np.random.default_rng(0).integers(0, 65536, (4, 12, 12), dtype=np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, bands, photometric="minisblack", planarconfig="separate")
    spec = spec_for_data(RECORD, bands="3,0")
    tensor = spec.tensor_decoder()(buffer.getvalue())
    assert torch.equal(tensor, torch.from_numpy(bands[[3, 0]].astype(np.float32)))
    with pytest.raises(ValueError, match="the image has 4 band"):  # a file of other bands: a bad sample
        ImageSpec.from_dict({**spec.to_dict(), "source_channels": 5}).tensor_decoder()(buffer.getvalue())


# ---------------------------------------------------------------------------------------------- previews


def test_previews_show_photos_as_they_are_and_other_bands_stretched():
    from simmim_cli.visualize import display_values, recon_panel

    photos = torch.rand(2, 3, 8, 8)
    shown, _ = display_values(photos, photos, IMAGENET_RGB)
    assert torch.equal(shown, photos)  # ImageNet-normalised 8-bit RGB: values in [0, 1], as always
    spec = spec_for_data(RECORD)
    counts = torch.linspace(0, 60000, 4 * 16 * 16).view(1, 4, 16, 16)
    shown, predicted = display_values(counts, counts + 100000, spec, bands=[3, 2, 1])
    assert shown.shape == (1, 3, 16, 16) and shown.min() == 0 and shown.max() == 1
    assert torch.equal(predicted, torch.ones_like(predicted))  # the original's stretch, clamped
    grey, _ = display_values(counts, counts, spec, bands=[2])
    assert grey.shape == (1, 3, 16, 16) and torch.equal(grey[:, 0], grey[:, 2])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    panel = recon_panel(spec.normalize(counts), mask, spec.normalize(counts), 4, spec=spec)
    assert panel.size[0] > 4 * 16


@pytest.mark.gpu
def test_the_normalisation_on_the_gpu_matches_the_cpus():
    spec = spec_for_data(RECORD, bands="nir,red,green")
    images = torch.randint(0, 65536, (4, 3, 32, 32)).float()
    assert torch.allclose(spec.normalize(images.cuda()).cpu(), spec.normalize(images), rtol=1e-6, atol=1e-6)
    photos = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(IMAGENET_RGB.normalize(photos.cuda()).cpu(), IMAGENET_RGB.normalize(photos), atol=1e-6)


def test_an_8_bit_rgb_tiff_is_rgb_imagenet_normalised_with_the_colour_augmentations():
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    from simmim_cli.transforms import ClassifierTrainTransform

    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric="rgb")
    spec = spec_for_data({"channels": 3, "dtype": "uint8", "formats": {"tiff": 1}})
    assert spec.rgb8 and not spec.photo and (spec.mean, spec.std, spec.scale) == (
        IMAGENET_RGB.mean, IMAGENET_RGB.std, 255.0)
    image = spec.image_decoder()(buffer.getvalue())
    assert isinstance(image, Image.Image) and np.array_equal(np.asarray(image), pixels)  # PIL: timm's RandAugment
    assert ClassifierTrainTransform(32, "rand-m9-mstd0.5-inc1", 0.4)(image)["image"].dtype == torch.uint8
    assert torch.equal(spec.tensor_decoder()(buffer.getvalue()), torch.from_numpy(pixels).permute(2, 0, 1))
