"""`simmim check`: the real launcher, loader and engine steps, measured; forecast and verdict from the figures.

CPU processes over gloo with tiny models. The machine running the tests is shared, so each check and the run it
is compared with run back to back with one torch thread each (oversubscribed OpenMP threads make times erratic).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_MODELS, digit_images, free_port
from PIL import Image
from typer.testing import CliRunner

from simmim_cli import limits, preflight
from simmim_cli.cli import app
from simmim_cli.commands import check as check_command
from simmim_cli.commands import finetune as finetune_command
from simmim_cli.commands import pretrain as pretrain_command
from simmim_cli.shards import write_shards

runner = CliRunner()
QUIET = {"OMP_NUM_THREADS": "1"}
# `simmim ARGS...` that prints its peak resident memory last on stderr (a child's ru_maxrss would also count the
# memory of the process it was forked from, before its exec)
REPORTING_PEAK = """
import atexit, sys
atexit.register(lambda: print(*[l for l in open('/proc/self/status') if l.startswith('VmHWM')], file=sys.stderr))
from simmim_cli.cli import run
sys.argv = ['simmim', *sys.argv[1:]]
run()
"""


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    """384 small PNG digits in 16 shards: quick to decode."""
    source = tmp_path_factory.mktemp("digits")
    for index, image in enumerate(digit_images(384, size=48)):
        image.save(source / f"d{index:03d}.png")
    out = tmp_path_factory.mktemp("digit-shards")
    write_shards(source, out, maxcount=24)
    return out


@pytest.fixture(scope="module")
def heavy_shards(tmp_path_factory) -> Path:
    """Large PNG photos (no reduced-size decoding for PNG): slow to decode beside a tiny model."""
    from sklearn.datasets import load_sample_images

    source = tmp_path_factory.mktemp("heavy")
    photos = load_sample_images().images
    for index in range(12):
        photo = Image.fromarray(photos[index % 2]).resize((1600, 1200))
        photo.rotate(index * 7).save(source / f"p{index:02d}.png", compress_level=1)
    out = tmp_path_factory.mktemp("heavy-shards")
    write_shards(source, out, maxcount=3)
    return out


def tiny(kind: str = "vit", batch: int = 8, **kwargs) -> list[str]:
    name, model_kwargs, size = TINY_MODELS[kind]
    model_kwargs = {**model_kwargs, **kwargs}
    return ["--model", name, "--model-kwargs", json.dumps(model_kwargs), "--img-size", str(size),
            "--mask-patch-size", "16", "--batch-size", str(batch), "--precision", "fp32", "--device", "cpu",
            "--warmup-epochs", "1"]


def run_check(*arguments: str, env: dict | None = None, timeout: float = 180) -> tuple[subprocess.CompletedProcess,
                                                                                       dict | None]:
    """`simmim check --json ...` in a process of its own, as a user runs it: (process, report)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **QUIET, **(env or {})}
    environment.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, "-m", "simmim_cli", "check", "--json", *arguments], capture_output=True,
                            text=True, timeout=timeout, env=environment, cwd=ROOT)
    report = json.loads(result.stdout) if result.stdout.strip().startswith("{") else None
    return result, report


@pytest.mark.slow
def test_two_processes_report_bandwidth_and_each_process_and_touch_no_run_folder(digit_shards, tmp_path):
    run = tmp_path / "run"
    result, report = run_check("pretrain", "--data", str(digit_shards), "--output", str(run), "--nproc", "2",
                               "--workers", "1", "--epochs", "3", "--master-port", str(free_port()), "--steps", "4",
                               *tiny())
    assert result.returncode == 0, result.stderr[-3000:]
    assert not run.exists()  # the run folder named is only read
    assert [p["rank"] for p in report["processes"]] == [0, 1]
    for process in report["processes"]:
        assert process["img_per_s"] > 0 and process["compute_step_s"] > 0 and process["peak_memory"] > 2**20
        assert 0 <= process["data_wait"] <= 1
    allreduce = report["allreduce"]
    assert allreduce["bytes"] == report["run"]["parameters"] * 4  # the fp32 gradients of every trainable parameter
    assert allreduce["algbw_gbps"] > 0
    assert allreduce["busbw_gbps"] == pytest.approx(allreduce["algbw_gbps"] * 2 * (2 - 1) / 2)
    assert report["run"]["world_size"] == 2 and report["run"]["global_batch"] == 16
    # 384 samples, 2 ranks × 1 worker, batch 8: 24 batches per rank and epoch
    assert report["run"]["steps_per_epoch"] == 24 and report["run"]["total_steps"] == 72
    assert report["data"]["shards"] == 16 and report["data"]["samples"] == 384 and report["data"]["consumers"] == 2
    assert report["data"]["img_per_s_per_loader"] > 0 and report["data"]["sizes"] == [[48, 48]]
    assert report["forecast"]["epoch_s"] > 0 and report["verdict"]["bound"] in ("compute", "input", "communication")


@pytest.mark.slow
def test_the_forecast_and_peak_memory_agree_with_a_real_pretrain(digit_shards, tmp_path):
    """Check, then train the same configuration: the forecast epoch time within 25% of the real epochs (after the
    first), the peak memory within 10% of the real process's peak. The machine is shared with other work, so a
    second attempt is allowed when the first disagrees."""
    arguments = ["--data", str(digit_shards), "--workers", "1", "--epochs", "4", "--log-every", "8", *tiny()]
    failures = []
    for _attempt in range(2):
        result, report = run_check("pretrain", *arguments)
        assert result.returncode == 0, result.stderr[-3000:]
        run = tmp_path / f"run{_attempt}"
        # the real command, in a process that says its peak resident memory (VmHWM) as it ends
        real = subprocess.run([sys.executable, "-c", REPORTING_PEAK, "pretrain", *arguments, "--output", str(run)],
                              capture_output=True, text=True, timeout=240, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **QUIET})
        assert real.returncode == 0, real.stderr[-3000:]
        real_peak = int(real.stderr.strip().splitlines()[-1].split()[1]) * 1024
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps_per_epoch = report["run"]["steps_per_epoch"]
        ends = [row["time"] for row in rows if "loss" in row and row["step"] % steps_per_epoch == 0]
        real_epoch = (ends[-1] - ends[0]) / (len(ends) - 1)  # epochs 2-4: steps and checkpoints
        forecast = report["forecast"]["epoch_s"]
        peak = report["memory"]["peak_memory"]
        if abs(forecast - real_epoch) <= 0.25 * real_epoch and abs(peak - real_peak) <= 0.10 * real_peak:
            return
        failures.append(f"forecast {forecast:.2f} s vs real {real_epoch:.2f} s per epoch; peak {peak / 2**20:.0f} "
                        f"MiB vs real {real_peak / 2**20:.0f} MiB")
    pytest.fail("; ".join(failures))


@pytest.mark.slow
def test_a_starved_loader_is_input_bound_and_a_fed_model_compute_bound(digit_shards, heavy_shards):
    starved, report = run_check("pretrain", "--data", str(heavy_shards), "--workers", "1", "--epochs", "2",
                                "--steps", "6", *tiny())
    assert starved.returncode == 0, starved.stderr[-3000:]
    assert report["verdict"]["bound"] == "input", report["forecast"]
    assert report["forecast"]["input_share"] > preflight.INPUT_BOUND_SHARE
    assert any("--workers" in tip or "cores" in tip for tip in report["verdict"]["advice"])
    assert report["data"]["sizes"][0] == [1600, 1200]
    # a model of real weight for this CPU (64 tokens of width 256, 6 blocks), fed by one loader process with small
    # images: ten times the loader's time per batch
    fed, report = run_check("pretrain", "--data", str(digit_shards), "--workers", "1", "--epochs", "2",
                            "--steps", "6", *tiny(batch=16, patch_size=4, embed_dim=256, depth=6, num_heads=4))
    assert fed.returncode == 0, fed.stderr[-3000:]
    assert report["verdict"]["bound"] == "compute", report["forecast"]
    assert report["forecast"]["input_share"] < preflight.INPUT_BOUND_SHARE


@pytest.mark.slow
def test_find_batch_finds_a_batch_that_fits_where_the_next_doubling_does_not(digit_shards):
    common = ["--data", str(digit_shards), "--workers", "0", "--epochs", "2", "--steps", "1"]
    model = dict(embed_dim=64, num_heads=2, patch_size=4)  # 64 tokens: activations grow visibly with the batch
    _, free = run_check("pretrain", *common, *tiny(batch=8, **model))
    cap_mb = free["memory"]["peak_memory"] / 2**20 + 48  # about 48 MiB more than a batch of 8 needs
    env = {preflight.MEMORY_CAP_ENV: str(cap_mb)}
    result, report = run_check("pretrain", *common, "--find-batch", *tiny(batch=8, **model), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    largest, failing = report["memory"]["largest_batch"], report["memory"]["first_failing_batch"]
    assert largest >= 8 and failing is not None and largest < failing <= 2 * largest, report["find_batch"]
    trials = {size: ok for size, ok, _ in report["find_batch"]["trials"]}
    assert trials[largest] and not trials[failing] and trials[8]
    # the next doubling, asked for: does not fit, exit code 1, and the check says what does
    result, report = run_check("pretrain", *common, *tiny(batch=2 * largest, **model), env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert report["verdict"]["bound"] == "memory" and not report["memory"]["requested_fits"]
    assert report["memory"]["largest_batch"] <= largest * 1.25  # it searched down from there
    accumulate = next(tip for tip in report["verdict"]["advice"] if "--grad-accum" in tip).split()
    batch, accum = int(accumulate[1]), int(accumulate[3].rstrip(":"))  # "--batch-size B --grad-accum K: ..."
    assert batch * accum == 2 * largest and batch <= report["memory"]["largest_batch"]


def test_a_linear_probe_check_prints_the_table_and_keeps_it_in_output(labelled_folder, tmp_path):
    shards = tmp_path / "images"  # a folder of class folders: read through temporary shards, none written beside it
    shutil.copytree(labelled_folder, shards)
    keep = tmp_path / "report"
    result = runner.invoke(app, [
        "check", "--output", str(keep), "linear-probe", "--data", str(shards), "--workers", "1", "--epochs", "2",
        "--steps", "2", "--model", TINY_MODELS["vit"][0], "--model-kwargs", json.dumps(TINY_MODELS["vit"][1]),
        "--img-size", "32", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--warmup-epochs", "1",
        "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    text = result.stdout
    for heading in ("Environment", "Data", "Model and memory", "Speed", "Forecast", "Verdict: the run will work"):
        assert heading in text, text
    assert "3 classes" in text and "img/s per loader process" in text
    assert (keep / "check.txt").read_text().strip() in text
    report = json.loads((keep / "check.json").read_text())
    assert report["command"] == "linear-probe" and report["data"]["classes"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "report"]  # no run folder, no shard cache


def test_bad_options_fail_as_the_command_fails_them(digit_shards, tmp_path):
    cases = [
        ["--img-size", "40", "--mask-patch-size", "16"],
        ["--epochs", "2", "--warmup-epochs", "3"],
        ["--model", "no_such_model"],
        ["--model-kwargs", "{not json"],
        ["--gpus", "2", "--nproc", "2"],
    ]
    for case in cases:
        base = ["--data", str(digit_shards), "--device", "cpu", "--output", str(tmp_path / "run")]
        real = runner.invoke(app, ["pretrain", *base, *case])
        checked = runner.invoke(app, ["check", "pretrain", *base, *case])
        assert real.exit_code == checked.exit_code == 2, (case, real.output, checked.output)
        assert checked.output == real.output and checked.output.startswith("error: "), case
        assert "Traceback" not in checked.output and len(checked.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # the report folder is never a run folder
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    result = runner.invoke(app, ["check", "--output", str(run), "pretrain", "--data", str(digit_shards)])
    assert result.exit_code == 2 and "is a run folder" in result.output and "Traceback" not in result.output


def test_check_takes_the_commands_own_options_and_config(monkeypatch, digit_shards, tmp_path):
    """The same command line gives `check` the config the real command would get (recipe and all)."""
    seen: dict[str, list] = {"real": [], "check": []}
    monkeypatch.setattr(limits, "usable_cores", lambda: 8)  # --workers 3, as a machine with the cores for it has
    monkeypatch.setattr(pretrain_command, "pretrain", seen["real"].append)
    monkeypatch.setattr(finetune_command, "finetune", seen["real"].append)
    monkeypatch.setattr(check_command, "check", lambda name, config, options: seen["check"].append(
        (name, config, options)) or 0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 7\nbase_lr: 0.001\n")
    line = ["--data", str(digit_shards), "--recipe", str(recipe), "--batch-size", "16", "--nproc", "2", "--workers",
            "3", *tiny()]
    assert runner.invoke(app, ["pretrain", *line]).exit_code == 0
    result = runner.invoke(app, ["check", "--find-batch", "pretrain", *line, "--json", "--steps", "3"])
    assert result.exit_code == 0, result.output
    name, config, options = seen["check"][0]
    assert name == "pretrain" and config.to_dict() == seen["real"][0].to_dict()
    assert (options.find_batch, options.json, options.steps) == (True, True, 3)
    finetune_line = ["--data", str(digit_shards), "--model", "vit_tiny_patch16_224", "--auto-augment", "none"]
    assert runner.invoke(app, ["finetune", *finetune_line]).exit_code == 0
    assert runner.invoke(app, ["check", "finetune", *finetune_line]).exit_code == 0
    assert seen["check"][1][1].to_dict() == seen["real"][1].to_dict() and seen["check"][1][1].auto_augment is None
    help_text = runner.invoke(app, ["check", "linear-probe", "--help"], env={"COLUMNS": "200"}).output
    assert "--cache-features" in help_text and "--find-batch" in help_text


def test_the_forecast_names_the_bound_from_the_rates():
    base = dict(images_per_step=64, compute_step_s=0.1, loop_step_s=0.1, data_wait=0.0, loader_img_s=6400.0,
                allreduce_s=0.01, epoch_start_s=2.0, save_s=3.0, saves_per_epoch=2, steps_per_epoch=100,
                total_steps=1000, epochs=10)
    fed = preflight.forecast(preflight.Rates(**base))
    assert fed["bound"] == "compute" and fed["epoch_s"] == pytest.approx(100 * 0.1 + 2 * 3.0)
    assert fed["run_s"] == pytest.approx(2.0 + 1000 * 0.1 + 10 * 2 * 3.0)  # the loader starts once a run
    # loaders at 320 img/s feed 64 images in 0.2 s: half of each step waits for data, whatever the short check saw
    slow = preflight.forecast(preflight.Rates(**{**base, "loader_img_s": 320.0}))
    assert slow["bound"] == "input" and slow["step_s"] == pytest.approx(0.2) and slow["input_share"] == 0.5
    talky = preflight.forecast(preflight.Rates(**{**base, "allreduce_s": 0.08}))
    assert talky["bound"] == "communication" and talky["comm_share"] == pytest.approx(0.8)
    assert preflight.forecast(preflight.Rates(**base, fits=False))["bound"] == "memory"


class SleepingTrainer:
    """A trainer whose steps take ``compute`` seconds each, one of them ``slow_step`` seconds longer."""

    device = torch.device("cpu")

    def __init__(self, compute: float, slow_step: int, events: list[str]):
        self.compute, self.slow_step, self.events, self.steps = compute, slow_step, events, 0

    def train_step(self, batch, last_micro):
        time.sleep(self.compute + (1.0 if self.steps == self.slow_step else 0.0))

    def optimizer_step(self):
        self.events.append("step")
        self.steps += 1


class Memory:
    def __init__(self, events: list[str]):
        self.events = events

    def reset(self):
        self.events.append("reset")

    def read(self):
        return 1


class RestartingBatches:
    """Batches on time, but the loader starts again (for 1 s, timed apart in ``starts``) at batch ``restart_at``."""

    def __init__(self, restart_at: int):
        self.restart_at, self.taken, self.starts = restart_at, 0, [0.5]

    def next(self):
        self.taken += 1
        if self.taken == self.restart_at:
            time.sleep(1.0)
            self.starts.append(1.0)
        return {"image": torch.zeros(1)}, 0.0


def test_the_timed_step_is_the_median_step_without_a_loader_restart_and_after_the_memory_reset():
    """A step slowed by something else (1 s) and a loader that starts again within a step (1 s) do not move the
    step time (10 ms): their mean would be about 0.2 s. The peak-memory reset comes before the warm-up steps,
    so the memory it hands back is faulted in again by an untimed step."""
    events: list[str] = []
    config = argparse.Namespace(grad_accum=1, batch_size=4)
    figures = check_command._timed_steps(SleepingTrainer(0.01, slow_step=5, events=events), RestartingBatches(8),
                                         config, 10, Memory(events))
    assert figures["steps"] == 10
    assert figures["compute_step_s"] < 0.1 and figures["loop_step_s"] == figures["compute_step_s"]
    assert figures["img_per_s"] == pytest.approx(4 / figures["loop_step_s"])
    assert events[0] == "reset" and events.count("reset") == 1 and events.count("step") == 12  # 2 warm-up, 10 timed


class CountingStream:
    """A stream of ``per_epoch`` batches an epoch, as many epochs as ``set_epoch`` asks for."""

    def __init__(self, per_epoch: int):
        self.per_epoch, self.calls = per_epoch, []

    def set_epoch(self, epoch: int, epochs: int = 1):
        self.calls.append((epoch, epochs))
        self.epoch, self.epochs = epoch, epochs

    def __iter__(self):
        for epoch in range(self.epoch, self.epoch + self.epochs):
            for index in range(self.per_epoch):
                yield {"epoch": epoch, "index": index}


def test_the_check_takes_batches_across_epochs_as_the_run_does_starting_its_loader_once():
    stream = CountingStream(per_epoch=3)
    batches = check_command._Batches(stream, torch.device("cpu"), epochs=2)
    taken = [batches.next()[0] for _ in range(6)]
    assert [(b["epoch"], b["index"]) for b in taken] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert stream.calls == [(0, 2)] and len(batches.starts) == 1  # one pass over the run's epochs
    assert batches.next()[0]["epoch"] == 2 and stream.calls == [(0, 2), (2, 2)]  # past them: started again
    assert len(batches.starts) == 2


@pytest.mark.gpu
def test_a_gpu_check_measures_cuda_memory_and_names_the_gpu(digit_shards):
    result, report = run_check("pretrain", "--data", str(digit_shards), "--gpus", "1", "--epochs", "2", "--steps", "3",
                               *[a for a in tiny() if a not in ("--device", "cpu")])
    assert result.returncode == 0, result.stderr[-3000:]
    import torch

    assert report["environment"]["gpus"][0]["name"] == torch.cuda.get_device_name(0)
    process = report["processes"][0]
    assert process["device"] == "cuda" and 0 < process["peak_memory"] < process["device_memory"]
    assert process["mfu"] is None or process["mfu"] > 0


@pytest.mark.gpu
def test_a_batch_too_large_for_the_gpu_is_caught_and_the_largest_that_fits_found(digit_shards):
    """ViT-B/16 at 224 px, 8,192 images per step: far beyond any GPU's memory. The out-of-memory error is caught,
    the cache emptied, and the search halves, then bisects."""
    result, report = run_check("pretrain", "--data", str(digit_shards), "--gpus", "1", "--epochs", "2",
                               "--batch-size", "8192", "--steps", "1", "--warmup-epochs", "1", "--workers", "1")
    assert result.returncode == 1, result.stderr[-3000:]
    memory = report["memory"]
    assert not memory["requested_fits"] and memory["largest_batch"] >= 1
    assert memory["largest_batch"] < memory["first_failing_batch"] <= 2 * memory["largest_batch"]
    assert report["verdict"]["bound"] == "memory"


def test_compute_bound_advice_suggests_compile_on_gpus_only():
    config = argparse.Namespace(precision="auto", compile=False, bf16_grad_reduce=False, grad_accum=1)
    on_gpu = preflight.advice("compute", config, {"device": "cuda"})
    on_cpu = preflight.advice("compute", config, {"device": "cpu"})
    assert any(tip.startswith("--compile") for tip in on_gpu)
    assert not any(tip.startswith("--compile") for tip in on_cpu)  # measured slower there (docs/speed.md)
    config.compile = True
    assert not any(tip.startswith("--compile") for tip in preflight.advice("compute", config, {"device": "cuda"}))
