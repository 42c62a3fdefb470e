"""simmim knn and the k-NN maths, and the signals pretraining logs with --val-data and --knn-data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODELS, digit_images, digit_labels, free_port, simmim
from typer.testing import CliRunner

from simmim_cli.cli import app
from simmim_cli.evaluation import knn_classify
from simmim_cli.shards import write_shards

runner = CliRunner()
VIT_NAME, VIT_KWARGS, SIZE = TINY_MODELS["vit"]
MODEL = ["--model", VIT_NAME, "--model-kwargs", json.dumps(VIT_KWARGS), "--img-size", str(SIZE)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """All ten digit classes: 200 images as the memory bank, the next 100 to classify."""
    return write_digit_shards(tmp_path_factory.mktemp("digits"), {"train": range(200), "val": range(200, 300)})


def test_weighted_votes_follow_the_temperature():
    # one very close neighbour of class 0 against two farther ones of class 1
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query, truth = torch.tensor([[1.0, 0.05]]), torch.tensor([0])
    sharp = knn_classify(bank, labels, query, truth, num_classes=2, k=3, temperature=0.07)
    flat = knn_classify(bank, labels, query, truth, num_classes=2, k=3, temperature=100.0)  # near majority vote
    assert sharp["top1"] == 100.0 and flat["top1"] == 0.0 and flat["top5"] == 100.0
    assert knn_classify(bank, labels, query, truth, num_classes=2, k=1)["top1"] == 100.0
    assert knn_classify(bank, labels, query, truth, num_classes=2, k=50)["k"] == 3  # at most the bank
    # cosine similarity: the length of a feature does not matter
    assert knn_classify(bank * 7, labels, query * 0.1, truth, num_classes=2, k=3) == sharp


def write_digit_shards(root: Path, splits: dict[str, range]) -> dict[str, Path]:
    images, labels = digit_images(max(r.stop for r in splits.values()), SIZE), digit_labels(1797)
    for split, part in splits.items():
        for index in part:
            folder = root / "images" / split / f"digit{labels[index]}"
            folder.mkdir(parents=True, exist_ok=True)
            images[index].convert("L").save(folder / f"{index}.png")
        write_shards(root / "images" / split, root / split, maxcount=500, split=split)
    return {split: root / split for split in splits}


def supervised_encoder(path: Path, count: int, epochs: int = 16) -> Path:
    """A trained encoder: the tiny ViT fitted with labels to the first ``count`` digits (the memory bank) in plain
    PyTorch, saved as a timm state dict."""
    import timm

    from simmim_cli.image_spec import IMAGENET_RGB

    images = IMAGENET_RGB.normalize(torch.stack([
        torch.tensor(np.array(image.convert("L").convert("RGB"))).permute(2, 0, 1)
        for image in digit_images(count, SIZE)]))
    labels = torch.tensor(digit_labels(count))
    torch.manual_seed(0)
    model = timm.create_model(VIT_NAME, img_size=SIZE, num_classes=10, **VIT_KWARGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(count).split(50):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_knn_of_a_trained_encoder_beats_a_random_one(tmp_path):
    # 1,000 digits as memory bank, 200 others to classify; the tiny ViT needs that many to generalise at all
    shards = write_digit_shards(tmp_path, {"train": range(1000), "val": range(1000, 1200)})
    common = [*MODEL, "--data", str(shards["train"]), "--val-data", str(shards["val"]), "--workers", "0",
              "--crop-pct", "1", "--json"]
    random = runner.invoke(app, ["knn", *common])
    assert random.exit_code == 0, random.output
    baseline = json.loads(random.output)
    assert {"top1", "top5", "k"} <= baseline.keys() and baseline["k"] == 20 and baseline["count"] == 200
    result = runner.invoke(app, ["knn", "--pretrained", str(supervised_encoder(tmp_path / "vit.pth", 1000)), *common])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["top1"] > baseline["top1"] + 5, (scores, baseline)  # measured: about 64% against 50%


def test_knn_caches_features_like_linear_probe(digits, tmp_path):
    cache = tmp_path / "cache"
    args = ["knn", *MODEL, "--data", str(digits["train"]), "--val-data", str(digits["val"]), "--workers", "0",
            "--cache-features", "--cache-dir", str(cache), "--layer", "0", "--pool", "cls", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    files = sorted(cache.rglob("*.pt"))
    assert len(files) == 2  # memory bank and queries
    stamps = [p.stat().st_mtime_ns for p in files]
    again = runner.invoke(app, [*args, "--k", "5"])
    assert again.exit_code == 0 and json.loads(again.output)["k"] == 5
    assert [p.stat().st_mtime_ns for p in sorted(cache.rglob("*.pt"))] == stamps  # read back, not recomputed
    plain = runner.invoke(app, [a for a in args if a not in ("--cache-features",)])
    assert json.loads(plain.output)["top1"] == json.loads(first.output)["top1"]
    text = runner.invoke(app, [a for a in args if a != "--json"])
    assert text.exit_code == 0 and "top-1" in text.output and "memory bank of 200" in text.output


@pytest.mark.slow
def test_knn_on_two_processes_gathers_features_into_one_cache_any_process_count_reads(digits, tmp_path):
    cache = tmp_path / "cache"
    args = ["knn", *MODEL, "--data", str(digits["train"]), "--val-data", str(digits["val"]), "--workers", "0",
            "--layer", "0", "--json"]
    single = runner.invoke(app, args)
    assert single.exit_code == 0, single.output
    expected = json.loads(single.output)
    # 2 processes: each extracts half of the images, the halves are gathered, rank 0 scores and its result is printed
    split = simmim(*args, "--nproc", "2", "--device", "cpu", "--master-port", str(free_port()), "--cache-features",
                   "--cache-dir", str(cache))
    assert split.returncode == 0, split.stderr
    result = json.loads(split.stdout.strip().splitlines()[-1])
    assert {k: result[k] for k in ("top1", "top5", "count", "bank")} == {
        k: expected[k] for k in ("top1", "top5", "count", "bank")}
    files = sorted(cache.rglob("features.pt"))
    sizes = sorted(len(torch.load(p, weights_only=True)["labels"]) for p in files)
    assert sizes == [100, 200]  # one file per data set, every image once, whatever the process count
    stamps = [p.stat().st_mtime_ns for p in files]
    again = runner.invoke(app, [*args, "--cache-features", "--cache-dir", str(cache)])  # one process reads them
    assert again.exit_code == 0 and json.loads(again.output)["top1"] == expected["top1"]
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert not list(cache.rglob("*.tmp"))


@pytest.mark.slow
def test_gathered_rows_keep_rank_order_with_uneven_and_empty_shares():
    import torch.multiprocessing as mp

    port = free_port()
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_gather_rows_worker, args=(3, port, results), nprocs=3, start_method="spawn")
    # ranks hold 2, 0 and 5 rows; rank r's rows are r*100 + 0, 1, ...
    expected = torch.tensor([0, 1, 200, 201, 202, 203, 204])
    for rank in range(3):
        assert torch.equal(results[rank], expected), (rank, results[rank])


def _gather_rows_worker(rank: int, world_size: int, port: int, results) -> None:
    import torch.distributed as dist

    from simmim_cli import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    distributed.GATHER_ROWS = 2  # several collectives, one share shorter than a chunk
    rows = torch.arange({0: 2, 1: 0, 2: 5}[rank]) + 100 * rank
    results[rank] = distributed.gather_rows(rows, distributed.Context(rank=rank, world_size=world_size))
    dist.destroy_process_group()


@pytest.mark.parametrize(("extra", "message"), [
    (["--val-data", None], "give --data"),
    (["--k", "0"], "--k must be at least 1"),
    (["--temperature", "0"], "--temperature above 0"),
    (["--pool", "max"], "--pool must be mean or cls"),
    (["--layer", "7"], "--layer 7 is out of range"),
])
def test_knn_bad_input_is_one_line(digits, extra, message):
    args = ["knn", *MODEL, "--data", str(digits["train"]), "--val-data", str(digits["val"]), "--workers", "0"]
    if extra[1] is None:
        args = args[:args.index(extra[0])] + args[args.index(extra[0]) + 2:]
    else:
        args += extra
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_pretraining_logs_val_loss_each_epoch_and_knn_at_each_checkpoint(digits, tmp_path):
    run = tmp_path / "pre"
    result = runner.invoke(app, [
        "pretrain", "--data", str(digits["val"]), "--val-data", str(digits["val"]), "--knn-data",
        str(digits["train"]), "--knn-val-data", str(digits["val"]), "--output", str(run), *MODEL,
        "--mask-patch-size", "16", "--epochs", "2", "--batch-size", "25", "--warmup-epochs", "1", "--workers", "0",
        "--save-every", "2", "--log-every", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert [(r["epoch"], r["step"]) for r in val] == [(1, 4), (2, 8)] and all(0 < r["val_loss"] < 5 for r in val)
    knn = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 4, 6, 8]  # every checkpoint, --save-every ones included
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in knn)
    assert "epoch 1: val_loss" in result.output


def test_pretraining_knn_needs_both_sets(digits, tmp_path):
    result = runner.invoke(app, ["pretrain", "--data", str(digits["train"]), "--knn-data", str(digits["train"]),
                                 "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--knn-val-data" in result.output and "Traceback" not in result.output
