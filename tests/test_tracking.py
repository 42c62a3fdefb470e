"""--log-to tensorboard | wandb | mlflow, read back with each library's own reader; metrics.jsonl stays."""

import json
from pathlib import Path

import pytest
from conftest import TINY_MODELS, digit_images, digit_labels
from PIL import Image
from typer.testing import CliRunner

from simmim_cli import tracking
from simmim_cli.cli import app
from simmim_cli.shards import write_shards

runner = CliRunner()
VIT_NAME, VIT_KWARGS, SIZE = TINY_MODELS["vit"]
MODEL = ["--model", VIT_NAME, "--model-kwargs", json.dumps(VIT_KWARGS), "--img-size", str(SIZE)]
TRAIN = ["--batch-size", "8", "--warmup-epochs", "1", "--log-every", "2", "--workers", "0", "--base-lr", "0.01"]
ALL = ["--log-to", "tensorboard", "--log-to", "wandb", "--log-to", "mlflow"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """Three digit classes: 32 training and 16 validation images, as labelled shards."""
    root = tmp_path_factory.mktemp("digits")
    kept = [(image, label) for image, label in zip(digit_images(120, SIZE), digit_labels(120), strict=True)
            if label < 3]
    for split, part in (("train", kept[:32]), ("val", kept[32:48])):
        for index, (image, label) in enumerate(part):
            folder = root / "images" / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index}.png")
        write_shards(root / "images" / split, root / split, maxcount=16, split=split)
    return {"train": root / "train", "val": root / "val"}


@pytest.fixture
def tracker_env(tmp_path, monkeypatch) -> str:
    """W&B offline, MLflow in a file store under tmp_path."""
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database unless told otherwise
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return uri


def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_pretrain_logs_to_all_three_trackers_and_resume_continues_their_runs(digits, tmp_path, tracker_env):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "pretrain-run"
    common = ["pretrain", "--data", str(digits["train"]), "--output", str(run), *MODEL, "--mask-patch-size", "16",
              "--epochs", "2", *TRAIN, *ALL]
    first = runner.invoke(app, [*common, "--max-steps", "4"])
    assert first.exit_code == 0, first.output
    ids = json.loads((run / "trackers.json").read_text())
    second = runner.invoke(app, [*common, "--resume", "auto"])
    assert second.exit_code == 0, second.output
    assert json.loads((run / "trackers.json").read_text()) == ids  # the same tracker runs, continued
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in rows if "loss" in r]
    assert loss_steps == [2, 4, 6, 8] and all("preview" not in r for r in rows)  # 4 steps per epoch

    # TensorBoard: event files in the run folder, the loss scalar over both invocations, a preview image
    events = tensorboard_events(run / "tensorboard")
    assert [e.step for e in events.Scalars("loss")] == loss_steps
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in rows if "loss" in r])
    assert {"lr", "grad_norm", "img_per_s", "preview_loss"} <= set(events.Tags()["scalars"])
    previews = events.Images("preview")
    assert [e.step for e in previews] == [4, 8] and previews[-1].width == Image.open(run / "preview-00000008.png").width

    # MLflow: one run named after the run folder, holding the loss history and the config as parameters
    client = MlflowClient(tracker_env)
    (experiment,) = [e for e in client.search_experiments() if e.name == "simmim"]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_id == ids["mlflow"] and mlflow_run.info.run_name == run.name
    history = client.get_metric_history(ids["mlflow"], "loss")
    assert sorted(m.step for m in history) == loss_steps
    params = mlflow_run.data.params
    assert params["model"] == VIT_NAME and params["mask_ratio"] == "0.6" and json.loads(params["log_to"]) == [
        "tensorboard", "wandb", "mlflow"]
    assert mlflow_run.info.status == "FINISHED"
    assert any(a.path == "images" for a in client.list_artifacts(ids["mlflow"]))

    # W&B offline: a run folder per invocation under <output>/wandb, both with the same run id
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(ids["wandb"]) for p in offline)
    assert all(list(p.glob("*.wandb")) for p in offline)


def test_finetune_logs_validation_and_a_confusion_matrix(digits, tmp_path, tracker_env):
    run = tmp_path / "finetune-run"
    result = runner.invoke(app, ["finetune", "--data", str(digits["train"]), "--val-data", str(digits["val"]),
                                 "--output", str(run), *MODEL, "--epochs", "2", *TRAIN, "--log-to", "tensorboard"])
    assert result.exit_code == 0, result.output
    events = tensorboard_events(run / "tensorboard")
    assert [e.step for e in events.Scalars("val_top1")] == [4, 8]
    assert [e.step for e in events.Images("confusion")] == [4, 8]
    assert not (run / "wandb").exists() and json.loads((run / "trackers.json").read_text()).keys() == {"tensorboard"}


def test_linear_probe_logs_to_mlflow(digits, tmp_path, tracker_env):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "probe-run"
    result = runner.invoke(app, ["linear-probe", "--data", str(digits["train"]), "--val-data", str(digits["val"]),
                                 "--output", str(run), *MODEL, "--epochs", "2", *TRAIN, "--cache-features",
                                 "--log-to", "mlflow"])
    assert result.exit_code == 0, result.output
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracker_env)
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [4, 8]
    assert client.get_run(run_id).data.params["pool"] == "mean"


def test_a_missing_tracker_package_names_the_pip_line(digits, tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    result = runner.invoke(app, ["pretrain", "--data", str(digits["train"]), "--output", str(tmp_path / "x"),
                                 *MODEL, "--log-to", "wandb"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == 'error: --log-to wandb needs the wandb package: pip install "simmim-cli[wandb]"'
    assert not (tmp_path / "x").exists()
    result = runner.invoke(app, ["pretrain", "--data", str(digits["train"]), "--log-to", "comet"])
    assert result.exit_code == 2 and "unknown tracker; choose from tensorboard, wandb, mlflow" in result.output


def test_images_go_to_trackers_and_numbers_to_metrics_jsonl(tmp_path):
    seen = []

    class Recorder(tracking.Tracker):
        def log_metrics(self, metrics, step):
            seen.append(("metrics", step, metrics))

        def log_image(self, key, image, step):
            seen.append(("image", step, key, image.size))

    log = tracking.RunLog(tmp_path, enabled=True)
    log.trackers = [Recorder()]
    log.log({"step": 3, "loss": 0.5, "grad_norm": None, "preview": Image.new("RGB", (4, 2))})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()).keys() == {"step", "loss", "grad_norm", "time"}
    assert seen == [("metrics", 3, {"loss": 0.5}), ("image", 3, "preview", (4, 2))]
    assert not tracking.RunLog(tmp_path / "other", enabled=False).log({"step": 1}) and not (tmp_path / "other").exists()


def test_a_mixtures_counts_per_source_reach_trackers_as_one_scalar_each(tmp_path):
    seen = []

    class Recorder(tracking.Tracker):
        def log_metrics(self, metrics, step):
            seen.append(metrics)

    log = tracking.RunLog(tmp_path, enabled=True)
    log.trackers = [Recorder()]
    log.log({"step": 8, "loss": 0.5, "source_samples": {"ours": 700, "general": 300}})
    log.close()
    assert seen == [{"loss": 0.5, "source_samples/ours": 700.0, "source_samples/general": 300.0}]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["source_samples"] == {"ours": 700, "general": 300}


def test_a_resume_drops_rows_after_the_checkpoint_and_a_line_cut_short_by_the_crash(tmp_path):
    """A crash can leave half a line at the end of metrics.jsonl; the resumed run drops it with the rows logged
    after its checkpoint and the old summary, instead of failing on it."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 0.9}\n{"step": 20, "loss": 0.8}\n'
                                            '{"summary": {"step": 20}, "step": 20}\n{"step": 30, "loss": 0.7}\n'
                                            '{"step": 40, "lo')
    metrics = tracking.RunLog(tmp_path, enabled=True)
    metrics.truncate_after(20)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 10, "loss": 0.9}, {"step": 20, "loss": 0.8}]
