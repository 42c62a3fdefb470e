"""--decode gpu (dali.py): DALI's CPU-only mode runs the same pipeline graph as on the GPU; the index files;
the one-line errors without DALI or without a GPU. GPU-only checks carry the ``gpu`` marker."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import TINY_MODELS
from typer.testing import CliRunner

from simmim_cli import dali
from simmim_cli.cli import app
from simmim_cli.data_sources import labelled_shards
from simmim_cli.errors import SimmimError
from simmim_cli.masking import MaskGenerator
from simmim_cli.pipeline import EvalStream
from simmim_cli.shards import read_dali_index_count, resolve_shards, write_dali_index, write_shards
from simmim_cli.transforms import CropTransform

runner = CliRunner()
needs_dali = pytest.mark.skipif(not dali.dali_installed(), reason=f"NVIDIA DALI is not installed ({dali.INSTALL})")
SIZE = 32


@pytest.fixture(scope="module")
def photo_shards(photo_folder, tmp_path_factory) -> Path:
    """Unlabelled shards: 24 samples (photo crops as JPEG, digits as PNG) in shards of 9, 9 and 6."""
    out = tmp_path_factory.mktemp("dali-shards")
    write_shards(photo_folder, out, maxcount=9, seed=0)
    return out


@pytest.fixture(scope="module")
def class_shards(labelled_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dali-class-shards")
    write_shards(labelled_folder, out, maxcount=8, seed=0)
    return out


def add_corrupt_shard(folder: Path, checked: bool) -> None:
    """A shard with a corrupt JPEG between two good ones; its index written with or without the decode check
    (without: DALI itself meets the corrupt image)."""
    good = next(folder.glob("*.tar"))
    samples = list(wds.tariterators.tarfile_samples(iter([{"url": str(good)}])))[:2]
    with wds.TarWriter(str(folder / "train-000099.tar")) as writer:
        writer.write({"__key__": "good0", "jpg": samples[0]["jpg"] if "jpg" in samples[0] else samples[0]["png"]})
        writer.write({"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 garbage" * 20})
        writer.write({"__key__": "good1", "jpg": samples[1]["jpg"] if "jpg" in samples[1] else samples[1]["png"]})
    info = json.loads((folder / "_info.json").read_text())
    split = info["splits"]["train"]
    split["filenames"].append("train-000099.tar")
    split["shard_lengths"].append(3)
    split["num_samples"] += 3
    (folder / "_info.json").write_text(json.dumps(info))
    if not checked:
        write_dali_index(folder / "train-000099.tar")


def first_batches(stream, epoch: int = 0, count: int = 2) -> list[dict]:
    stream.set_epoch(epoch)
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


# ---------------------------------------------------------------------------------------------- index files


def test_make_shards_writes_an_index_whose_offsets_point_at_each_file(photo_shards):
    for shard in sorted(photo_shards.glob("*.tar")):
        lines = shard.with_suffix(".idx").read_text().splitlines()
        version, count = lines[0].split()
        assert version == "v1.2" and int(count) == len(lines) - 1 == read_dali_index_count(shard)
        data = shard.read_bytes()
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        for line in lines[1:]:
            fields = line.split()
            for extension, offset, size, name in zip(*[iter(fields)] * 4, strict=True):
                assert name.endswith("." + extension)
                assert data[int(offset):int(offset) + int(size)] == members[name]


def test_an_index_older_than_its_shard_counts_as_missing(photo_shards, tmp_path):
    shard = tmp_path / "a.tar"
    shutil.copy(next(photo_shards.glob("*.tar")), shard)
    write_dali_index(shard)
    assert read_dali_index_count(shard) is not None
    shard.touch()
    import os

    os.utime(shard.with_suffix(".idx"), (0, 0))
    assert read_dali_index_count(shard) is None


@needs_dali
def test_the_index_matches_dalis_own_wds2idx(photo_shards, tmp_path):
    tool = shutil.which("wds2idx") or str(Path(__import__("sys").executable).parent / "wds2idx")
    shard = next(photo_shards.glob("*.tar"))
    subprocess.run([tool, str(shard), str(tmp_path / "theirs.idx")], check=True, capture_output=True)
    assert shard.with_suffix(".idx").read_text() == (tmp_path / "theirs.idx").read_text()


def test_the_first_gpu_run_leaves_undecodable_samples_out_of_the_index(photo_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(photo_shards, folder)
    add_corrupt_shard(folder, checked=True)
    assert dali.ensure_indexes(resolve_shards(str(folder))) == 1  # built here, with the decode check
    assert read_dali_index_count(folder / "train-000099.tar") == 2


def test_remote_shards_are_refused_in_one_line():
    from simmim_cli.shards import ShardSet

    with pytest.raises(SimmimError, match="local shard files"):
        dali.ensure_indexes(ShardSet(urls=["https://example.org/a.tar"], num_samples=1))


# ---------------------------------------------------------------------------------------------- the CPU-mode graph


@needs_dali
def test_pretrain_batches_have_the_cpu_streams_shapes_and_ranges(photo_shards):
    masks = MaskGenerator(SIZE, 16, 8, 0.6)
    stream = dali.DaliStream(resolve_shards(str(photo_shards)), dali.pretrain_augment(SIZE), 4, "cpu",
                             workers=1, masks=masks, shuffle_buffer=8)
    assert stream.batches_per_epoch == 6  # 24 / 4
    stream.set_epoch(0)
    batches = list(stream)
    assert len(batches) == 6
    for batch in batches:
        assert set(batch) == {"image", "mask", "skipped"}
        assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
        assert batch["mask"].shape == (4, 4, 4) and batch["mask"].dtype == torch.bool
        assert (batch["mask"].flatten(1).sum(1) == 4 * masks.num_masked).all()  # 2×2 cells, each 2×2 patches
        assert batch["skipped"] == []
    images = torch.cat([b["image"] for b in batches]).float()
    assert images.std() > 20 and images.min() < 30 and images.max() > 220  # real photos, not blank crops


@needs_dali
def test_the_same_seed_gives_the_same_batches_and_another_seed_others(photo_shards):
    shards = resolve_shards(str(photo_shards))

    def stream(seed):
        return dali.DaliStream(shards, dali.pretrain_augment(SIZE), 4, "cpu", seed=seed, workers=1,
                               masks=MaskGenerator(SIZE, 16, 8, 0.6), shuffle_buffer=8)

    first, again, other = first_batches(stream(1)), first_batches(stream(1)), first_batches(stream(2))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(first[0]["image"], other[0]["image"])
    next_epoch = first_batches(stream(1), epoch=1)
    assert not torch.equal(first[0]["image"], next_epoch[0]["image"])


@needs_dali
@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_every_simulated_rank_gets_the_same_number_of_batches(photo_shards, world_size):
    shards = resolve_shards(str(photo_shards))  # 24 samples in 3 shards of 9, 9, 6
    counts = []
    for rank in range(world_size):
        stream = dali.DaliStream(shards, dali.pretrain_augment(SIZE), 4, "cpu", rank=rank, world_size=world_size,
                                 workers=1, shuffle_buffer=8)
        stream.set_epoch(0)
        counts.append(sum(1 for _ in stream))
    assert counts == [-(-24 // (4 * world_size))] * world_size


@needs_dali
def test_a_resumed_epoch_yields_only_the_batches_left(photo_shards):
    stream = dali.DaliStream(resolve_shards(str(photo_shards)), dali.pretrain_augment(SIZE), 4, "cpu", workers=1,
                             shuffle_buffer=8)
    stream.set_epoch(0, skip_batches=5)
    assert sum(1 for _ in stream) == stream.batches_per_epoch - 5


@needs_dali
def test_a_sample_left_out_of_the_index_is_counted_every_epoch(photo_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(photo_shards, folder)
    add_corrupt_shard(folder, checked=True)
    stream = dali.DaliStream(resolve_shards(str(folder)), dali.pretrain_augment(SIZE), 4, "cpu", workers=1,
                             shuffle_buffer=8)
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        batches = list(stream)
        assert len(batches) == stream.batches_per_epoch == 7  # ceil(27 / 4)
        assert sum(len(b["skipped"]) for b in batches) == 1


@needs_dali
def test_a_corrupt_image_dali_meets_drops_its_batch_and_is_counted_not_a_crash(photo_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(photo_shards, folder)
    add_corrupt_shard(folder, checked=False)  # DALI itself reads the corrupt JPEG
    stream = dali.DaliStream(resolve_shards(str(folder)), dali.pretrain_augment(SIZE), 4, "cpu", workers=1,
                             shuffle_buffer=8)
    stream.set_epoch(0)
    batches = list(stream)
    assert len(batches) == stream.batches_per_epoch
    skipped = [entry for b in batches for entry in b["skipped"]]
    assert skipped and len(skipped) % 4 == 0 and "DALI could not decode a batch" in skipped[0]
    assert all(b["image"].shape == (4, 3, SIZE, SIZE) for b in batches)


@needs_dali
def test_finetune_batches_carry_labels_and_randaugment_runs(class_shards):
    shards = labelled_shards(str(class_shards))
    augment = dali.classifier_augment(SIZE, "rand-m9-mstd0.5-inc1", 0.4, 0.08, 0.5)
    assert augment.rand_augment == (2, 9) and augment.bicubic
    stream = dali.DaliStream(shards, augment, 4, "cpu", workers=1, labels=True, num_classes=3, shuffle_buffer=8)
    stream.set_epoch(0)
    batches = list(stream)
    labels = torch.cat([b["label"] for b in batches])
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1, 2} and len(set(labels.tolist())) > 1
    assert all(b["image"].shape == (4, 3, SIZE, SIZE) for b in batches)


def test_only_randaugment_policies_run_on_dali():
    assert dali.classifier_augment(SIZE, "rand-m7-n3").rand_augment == (3, 7)
    assert dali.classifier_augment(SIZE, None, 0.4).color_jitter == 0.4
    with pytest.raises(SimmimError, match="RandAugment policies"):
        dali.classifier_augment(SIZE, "augmix-m5")


@needs_dali
def test_the_eval_stream_reads_every_sample_once_in_the_cpu_streams_order(class_shards):
    shards = labelled_shards(str(class_shards))
    stream = dali.DaliEvalStream(shards, dali.eval_view(SIZE, 0.875), 5, "cpu", workers=1, num_classes=3)
    batches = list(stream)
    cpu = list(EvalStream(shards, CropTransform(SIZE, 0.875), 5, num_classes=3))
    assert torch.cat([b["label"] for b in batches]).tolist() == torch.cat([b["label"] for b in cpu]).tolist()
    assert [b["image"].shape for b in batches] == [b["image"].shape for b in cpu]
    # the same resize and centre crop (DALI's and torchvision's bicubic differ by a few levels)
    difference = (torch.cat([b["image"] for b in batches]).float() - torch.cat([b["image"] for b in cpu]).float())
    assert difference.abs().mean() < 8


# ---------------------------------------------------------------------------------------------- the command line


def tiny_pretrain(shards: Path, output: Path, *extra: str) -> list[str]:
    name, kwargs, size = TINY_MODELS["vit"]
    return ["pretrain", "--data", str(shards), "--output", str(output), "--model", name, "--model-kwargs",
            json.dumps(kwargs), "--img-size", str(size), "--mask-patch-size", "16", "--batch-size", "4",
            "--epochs", "2", "--warmup-epochs", "1", "--log-every", "2", "--device", "cpu", *extra]


@pytest.mark.parametrize("command", ["pretrain", "finetune", "linear-probe", "evaluate"])
def test_without_dali_decode_gpu_is_one_line_naming_the_install(command, photo_shards, monkeypatch, tmp_path):
    monkeypatch.setattr(dali, "dali_installed", lambda: False)
    args = {"pretrain": tiny_pretrain(photo_shards, tmp_path / "run"),
            "finetune": ["finetune", "--data", str(photo_shards), "--model", "vit_tiny_patch16_224"],
            "linear-probe": ["linear-probe", "--data", str(photo_shards), "--model", "vit_tiny_patch16_224"],
            "evaluate": ["evaluate", "--data", str(photo_shards), "--checkpoint", str(tmp_path / "x.pth")]}[command]
    result = runner.invoke(app, [*args, "--decode", "gpu"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and 'pip install "simmim-cli[dali]"' in lines[0], result.output


def test_without_a_gpu_decode_gpu_is_one_line(photo_shards, monkeypatch, tmp_path):
    monkeypatch.setattr(dali, "dali_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, [*tiny_pretrain(photo_shards, tmp_path / "run"), "--device", "auto",
                                 "--decode", "gpu"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --decode gpu decodes on an NVIDIA GPU and no CUDA GPU is visible here; use --decode cpu"]


@pytest.mark.parametrize("command", ["pretrain", "finetune", "linear-probe", "evaluate"])
def test_help_names_the_install_and_the_resume_order(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())
    assert 'pip install "simmim-cli[dali]"' in text and "epoch's order differs" in text


def test_an_unknown_decoder_is_one_line(photo_shards, tmp_path):
    result = runner.invoke(app, [*tiny_pretrain(photo_shards, tmp_path / "run"), "--decode", "nvjpeg"])
    assert result.exit_code == 2 and "--decode must be one of cpu, gpu" in result.output


@needs_dali
def test_pretrain_with_decode_gpu_trains_and_resumes_on_dalis_cpu_mode(photo_shards, tmp_path, monkeypatch):
    """The whole command with the DALI stream, its graph on DALI's CPU operators (require_dali lets it run)."""
    monkeypatch.setattr(dali, "require_dali", lambda device="auto": None)
    folder = tmp_path / "shards"
    shutil.copytree(photo_shards, folder)
    add_corrupt_shard(folder, checked=True)
    run = tmp_path / "run"
    result = runner.invoke(app, [*tiny_pretrain(folder, run, "--max-steps", "3"), "--decode", "gpu",
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*tiny_pretrain(folder, run, "--resume", "auto"), "--decode", "gpu", "--workers", "1"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps[-1] == 2 * 7 and all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # 27 samples / 4
    assert max(r["skipped_samples"] for r in rows if "loss" in r) >= 1
    assert (run / "checkpoint-00000014.pth").is_file()


# ---------------------------------------------------------------------------------------------- on a GPU


@needs_dali
@pytest.mark.gpu
def test_on_a_gpu_batches_are_decoded_on_it(photo_shards):
    device = torch.device("cuda", 0)
    stream = dali.DaliStream(resolve_shards(str(photo_shards)), dali.pretrain_augment(SIZE), 4, device,
                             workers=2, masks=MaskGenerator(SIZE, 16, 8, 0.6), shuffle_buffer=8)
    batches = first_batches(stream, count=3)
    for batch in batches:
        assert batch["image"].device == device and batch["mask"].device == device
        assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
    again = first_batches(dali.DaliStream(resolve_shards(str(photo_shards)), dali.pretrain_augment(SIZE), 4, device,
                                          workers=2, masks=MaskGenerator(SIZE, 16, 8, 0.6), shuffle_buffer=8), count=3)
    assert all(torch.equal(a["mask"], b["mask"]) for a, b in zip(batches, again, strict=True))


@needs_dali
@pytest.mark.gpu
def test_on_a_gpu_the_eval_stream_matches_the_cpu_mode(class_shards):
    shards = labelled_shards(str(class_shards))
    gpu = list(dali.DaliEvalStream(shards, dali.eval_view(SIZE, 0.875), 5, "cuda", num_classes=3))
    cpu = list(dali.DaliEvalStream(shards, dali.eval_view(SIZE, 0.875), 5, "cpu", num_classes=3))
    assert torch.cat([b["label"] for b in gpu]).tolist() == torch.cat([b["label"] for b in cpu]).tolist()
    difference = torch.cat([b["image"].cpu() for b in gpu]).float() - torch.cat([b["image"] for b in cpu]).float()
    assert difference.abs().mean() < 4  # hardware/CUDA JPEG decoding differs from libjpeg by a level or two
