"""Domain images end to end, as a user types the commands: a folder of 16-bit multi-band GeoTIFFs and a folder of
DICOM slices through make-shards → pretrain → finetune → evaluate → export → predict, every band and every bit
kept; and a set whose classes only a band beyond RGB tells apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import simmim
from test_image_formats import geotiff_bytes

tifffile = pytest.importorskip("tifffile")
pydicom = pytest.importorskip("pydicom")

TINY = json.dumps({"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})
QUICK = ["--workers", "0", "--device", "cpu", "--batch-size", "8", "--epochs", "1"]


def write_band_classes(folder: Path, per_class: int, size: int = 32, seed: int = 0) -> None:
    """Two classes of uint16 4-band GeoTIFFs (blue, green, red, nir) whose blue, green and red bands are the same
    noise for both: only the near-infrared band, 3,000 counts brighter for "crop", tells them apart."""
    rng = np.random.default_rng(seed)
    for name in ("bare", "crop"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            bands = rng.integers(0, 4000, (4, size, size)).astype(np.uint16)
            if name == "crop":
                bands[3] += 3000
            (folder / name / f"{index:03d}.tif").write_bytes(geotiff_bytes(bands))


def run_ok(*arguments: str) -> str:
    result = simmim(*arguments, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def predictions(*arguments: str) -> dict[str, list]:
    result = simmim("predict", *arguments, "--json", "--workers", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(result.stdout)
    return {row["image"]: [(entry["label"], entry["prob"]) for entry in row["topk"]] for row in rows}


@pytest.mark.slow
def test_a_folder_of_16_bit_geotiffs_goes_through_every_command(tmp_path):
    images = tmp_path / "images"
    write_band_classes(images, per_class=8)
    out = run_ok("make-shards", str(images), str(tmp_path / "shards"), "--workers", "1")
    assert "images: 4 channel(s) of uint16 (blue, green, red, nir)" in out
    run_ok("pretrain", "--data", str(tmp_path / "shards"), "--model", "vit_tiny_patch16_224", "--model-kwargs", TINY,
           "--img-size", "32", "--mask-patch-size", "8", "--output", str(tmp_path / "pt"), *QUICK)
    checkpoint = sorted((tmp_path / "pt").glob("checkpoint-*.pth"))[-1]
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["config"]["image_spec"]["channels"] == 4 and saved["config"]["model_kwargs"]["in_chans"] == 4
    assert saved["model"]["decoder.0.weight"].shape[0] == 4 * 4**2  # the head predicts all 4 bands
    panel = run_ok("visualize-recon", str(images / "crop"), "--checkpoint", str(checkpoint), "--limit", "2",
                   "--show-bands", "nir,red,green", "--per-band", "--output", str(tmp_path / "recon.png"))
    assert (tmp_path / "recon.png").is_file() and (tmp_path / "recon-band3.png").is_file(), panel

    run_ok("finetune", "--data", str(tmp_path / "shards"), "--val-data", str(tmp_path / "shards"), "--pretrained",
           str(checkpoint), "--output", str(tmp_path / "ft"), *QUICK)
    best = tmp_path / "ft" / "best.pth"
    report = run_ok("evaluate", "--checkpoint", str(best), "--data", str(images), "--output", str(tmp_path / "ev"),
                    "--workers", "0")
    assert "(16 images)" in report
    out = run_ok("export", "--checkpoint", str(best), "--output", str(tmp_path / "model.onnx"),
                 "--timm", str(tmp_path / "timm"), "--hf", str(tmp_path / "hf"), "--onnx")
    assert "verified with onnxruntime" in out

    # the exported model answers as the checkpoint does, reading the same 16-bit files with the same scaling
    exported, checkpointed = predictions(str(tmp_path / "model.onnx"), str(images)), predictions(str(best), str(images))
    assert exported.keys() == checkpointed.keys() and len(exported) == 16
    for name, top in exported.items():
        assert [label for label, _ in top] == [label for label, _ in checkpointed[name]]
        assert np.allclose([p for _, p in top], [p for _, p in checkpointed[name]], atol=1e-4)

    from simmim_cli.inference import read_metadata

    spec = torch.load(best, weights_only=True)["config"]["image_spec"]
    metadata = read_metadata(tmp_path / "model.onnx")
    assert metadata["image"] == spec and metadata["channels"] == 4 and metadata["mean"] == spec["mean"]

    import timm

    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert model.patch_embed.proj.in_channels == 4
    assert tuple(model.pretrained_cfg["input_size"]) == (4, 32, 32)
    assert list(model.pretrained_cfg["mean"]) == pytest.approx(spec["mean"])

    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(str(tmp_path / "hf"))
    assert hf_model.config.num_channels == 4
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx(spec["mean"]) and processor["do_rescale"] is False


def write_ct_slices(folder: Path, per_class: int) -> None:
    """CT slices made from pydicom's CT_small.dcm (a real CT image, int16 with intercept −1024): shifted copies,
    and copies with a bright round lesion."""
    source = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[:128, :128]
    for name in ("plain", "lesion"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            slice_ = source.copy()
            pixels = np.roll(source.pixel_array, rng.integers(-20, 20, 2), axis=(0, 1)).astype(np.int16)
            if name == "lesion":
                top, left = rng.integers(30, 98, 2)
                pixels[(rows - top) ** 2 + (columns - left) ** 2 < 100] += 400
            slice_.PixelData = pixels.tobytes()
            slice_.save_as(folder / name / f"slice{index:02d}.dcm")


@pytest.mark.slow
def test_a_folder_of_dicom_slices_trains_in_hounsfield_units(tmp_path):
    slices = tmp_path / "ct"
    write_ct_slices(slices, per_class=8)
    model = ["--model", "vit_tiny_patch16_224", "--model-kwargs", TINY, "--img-size", "64"]
    run_ok("pretrain", "--data", str(slices), *model, "--mask-patch-size", "16", "--output", str(tmp_path / "pt"),
           *QUICK)  # a plain folder as --data: written into shards once, with the same record
    record = json.loads((tmp_path / "ct.simmim-shards" / "_info.json").read_text())["images"]
    values = np.stack([pydicom.dcmread(p).pixel_array.astype(np.float64) - 1024 for p in slices.rglob("*.dcm")])
    assert (record["channels"], record["dtype"], record["formats"]) == (1, "float32", {"dicom": 16})
    assert record["mean"][0] == pytest.approx(values.mean(), rel=1e-6)
    assert record["std"][0] == pytest.approx(values.std(), rel=1e-6)
    checkpoint = sorted((tmp_path / "pt").glob("checkpoint-*.pth"))[-1]
    run_ok("finetune", "--data", str(slices), "--pretrained", str(checkpoint), "--output", str(tmp_path / "ft"),
           *QUICK)
    run_ok("export", "--checkpoint", str(tmp_path / "ft" / "last.pth"), "--output", str(tmp_path / "ct.onnx"))
    found = predictions(str(tmp_path / "ct.onnx"), str(slices / "lesion" / "slice00.dcm"))
    assert list(found) == [str(slices / "lesion" / "slice00.dcm")]


@pytest.mark.slow
def test_the_band_beyond_rgb_arrives(tmp_path):
    """Fine-tuning on all four bands tells the classes apart; on the first three (RGB), it cannot."""
    write_band_classes(tmp_path / "train", per_class=24, seed=0)
    write_band_classes(tmp_path / "val", per_class=12, seed=1)
    scores = {}
    for bands in ("0,1,2", "blue,green,red,nir"):
        run_ok("finetune", "--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val"), "--bands", bands,
               "--model", "vit_tiny_patch16_224", "--model-kwargs", TINY, "--img-size", "32", "--epochs", "6",
               "--batch-size", "16", "--workers", "0", "--device", "cpu", "--output", str(tmp_path / bands))
        rows = [json.loads(line) for line in (tmp_path / bands / "metrics.jsonl").read_text().splitlines()]
        scores[bands] = max(row["val_top1"] for row in rows if "val_top1" in row)
    assert scores["blue,green,red,nir"] >= 90 and scores["0,1,2"] <= 70, scores
