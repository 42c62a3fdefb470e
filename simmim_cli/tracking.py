"""What a run records: ``metrics.jsonl`` in the run folder (rank 0 only), one JSON object per logged row, and the
same figures in the experiment trackers chosen with ``--log-to`` (TensorBoard, W&B, MLflow).

Rows are dicts of numbers; a value that is a PIL image (a reconstruction preview, a confusion matrix) goes to the
trackers as an image and stays out of ``metrics.jsonl``. Each tracker is a small class with ``log_metrics``,
``log_image`` and ``close``; the ids of the tracker runs are kept in ``trackers.json`` in the run folder, so that
``--resume`` continues the same runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import storage
from .errors import SimmimError
from .redact import redact
from .storage import StorageError

# --log-to name → (module that must be importable, the pip line that brings it)
TRACKERS = {
    "tensorboard": ("tensorboard", 'pip install "simmim-cli[tensorboard]"'),
    "wandb": ("wandb", 'pip install "simmim-cli[wandb]"'),
    "mlflow": ("mlflow", 'pip install "simmim-cli[mlflow]"'),
}
IDS_FILE = "trackers.json"


def check_trackers(names: list[str]) -> None:
    """Unknown names and missing packages fail here, before any training starts."""
    for name in names:
        if name not in TRACKERS:
            raise SimmimError(f"--log-to {name}: unknown tracker; choose from {', '.join(TRACKERS)}")
        module, pip_line = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise SimmimError(f"--log-to {name} needs the {module} package: {pip_line}")


def hyperparameters(config: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """A config as flat hyperparameters: numbers, strings and booleans as they are, anything else as JSON text."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in config.items()}


class RunLog:
    """Appends rows to ``<output>/metrics.jsonl`` and hands them to the trackers; does nothing on ranks other
    than 0. ``config`` (the resolved run config) chooses the trackers (``log_to``) and is logged as their
    hyperparameters."""

    def __init__(self, output: Path, enabled: bool, config: Any = None,
                 on_failure: Callable[[StorageError], None] | None = None):
        self.output = output
        self.path = output / "metrics.jsonl"
        self.enabled = enabled
        self.config = config.to_dict() if config is not None else {}
        self.resume_step: int | None = None
        self.trackers: list[Tracker] | None = None  # opened with the first row, once a resume has said its step
        # metrics.jsonl is essential: when it cannot be written, ``failure`` keeps why and ``on_failure`` is told
        # (the engine stops the run on every rank at the next step); without a handler the error is raised
        self.failure: StorageError | None = None
        self.on_failure = on_failure

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled or self.failure is not None:
            return
        numbers = {k: v for k, v in row.items() if not _is_image(v)}
        if not self._append(numbers):
            return
        if self.trackers is None:
            self.trackers = open_trackers(self.config.get("log_to") or [], self.output, self.config,
                                          self.resume_step)
        step = int(row.get("step", 0))
        scalars = {k: float(v) for k, v in numbers.items() if k != "step" and isinstance(v, (int, float))}
        scalars.update({f"{k}/{name}": float(v) for k, values in numbers.items() if isinstance(values, dict)
                        for name, v in values.items() if isinstance(v, (int, float))})  # e.g. source_samples/ours
        for tracker in self.trackers:  # a tracker's files are not essential: one warning, and the run goes on
            with storage.best_effort(f"{tracker.name} log", None):
                tracker.log_metrics(scalars, step)
                for key, value in row.items():
                    if _is_image(value):
                        tracker.log_image(key, value, step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The run's summary as the last row of ``metrics.jsonl``, ``{"summary": {...}, "step": N, "time": T}``
        (readers that look for a figure's key pass over it; the trackers do not get it)."""
        if self.enabled and self.failure is None:
            self._append({"summary": summary, "step": summary.get("step", 0)})

    def _append(self, row: dict[str, Any]) -> bool:
        try:
            with storage.writing(self.path), self.path.open("a") as file:
                file.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")
        except StorageError as error:
            if self.on_failure is None:
                raise
            self.failure = error
            self.on_failure(error)
            return False
        return True

    def truncate_after(self, step: int) -> None:
        """Drops rows a crashed run logged after its last checkpoint, so the resumed run does not repeat them
        (TensorBoard drops its events after ``step`` too), and an earlier summary (the resumed run ends with its
        own)."""
        self.resume_step = step
        if not (self.enabled and self.path.is_file()):
            return
        rows = [row for row in read_rows(self.path) if row.get("step", 0) <= step]  # a line cut short: gone
        storage.write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))

    def close(self) -> None:
        for tracker in self.trackers or []:
            with storage.best_effort(f"{tracker.name} log", None):
                tracker.close()
        self.trackers = []


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The figures rows of a ``metrics.jsonl``, oldest first: summary rows and a last line cut short by a crash
    are left out."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "summary" not in row:
            rows.append(row)
    return rows


def _is_image(value: Any) -> bool:
    return hasattr(value, "getbands")  # a PIL image, without importing PIL here


# ---------------------------------------------------------------------------------------------- trackers


class Tracker:
    """One experiment tracker's run."""

    name = "tracker"  # the --log-to name

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_image(self, key: str, image: Any, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flushes and ends the run."""


def open_trackers(names: list[str], output: Path, config: dict[str, Any], resume_step: int | None) -> list[Tracker]:
    """The trackers named by ``--log-to``; a resumed run (``resume_step`` given) continues the runs whose ids
    ``trackers.json`` in the run folder keeps."""
    if not names:
        return []
    check_trackers(names)
    ids_file = output / IDS_FILE
    ids = json.loads(ids_file.read_text()) if resume_step is not None and ids_file.is_file() else {}
    opened: list[Tracker] = []
    for name in names:
        with storage.best_effort(f"{name} log", None):  # e.g. its folder cannot be made: the run goes on without it
            tracker = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}[name](
                output, config, ids.get(name), resume_step)
            opened.append(tracker)
            ids[name] = tracker.run_id
    with storage.best_effort("tracker ids (a resumed run starts new tracker runs)", ids_file):
        storage.write_text(ids_file, json.dumps(ids, indent=2))
    return opened


class TensorBoardTracker(Tracker):
    """Event files in ``<output>/tensorboard`` (``tensorboard --logdir runs/`` shows every run by folder name)."""

    name = "tensorboard"

    def __init__(self, output: Path, config: dict[str, Any], run_id: str | None, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.run_id = str(output / "tensorboard")
        # purge_step: a resumed run hides the events a crashed run wrote after its last checkpoint
        self.writer = SummaryWriter(self.run_id, purge_step=resume_step + 1 if resume_step is not None else None)
        if resume_step is None:
            for summary in hparams(hyperparameters(config), {}):  # the HParams tab, in this run's own folder
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, key: str, image: Any, step: int) -> None:
        import numpy as np

        self.writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run in ``<output>/wandb``: online, or offline with ``WANDB_MODE=offline`` (``wandb sync`` later).
    The project is ``$WANDB_PROJECT``, else ``simmim``."""

    name = "wandb"

    def __init__(self, output: Path, config: dict[str, Any], run_id: str | None, resume_step: int | None):
        import wandb

        self.wandb = wandb
        argv = sys.argv
        sys.argv = [redact(argument) for argument in argv]  # W&B records the command line: never its credentials
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "simmim"), name=output.name,
                                  dir=str(output), config=config, id=run_id, resume="allow" if run_id else None)
        except Exception as error:  # wandb raises its own types for a missing login, a bad entity, no network
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SimmimError(f"--log-to wandb could not start a run ({first}); log in with `wandb login`, or "
                              "set WANDB_MODE=offline and `wandb sync` the run folder later") from error
        finally:
            sys.argv = argv
        self.run_id = self.run.id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, image: Any, step: int) -> None:
        self.run.log({key: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    """An MLflow run at ``$MLFLOW_TRACKING_URI`` (MLflow's default without it), in the experiment
    ``$MLFLOW_EXPERIMENT_NAME``, else ``simmim``."""

    name = "mlflow"

    def __init__(self, output: Path, config: dict[str, Any], run_id: str | None, resume_step: int | None):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # honours MLFLOW_TRACKING_URI
        try:
            if run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "simmim")
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                run_id = self.client.create_run(experiment_id, run_name=output.name).info.run_id
                params = [Param(key, str(value)) for key, value in hyperparameters(config).items()]
                for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                    self.client.log_batch(run_id, params=params[start:start + 100])
            else:
                self.client.update_run(run_id, status="RUNNING")
        except MlflowException as error:
            raise SimmimError(f"--log-to mlflow: {str(error).splitlines()[0]}") from error
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_image(self, key: str, image: Any, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
