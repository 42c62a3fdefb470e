"""What a run says and leaves when it is done: the summary (printed and as the last row of metrics.jsonl), the plot,
the bounded previews, the plan line with --max-steps, and an MFU that cannot exceed 1."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS
from PIL import Image
from typer.testing import CliRunner

from simmim_cli import flops
from simmim_cli.cli import app
from simmim_cli.config import PretrainConfig
from simmim_cli.shards import write_shards
from simmim_cli.summary import (
    STARTED_ENV,
    Summary,
    command,
    command_clock,
    duration,
    seconds_since_start,
    training_summary,
)
from simmim_cli.tracking import read_rows

runner = CliRunner()


@pytest.fixture(scope="module")
def shards(photo_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(photo_folder, out, maxcount=8)  # 24 images: 6 steps of 4 an epoch
    return out


def tiny(*more: str) -> list[str]:
    name, kwargs, size = TINY_MODELS["vit"]
    return ["--model", name, "--model-kwargs", json.dumps(kwargs), "--img-size", str(size), "--mask-patch-size", "16",
            "--batch-size", "4", "--warmup-epochs", "1", "--base-lr", "0.01", "--workers", "0", *more]


def test_duration_and_text():
    assert [duration(s) for s in (0.4, 42, 252, 7380)] == ["0 s", "42 s", "4 min 12 s", "2 h 03 min"]
    text = Summary("evaluate", 3.2, "top-1 90%", [("metrics", "r/m.json"), ("picture", "r/c.png")],
                   ["simmim export --onnx"]).text()
    assert text.splitlines() == ["done: evaluate in 3 s; top-1 90%", "  metrics  r/m.json", "  picture  r/c.png",
                                 "next:", "  simmim export --onnx"]


def test_a_summary_names_the_data_without_its_credentials(tmp_path):
    secret = "https://ann:hunter2@store.example/train/{000..009}.tar?X-Amz-Signature=abc123"
    done = Summary("knn", 1.0, "", next=[command("simmim", "finetune", "--data", secret)])
    assert "hunter2" not in done.text() and "abc123" not in done.text() and "store.example" in done.text()
    assert "hunter2" not in json.dumps(done.row()) and "abc123" not in json.dumps(done.row())
    (tmp_path / "checkpoint-00000006.pth").write_bytes(b"")
    mixture = PretrainConfig(data=[{"path": "a/", "proportion": 0.3}, {"path": "b/"}], output=str(tmp_path))
    pretrained = training_summary(mixture, tmp_path, 5.0, 6, 6)
    assert any(line.startswith("simmim visualize-recon a/ --checkpoint") for line in pretrained.next)


def test_the_time_counts_from_the_command_start(monkeypatch):
    import os
    import time

    monkeypatch.delenv(STARTED_ENV, raising=False)
    with command_clock():
        os.environ[STARTED_ENV] = str(time.time() - 100)  # as a launched worker finds its command's start
        assert seconds_since_start(time.time()) >= 100
    assert STARTED_ENV not in os.environ  # a library call after it counts from its own start
    assert seconds_since_start(time.time() - 5) == pytest.approx(5, abs=1)


@pytest.mark.slow
def test_a_pretraining_run_ends_with_its_summary_a_plot_and_bounded_previews(shards, tmp_path, monkeypatch):
    # a "peak" far below what the CPU does, as a timing taken under heavy load would be: MFU must still stay <= 1
    monkeypatch.setattr(flops, "matmul_peak", lambda *args, **kwargs: 1e3)
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(shards), "--output", str(run), "--epochs", "2",
                                 "--max-steps", "5", "--save-every", "1", "--log-every", "1", "--keep-previews", "3",
                                 *tiny()])
    assert result.exit_code == 0, result.output
    assert "6 steps per epoch, 12 in all, stopping after 5 (--max-steps)" in result.output  # the plan line
    assert "(patch 8, 32 px, width 32, depth 2;" in result.output  # the model the kwargs made
    assert "MFU" not in result.output  # a CPU's timed peak: in metrics.jsonl only

    # printed last: time, steps, final loss, files, the next commands
    done = result.output[result.output.index("done: pretrain in"):].splitlines()
    rows = read_rows(run / "metrics.jsonl")
    train = [r for r in rows if "loss" in r and "lr" in r]
    assert f"5 steps of 12 (--max-steps); final training loss {train[-1]['loss']:.4f}" in done[0]
    assert f"  checkpoint  {run / 'checkpoint-00000005.pth'}" in done
    assert f"  plot        {run / 'metrics.png'}" in done
    assert any(line.startswith("  simmim finetune --pretrained " + str(run / "checkpoint-00000005.pth"))
               for line in done)
    assert done[done.index("next:") + 1].startswith("  to train on to step 12: the same command without --max-steps")

    # ... and kept as the last row of metrics.jsonl, which the readers of figures pass over
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    summary = last["summary"]
    assert last["step"] == summary["step"] == 5 and summary["total_steps"] == 12
    assert summary["final_loss"] == round(train[-1]["loss"], 5) and summary["command"] == "pretrain"
    assert summary["files"]["plot"] == str(run / "metrics.png") and summary["next"]
    assert all("summary" not in row for row in rows)

    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert all(0 < r["mfu"] <= 1 for r in train)  # the old code divided by the bad peak: MFU in the millions

    previews = sorted(p.name for p in run.glob("preview-*.png"))  # 5 checkpoints: the first, one between, the newest
    assert len(previews) == 3 and previews[0] == "preview-00000001.png" and previews[-1] == "preview-00000005.png"

    plot = run / "metrics.png"
    assert plot.read_bytes()[:4] == b"\x89PNG" and plot.stat().st_size > 10_000
    assert Image.open(plot).size == (800, 520)  # two panels: loss and lr (no validation in this run)

    # resumed to the end: one summary, the new one, at the end of the file
    again = runner.invoke(app, ["pretrain", "--data", str(shards), "--output", str(run), "--epochs", "2",
                                "--resume", "auto", "--save-every", "1", "--log-every", "1", "--keep-previews", "3",
                                *tiny()])
    assert again.exit_code == 0, again.output
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert ['"summary"' in line for line in lines].count(True) == 1 and '"summary"' in lines[-1]
    assert json.loads(lines[-1])["summary"]["step"] == 12 and "of 12" not in again.output.split("done:")[1]
    assert len(list(run.glob("preview-*.png"))) == 3


def test_keep_previews_takes_all_or_at_least_two(shards, tmp_path):
    result = runner.invoke(app, ["pretrain", "--data", str(shards), "--output", str(tmp_path / "run"),
                                 "--keep-previews", "1", *tiny()])
    assert result.exit_code == 2 and "--keep-previews must be 0 (keep all) or at least 2" in result.output


def test_the_raised_peak_is_at_least_what_was_achieved(monkeypatch):
    timings = iter([5e9])
    monkeypatch.setattr(flops, "matmul_peak", lambda *args, **kwargs: next(timings))
    cpu = torch.device("cpu")
    assert flops.raised_peak(1e9, 3e9, cpu, "fp32") == 5e9  # timed again: the machine is quieter now
    assert flops.raised_peak(1e9, 3e9, torch.device("cuda"), "bf16") == 3e9  # a table peak: the achieved rate
