"""make-shards → pretrain, end to end on tiny shards, through the command line and the library."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from conftest import TINY_MODELS
from PIL import Image
from typer.testing import CliRunner

from simmim_cli import checkpoints, engine, errors, tasks
from simmim_cli.cli import app
from simmim_cli.commands.pretrain import pretrain
from simmim_cli.commands.training import resolve_run_paths
from simmim_cli.config import PretrainConfig
from simmim_cli.errors import SimmimError

runner = CliRunner()


@pytest.fixture(scope="module")
def shards(photo_folder, tmp_path_factory) -> Path:
    """Shards from real photos plus a grayscale image, with one corrupt sample written in by hand."""
    source = tmp_path_factory.mktemp("source")
    for path in photo_folder.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    Image.open(next(photo_folder.glob("*.jpg"))).convert("L").save(source / "grey.jpg")
    (source / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path_factory.mktemp("shards")
    result = runner.invoke(app, ["make-shards", str(source), str(out), "--maxcount", "9"])
    assert result.exit_code == 0, result.output
    assert "skipped unreadable" in result.output and "broken.jpg" in result.output
    # a sample that is corrupt inside the shard, which only the training pipeline can find
    with wds.TarWriter(str(out / "train-000099.tar")) as writer:
        writer.write({"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 garbage"})
    info = json.loads((out / "_info.json").read_text())
    info["splits"]["train"]["filenames"].append("train-000099.tar")
    info["splits"]["train"]["shard_lengths"].append(1)
    info["splits"]["train"]["num_samples"] += 1
    (out / "_info.json").write_text(json.dumps(info))
    return out


def tiny_args(family: str = "vit") -> list[str]:
    name, kwargs, size = TINY_MODELS[family]
    return ["--model", name, "--model-kwargs", json.dumps(kwargs), "--img-size", str(size), "--mask-patch-size", "16",
            "--batch-size", "4", "--warmup-epochs", "1", "--base-lr", "0.01", "--log-every", "2"]


def test_make_shards_then_pretrain_writes_a_complete_run(shards, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(shards), "--output", str(run), "--epochs", "2",
                                 "--workers", "2", *tiny_args()])
    assert result.exit_code == 0, result.output
    assert "lr = 0.01 × 4/512" in result.output and "skipped a bad sample" in result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "epoch", "loss", "lr", "img_per_s"} <= set(train_rows[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert train_rows[-1]["skipped_samples"] >= 1  # the corrupt sample was found and counted
    steps_per_epoch = -(-26 // 4)  # 25 images + 1 corrupt sample, 4 a step: the loader workers do not change it
    assert train_rows[-1]["step"] == 2 * steps_per_epoch
    assert [p.name for p in checkpoints.list_checkpoints(run)] == [
        f"checkpoint-{steps_per_epoch:08d}.pth", f"checkpoint-{2 * steps_per_epoch:08d}.pth"]
    previews = sorted(run.glob("preview-*.png"))
    assert len(previews) == 2 and Image.open(previews[-1]).size[0] > 4 * 32
    saved = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(run))
    assert saved["kind"] == "pretrain" and saved["config"]["model"] == TINY_MODELS["vit"][0]
    assert all(torch.is_tensor(v) for v in saved["model"].values())
    assert "encoder.mask_token" in saved["model"] and "decoder.0.weight" in saved["model"]
    assert (run / "config.yaml").read_text().startswith("data:")


@pytest.mark.parametrize("family", ["beit", "swin", "swinv2"])
def test_every_family_pretrains_from_shards(shards, tmp_path, family):
    result = runner.invoke(app, ["pretrain", "--data", str(shards), "--output", str(tmp_path / family),
                                 "--epochs", "2", "--max-steps", "3", "--workers", "0", *tiny_args(family)])
    assert result.exit_code == 0, result.output
    assert checkpoints.latest_checkpoint(tmp_path / family).name == "checkpoint-00000003.pth"


def test_an_existing_run_needs_resume_or_force(shards, tmp_path):
    arguments = ["pretrain", "--data", str(shards), "--output", str(tmp_path / "run"), "--epochs", "2",
                 "--max-steps", "1", "--workers", "0", *tiny_args()]
    assert runner.invoke(app, arguments).exit_code == 0
    before = (tmp_path / "run" / "checkpoint-00000001.pth").read_bytes()
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2 and "--resume auto" in result.output and "--force" in result.output
    assert (tmp_path / "run" / "checkpoint-00000001.pth").read_bytes() == before
    assert runner.invoke(app, [*arguments, "--force"]).exit_code == 0
    # starting over removes the old run's pictures with its checkpoints, before the new run writes its own
    assert (tmp_path / "run" / "metrics.png").is_file()
    resolve_run_paths(PretrainConfig(data=str(shards), output=str(tmp_path / "run"), force=True))
    assert not list((tmp_path / "run").glob("*.p*g")) and not checkpoints.list_checkpoints(tmp_path / "run")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoints.load_checkpoint(checkpoints.latest_checkpoint(run))["model"]


def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(shards, tmp_path):
    common = ["pretrain", "--data", str(shards), "--epochs", "3", "--workers", "2", "--precision", "fp32",
              "--drop-path", "0.1", *tiny_args()]
    # 8 steps per epoch: stop mid-epoch 2 (step 10), then resume to step 17 (mid-epoch 3)
    straight = runner.invoke(app, [*common, "--output", str(tmp_path / "straight"), "--max-steps", "17"])
    assert straight.exit_code == 0, straight.output
    first = runner.invoke(app, [*common, "--output", str(tmp_path / "resumed"), "--max-steps", "10"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*common, "--output", str(tmp_path / "resumed"), "--max-steps", "17",
                                 "--resume", "auto"])
    assert second.exit_code == 0, second.output
    assert "resumed from" in second.output and "checkpoint-00000010.pth" in second.output
    expected, actual = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no step logged twice


def library_config(shards: Path, output: Path, **overrides) -> PretrainConfig:
    name, kwargs, size = TINY_MODELS["vit"]
    values = dict(data=str(shards), output=str(output), model=name, model_kwargs=kwargs, img_size=size,
                  mask_patch_size=16, batch_size=4, epochs=3, warmup_epochs=1, workers=0, log_every=1)
    values.update(overrides)
    config = PretrainConfig(**values)
    config.validate()
    return config


def test_the_loader_starts_once_and_every_epoch_trains_on_its_own_batches(shards, tmp_path, monkeypatch):
    """One loader (its worker processes) for the whole run; each epoch still gets exactly its own batches, the
    ones a fresh loader gives for that epoch: a whole number of --grad-accum steps, none left unused, also when
    the loader workers take turns across an epoch's end."""
    from simmim_cli import distributed
    from simmim_cli.commands.pretrain import build_pretrain
    from simmim_cli.pipeline import make_loader

    config = library_config(shards, tmp_path / "run", workers=2, grad_accum=3, epochs=3, drop_path=0.0)
    _, dataset = build_pretrain(config, distributed.Context())
    steps_per_epoch = dataset.batches_per_epoch // 3
    assert dataset.batches_per_epoch % 3 == 0  # whole steps: every sample of the epoch is trained on
    assert dataset.batches_per_epoch % 2  # an odd count: the two loader workers swap roles at each epoch's end
    expected = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        expected += [batch["image"].sum(dim=(1, 2, 3)).tolist() for batch in make_loader(dataset)][
            :steps_per_epoch * 3]

    starts, trained = [], []
    original_iter, original_step = torch.utils.data.DataLoader.__iter__, tasks.PretrainTask.training_step
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", lambda self: starts.append(1) or original_iter(self))

    def recording_step(self, model, batch):
        trained.append(batch["image"].sum(dim=(1, 2, 3)).tolist())
        return original_step(self, model, batch)

    monkeypatch.setattr(tasks.PretrainTask, "training_step", recording_step)
    pretrain(config)
    assert len(starts) == 1
    assert trained == expected


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    pretrain(library_config(shards, tmp_path / "run", max_steps=2))
    good = tmp_path / "run" / "checkpoint-00000002.pth"
    before = good.read_bytes()
    original = tasks.PretrainTask.training_step
    monkeypatch.setattr(tasks.PretrainTask, "training_step",
                        lambda self, model, batch: {"loss": original(self, model, batch)["loss"] * float("nan")})
    with pytest.raises(errors.TrainingDiverged, match=f"{engine.MAX_NONFINITE_IN_A_ROW} steps in a row"):
        pretrain(library_config(shards, tmp_path / "run", resume="auto", epochs=20, save_every=5))
    assert good.read_bytes() == before
    assert checkpoints.list_checkpoints(tmp_path / "run") == [good]  # nothing was saved from the bad steps


def test_a_stop_request_saves_a_checkpoint_to_resume_from(shards, tmp_path, monkeypatch):
    original = engine.Trainer._report_skipped

    def request_stop_at_third_batch(self, batch):
        self.batches_seen = getattr(self, "batches_seen", 0) + 1
        if self.batches_seen == 3:
            self.stop_requested = True  # what Ctrl-C or SIGTERM does
        return original(self, batch)

    monkeypatch.setattr(engine.Trainer, "_report_skipped", request_stop_at_third_batch)
    with pytest.raises(errors.Interrupted, match="--resume auto"):
        pretrain(library_config(shards, tmp_path / "run"))
    assert checkpoints.latest_checkpoint(tmp_path / "run").name == "checkpoint-00000003.pth"


def test_resuming_another_kind_of_checkpoint_is_refused(shards, tmp_path):
    pretrain(library_config(shards, tmp_path / "run", max_steps=1))
    path = checkpoints.latest_checkpoint(tmp_path / "run")
    state = checkpoints.load_checkpoint(path)
    state["kind"] = "finetune"
    checkpoints.save_checkpoint(state, tmp_path / "other.pth")
    with pytest.raises(SimmimError, match="finetune checkpoint"):
        pretrain(library_config(shards, tmp_path / "run2", resume=str(tmp_path / "other.pth")))


def test_gradient_accumulation_counts_optimizer_steps(shards, tmp_path):
    state_rows = tmp_path / "run" / "metrics.jsonl"
    pretrain(library_config(shards, tmp_path / "run", grad_accum=2, epochs=2, warmup_epochs=0.5))
    steps = [json.loads(line)["step"] for line in state_rows.read_text().splitlines() if "loss" in line]
    assert steps[-1] == 2 * -(-26 // 8)  # 26 samples, 8 a step: 4 steps of 2 batches an epoch (the last padded)


def read_tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_demo_builds_its_own_shards(tmp_path, monkeypatch):
    from simmim_cli import demo

    monkeypatch.setattr(demo, "make_demo_images",
                        lambda folder, count=640, size=128, seed=0: _small_demo(folder))
    result = runner.invoke(app, ["pretrain", "--demo", "--output", str(tmp_path / "demo"), "--max-steps", "2",
                                 "--batch-size", "4", "--workers", "0", "--force"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "demo-shards" / "_info.json").is_file()
    assert list((tmp_path / "demo").glob("preview-*.png")) and checkpoints.latest_checkpoint(tmp_path / "demo")

    # the run's config.yaml as a recipe repeats it in a new folder: not into (or, with the recorded --force, over)
    # the first run, and without the demo's recorded shard folder as --data
    first = sorted(p.name for p in (tmp_path / "demo").iterdir())
    monkeypatch.chdir(tmp_path)
    again = runner.invoke(app, ["pretrain", "--recipe", str(tmp_path / "demo" / "config.yaml")])
    assert again.exit_code == 0, again.output
    assert "left out its force, output" in again.output
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == first
    (repeated,) = (tmp_path / "runs").glob("pretrain-*")
    settings = {k: v for k, v in yaml.safe_load((repeated / "config.yaml").read_text()).items()
                if k not in ("output", "force", "data")}
    recorded = yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text())
    assert settings == {k: recorded[k] for k in settings} and checkpoints.latest_checkpoint(repeated)


def _small_demo(folder: Path) -> Path:
    from simmim_cli.demo import make_demo_images as real

    return real.__wrapped__(folder) if hasattr(real, "__wrapped__") else _crops(folder)


def _crops(folder: Path) -> Path:
    from simmim_cli.demo import photo_paths

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.open(photo_paths()[0]).convert("RGB")
    for index in range(12):
        photo.crop((index * 20, 0, index * 20 + 128, 128)).save(folder / f"c{index}.jpg")
    return folder


def test_png_bytes_helper_roundtrip():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    assert buffer.getvalue()[:4] == b"\x89PNG"


def test_auto_precision_takes_fp16_where_bf16_is_only_emulated(monkeypatch):
    from simmim_cli.precision import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated bf16 counts here
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 0))  # V100
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))  # H100
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"


def test_bf16_where_it_is_only_emulated_is_warned_about(monkeypatch, shards, tmp_path, capsys):
    from simmim_cli import precision
    from simmim_cli.commands.pretrain import pretrain

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)  # an AVX2-only CPU
    assert "no bf16 instructions" in precision.emulated_bf16_warning("bf16", torch.device("cpu"))
    assert precision.emulated_bf16_warning("fp32", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    assert "Tesla V100 has no bf16 tensor cores" in precision.emulated_bf16_warning("bf16", torch.device("cuda", 0))
    assert precision.emulated_bf16_warning("fp16", torch.device("cuda", 0)) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    assert precision.emulated_bf16_warning("bf16", torch.device("cuda", 0)) is None
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert precision.emulated_bf16_warning("bf16", torch.device("cpu")) is None

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    pretrain(library_config(shards, tmp_path / "run", precision="bf16", max_steps=1))
    printed = capsys.readouterr().out
    assert "warning: this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 is emulated" in printed


def test_loader_workers_default_to_the_cores_of_each_process(monkeypatch):
    from simmim_cli import pipeline

    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 96)
    assert pipeline.default_workers(8) == 11  # 96 cores, 8 GPUs: 12 each, one left to the training process
    assert pipeline.default_workers(1) == pipeline.MAX_DEFAULT_WORKERS
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert pipeline.default_workers(4) == 1
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 192)  # bound to 10 of 192 cores, as srun does
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(10)), raising=False)
    assert pipeline.default_workers(8) == 9


def test_a_folder_of_jpegs_pretrains_and_its_shards_are_reused_on_resume(photo_folder, tmp_path):
    images = tmp_path / "jpegs"
    images.mkdir()
    for path in photo_folder.glob("*.jpg"):
        (images / path.name).write_bytes(path.read_bytes())
    run = tmp_path / "run"
    first = runner.invoke(app, ["pretrain", "--data", str(images), "--output", str(run), "--epochs", "2",
                                "--max-steps", "2", "--workers", "0", *tiny_args()])
    assert first.exit_code == 0, first.output
    assert "writing its 12 images into shards" in first.output and "make-shards" in first.output
    cache = tmp_path / "jpegs.simmim-shards"
    assert json.loads((cache / "_info.json").read_text())["splits"]["train"]["num_samples"] == 12
    assert checkpoints.latest_checkpoint(run) is not None
    tars = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")}
    again = runner.invoke(app, ["pretrain", "--data", str(images), "--output", str(run), "--epochs", "2",
                                "--max-steps", "4", "--workers", "0", "--resume", "auto", *tiny_args()])
    assert again.exit_code == 0, again.output
    assert "using its shards" in again.output and "resumed from" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")} == tars


def test_an_image_folder_is_converted_once_before_workers_launch(photo_folder, tmp_path, monkeypatch):
    from simmim_cli import distributed

    seen = []

    def launch(process, config, *args):  # instead of starting processes: what each worker would be given
        seen.append((config.data, (Path(config.data) / "_info.json").is_file()))

    monkeypatch.setattr(distributed, "launch", launch)
    images = tmp_path / "photos"
    images.mkdir()
    for path in photo_folder.iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    result = runner.invoke(app, ["pretrain", "--data", str(images), "--output", str(tmp_path / "run"),
                                 "--nproc", "2", "--device", "cpu", *tiny_args()])
    assert result.exit_code == 0, result.output
    assert seen == [(f"{images}.simmim-shards", True)]
    assert result.output.count("into shards") == 1
