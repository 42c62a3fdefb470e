"""finetune, linear-probe and evaluate end to end on tiny labelled shards of real digits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import TINY_MODELS, digit_images, digit_labels, free_port
from PIL import Image
from typer.testing import CliRunner

from simmim_cli import checkpoints
from simmim_cli.cli import app
from simmim_cli.shards import write_shards

runner = CliRunner()
VIT_NAME, VIT_KWARGS, SIZE = TINY_MODELS["vit"]
TRAIN = ["--batch-size", "8", "--warmup-epochs", "1", "--log-every", "2", "--workers", "0", "--base-lr", "0.01"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """Three digit classes as image folders and shards: 48 training and 24 validation images."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = digit_images(300, SIZE), digit_labels(300)
    kept = [(image.convert("L"), label) for image, label in zip(images, labels, strict=True) if label < 3]
    for split, part in (("train", kept[:48]), ("val", kept[48:72])):
        for index, (image, label) in enumerate(part):
            folder = root / "images" / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index}.png")
        write_shards(root / "images" / split, root / "shards" / split, maxcount=16, split=split)
    return {"train": root / "shards" / "train", "val": root / "shards" / "val",
            "val_images": root / "images" / "val", "root": root}


@pytest.fixture(scope="module")
def pretrained(digits, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pre") / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(digits["train"]), "--output", str(run), "--model",
                                 VIT_NAME, "--model-kwargs", json.dumps(VIT_KWARGS), "--img-size", str(SIZE),
                                 "--mask-patch-size", "16", "--epochs", "2", *TRAIN])
    assert result.exit_code == 0, result.output
    return checkpoints.latest_checkpoint(run)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_from_a_pretrain_checkpoint_evaluates_and_keeps_best_and_last(digits, pretrained, tmp_path):
    run = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", "--pretrained", str(pretrained), "--data", str(digits["train"]),
                                 "--val-data", str(digits["val"]), "--output", str(run), "--epochs", "3",
                                 "--model-ema", *TRAIN])
    assert result.exit_code == 0, result.output
    assert f"loaded {pretrained}" in result.output
    val_rows = [r for r in rows(run) if "val_top1" in r]
    assert [r["epoch"] for r in val_rows] == [1, 2, 3]
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 100 for r in val_rows)
    assert f"epoch 3: val_top1 {val_rows[-1]['val_top1']:.2f}%  val_top5 {val_rows[-1]['val_top5']:.2f}%" \
        in result.output  # in % as evaluate prints it
    # the summary: the best epoch, the files, what to run next; metrics.png with the validation panel
    best_row = max(val_rows, key=lambda r: r["val_top1"])
    assert f"best val_top1 {best_row['val_top1']:.2f}% at epoch {best_row['epoch']}" in result.output
    assert f"  best        {run / 'best.pth'}" in result.output
    assert f"simmim evaluate --checkpoint {run / 'best.pth'} --data {digits['val']}" in result.output
    summary = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    assert (summary["best_val_top1"], summary["best_epoch"]) == (best_row["val_top1"], best_row["epoch"])
    assert Image.open(run / "metrics.png").size == (800, 780)  # loss, lr and the validation panel
    best, last = (checkpoints.load_checkpoint(run / name) for name in ("best.pth", "last.pth"))
    assert best["kind"] == last["kind"] == "finetune" and best["classes"] == ["digit0", "digit1", "digit2"]
    assert best["metrics"]["val_top1"] == max(r["val_top1"] for r in val_rows)
    assert last["metrics"]["epoch"] == 3 and "optimizer" not in last
    config = best["config"]
    assert config["model"] == VIT_NAME and config["img_size"] == SIZE
    assert config["layer_decay"] == round(0.5 ** (1 / 3), 3)  # a short run: fitted to the 2 blocks
    # evaluate gives the same top-1 on the same validation data as the run's last epoch
    report = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "last.pth"), "--data", str(digits["val"]),
                                 "--output", str(report), "--workers", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(val_rows[-1]["val_top1"]) and metrics["count"] == 24
    assert [c["class"] for c in metrics["per_class"]] == ["digit0", "digit1", "digit2"]
    matrix = json.loads((report / "confusion.json").read_text())["matrix"]
    assert sum(map(sum, matrix)) == 24
    assert (report / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    again = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "last.pth"), "--data", str(digits["val"]),
                                "--output", str(report)])
    assert again.exit_code == 2 and "--force" in again.output



@pytest.mark.slow
def test_evaluate_reads_a_class_folder(digits, pretrained, tmp_path):
    run = tmp_path / "ft"
    assert runner.invoke(app, ["finetune", "--pretrained", str(pretrained), "--data", str(digits["train"]),
                               "--output", str(run), "--epochs", "2", *TRAIN]).exit_code == 0
    assert not (run / "best.pth").exists() and (run / "last.pth").exists()  # no --val-data, no best
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "last.pth"), "--data",
                                 str(digits["val_images"]), "--output", str(tmp_path / "report"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["count"] == 24
    # two processes split the images and sum the counts: the same report
    split = subprocess.run([sys.executable, "-m", "simmim_cli", "evaluate", "--checkpoint", str(run / "last.pth"),
                            "--data", str(digits["val_images"]), "--output", str(tmp_path / "report2"), "--workers",
                            "0", "--nproc", "2", "--device", "cpu", "--master-port", str(free_port())],
                           capture_output=True, text=True, timeout=240, cwd=Path(__file__).parent.parent,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert split.returncode == 0, split.stderr
    assert "top-1" in split.stdout and "confusion.png" in split.stdout
    split_metrics = json.loads((tmp_path / "report2" / "metrics.json").read_text())
    assert {k: split_metrics[k] for k in ("count", "top1", "top5", "per_class")} == {
        k: metrics[k] for k in ("count", "top1", "top5", "per_class")}
    # the exported model scores the same images identically; the int8 one is evaluated the same way
    for flags, name in (([], "m.onnx"), (["--int8", "--no-verify"], "q.onnx")):
        exported = runner.invoke(app, ["export", "--checkpoint", str(run / "last.pth"), "--output",
                                       str(tmp_path / name), *flags])
        assert exported.exit_code == 0, exported.output
        result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / name), "--data",
                                     str(digits["val_images"]), "--output", str(tmp_path / name[0]), "--workers", "0"])
        assert result.exit_code == 0, result.output
        onnx_metrics = json.loads((tmp_path / name[0] / "metrics.json").read_text())
        assert onnx_metrics["count"] == 24 and onnx_metrics["checkpoint"] == str(tmp_path / name)
        if not flags:
            assert onnx_metrics["top1"] == metrics["top1"] and onnx_metrics["per_class"] == metrics["per_class"]
    missing = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "none.onnx"), "--data",
                                  str(digits["val_images"]), "--output", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "none.onnx not found" in missing.output


def test_finetune_from_scratch_needs_a_model(digits, tmp_path):
    result = runner.invoke(app, ["finetune", "--data", str(digits["train"]), "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--pretrained" in result.output
    result = runner.invoke(app, ["finetune", "--data", str(digits["train"]), "--model", VIT_NAME, "--model-kwargs",
                                 json.dumps(VIT_KWARGS), "--img-size", str(SIZE), "--output", str(tmp_path / "s"),
                                 "--epochs", "1", "--warmup-epochs", "0.5", "--batch-size", "8", "--workers", "0"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("cache", [False, True])
def test_linear_probe_pretrained_and_random(digits, pretrained, tmp_path, cache):
    common = ["--data", str(digits["train"]), "--val-data", str(digits["val"]), "--epochs", "3", *TRAIN]
    if cache:
        common.append("--cache-features")
    result = runner.invoke(app, ["linear-probe", "--pretrained", str(pretrained), "--output", str(tmp_path / "lp"),
                                 "--layer", "0", "--pool", "cls", *common])
    assert result.exit_code == 0, result.output
    val_rows = [r for r in rows(tmp_path / "lp") if "val_top1" in r]
    assert len(val_rows) == 3 and all(0 <= r["val_top1"] <= 100 for r in val_rows)
    best = checkpoints.load_checkpoint(tmp_path / "lp" / "best.pth")
    assert best["kind"] == "linear-probe" and best["config"]["layer"] == 0
    if cache:
        assert list((tmp_path / "lp" / "features").glob("*/features.pt"))
    # the baseline: a random encoder of the same architecture (no --pretrained)
    result = runner.invoke(app, ["linear-probe", "--model", VIT_NAME, "--model-kwargs", json.dumps(VIT_KWARGS),
                                 "--img-size", str(SIZE), "--output", str(tmp_path / "random"), *common])
    assert result.exit_code == 0, result.output
    report = tmp_path / "report"
    assert runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "lp" / "best.pth"), "--data",
                               str(digits["val"]), "--output", str(report), "--workers", "0"]).exit_code == 0
    assert json.loads((report / "metrics.json").read_text())["count"] == 24


def test_probe_features_are_cached_and_reused(digits, pretrained, tmp_path):
    cache = tmp_path / "cache"
    common = ["linear-probe", "--pretrained", str(pretrained), "--data", str(digits["train"]), "--cache-features",
              "--cache-dir", str(cache), "--epochs", "2", *TRAIN]
    assert runner.invoke(app, [*common, "--output", str(tmp_path / "a")]).exit_code == 0
    files = sorted(cache.rglob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in files]
    assert runner.invoke(app, [*common, "--output", str(tmp_path / "b")]).exit_code == 0
    assert sorted(cache.rglob("*.pt")) == files and [p.stat().st_mtime_ns for p in files] == stamps
    assert runner.invoke(app, [*common, "--output", str(tmp_path / "c"), "--layer", "0"]).exit_code == 0
    assert len(list(cache.rglob("*.pt"))) == 2  # another layer, other features


# ---------------------------------------------------------------------------------------------- bad input


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[-1]


def test_unlabelled_shards_are_refused(tmp_path, photo_folder):
    write_shards(photo_folder, tmp_path / "unlabelled")
    line = one_line_error(runner.invoke(app, ["finetune", "--model", VIT_NAME, "--data",
                                              str(tmp_path / "unlabelled"), "--output", str(tmp_path / "run")]))
    assert "no class names" in line


def test_labels_outside_the_class_range_are_named(digits, tmp_path):
    shards = tmp_path / "bad"
    shards.mkdir()
    with wds.TarWriter(str(shards / "train-000000.tar")) as writer:
        for index in range(8):
            png = (digits["root"] / "images" / "train" / "digit0").glob("*.png").__next__().read_bytes()
            writer.write({"__key__": f"s{index}", "png": png, "cls": 7 if index == 5 else 1})
    info = {"splits": {"train": {"name": "train", "num_samples": 8, "filenames": ["train-000000.tar"],
                                 "shard_lengths": [8]}}, "classes": ["a", "b"], "num_classes": 2}
    (shards / "_info.json").write_text(json.dumps(info))
    line = one_line_error(runner.invoke(app, ["finetune", "--model", VIT_NAME, "--model-kwargs",
                                              json.dumps(VIT_KWARGS), "--img-size", str(SIZE), "--data", str(shards),
                                              "--output", str(tmp_path / "run"), "--epochs", "1", "--warmup-epochs",
                                              "0.5", "--batch-size", "4", "--workers", "0"]))
    assert "has label 7, outside 0..1" in line


def test_corrupt_and_foreign_checkpoints_are_refused(digits, pretrained, tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(pretrained.read_bytes()[:1000])
    args = ["finetune", "--data", str(digits["train"]), "--output", str(tmp_path / "run")]
    assert "truncated or corrupt" in one_line_error(runner.invoke(app, [*args, "--pretrained", str(broken)]))
    other = ["--model", "swin_tiny_patch4_window7_224", "--model-kwargs",
             json.dumps({"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4})]
    line = one_line_error(runner.invoke(app, [*args, "--pretrained", str(pretrained), *other]))
    assert "does not fit this model" in line or "--model-kwargs" in line
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_image_size_the_model_cannot_take(digits, pretrained, tmp_path):
    line = one_line_error(runner.invoke(app, ["finetune", "--pretrained", str(pretrained), "--data",
                                              str(digits["train"]), "--img-size", "36", "--output",
                                              str(tmp_path / "run")]))
    assert "--img-size 36" in line or "img_size" in line or "36" in line


def test_evaluate_needs_a_classifier(pretrained, digits, tmp_path):
    line = one_line_error(runner.invoke(app, ["evaluate", "--checkpoint", str(pretrained), "--data",
                                              str(digits["val"]), "--output", str(tmp_path / "r")]))
    assert "not a classifier" in line


def test_recipes_for_finetune_and_probe_load(monkeypatch):
    from simmim_cli import models
    from simmim_cli.commands import finetune, probe

    seen = []
    monkeypatch.setattr(finetune, "finetune", seen.append)
    monkeypatch.setattr(probe, "linear_probe", seen.append)
    root = Path(__file__).parent.parent / "recipes"
    for recipe in sorted(root.glob("finetune_*.yaml")) + sorted(root.glob("linear_probe_*.yaml")):
        command = "finetune" if recipe.name.startswith("finetune") else "linear-probe"
        result = runner.invoke(app, [command, "--recipe", str(recipe), "--data", "x/", "--pretrained", "p.pth"])
        assert result.exit_code == 0, f"{recipe}: {result.output}"
    assert len(seen) >= 4
    for config in seen:  # the recipes' models build (on the meta device: no memory, no compute)
        if config.model:
            with torch.device("meta"):
                model = models.make_classifier(config, 10, probe=config.command == "linear-probe")
                assert model.eval()(torch.empty(2, 3, config.img_size, config.img_size)).shape == (2, 10)


def test_class_folders_finetune_and_evaluate_through_cached_shards(digits, pretrained, tmp_path):
    images = tmp_path / "images"
    for split in ("train", "val"):
        for path in (digits["root"] / "images" / split).rglob("*.png"):
            target = images / split / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    run = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", "--pretrained", str(pretrained), "--data", str(images / "train"),
                                 "--val-data", str(images / "val"), "--output", str(run), "--epochs", "2", *TRAIN])
    assert result.exit_code == 0, result.output
    assert result.output.count("into shards") == 2
    assert (images / "train.simmim-shards" / "_info.json").is_file() and (images / "val.simmim-shards").is_dir()
    best = checkpoints.load_checkpoint(run / "best.pth")
    assert best["classes"] == ["digit0", "digit1", "digit2"] and best["config"]["data"].endswith(".simmim-shards")
    val_top1 = [r["val_top1"] for r in rows(run) if "val_top1" in r]
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "best.pth"), "--data", str(images / "val"),
                                 "--output", str(tmp_path / "report"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["count"] == 24 and metrics["top1"] == pytest.approx(val_top1[-1])
    probe = runner.invoke(app, ["linear-probe", "--pretrained", str(pretrained), "--data", str(images / "train"),
                                "--output", str(tmp_path / "lp"), "--epochs", "2", *TRAIN])
    assert probe.exit_code == 0, probe.output
    assert "using its shards" in probe.output
    flat = runner.invoke(app, ["finetune", "--pretrained", str(pretrained), "--data", str(images / "train" / "digit0"),
                               "--output", str(tmp_path / "flat"), *TRAIN])
    assert "no class sub-folders" in one_line_error(flat)
