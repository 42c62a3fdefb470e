"""What a command says when it is done: how long it took, what came out, the files it wrote and the command to run
next. A training run also keeps it as the last row of its ``metrics.jsonl`` (``{"summary": {...}, ...}``).

Nothing here imports torch: the command line builds the summaries of the commands that are not training runs.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .redact import redact_values, terminal
from .tracking import read_rows


@dataclass
class Summary:
    command: str
    seconds: float
    result: str  # one line: what came out
    files: list[tuple[str, str]] = field(default_factory=list)  # (what it is, path)
    next: list[str] = field(default_factory=list)  # command lines to run next (or a sentence)
    figures: dict[str, Any] = field(default_factory=dict)  # the numbers behind ``result``

    def text(self) -> str:
        lines = [f"done: {self.command} in {duration(self.seconds)}" + (f"; {self.result}" if self.result else "")]
        width = max((len(what) for what, _ in self.files), default=0)
        lines += [f"  {what:<{width}}  {path}" for what, path in self.files]
        if self.next:
            lines += ["next:", *(f"  {line}" for line in self.next)]
        return terminal("\n".join(lines))  # the next commands name the user's data: never its credentials

    def row(self) -> dict[str, Any]:
        return redact_values({"command": self.command, "seconds": round(self.seconds, 1), **self.figures,
                              "files": {what: path for what, path in self.files}, "next": self.next})


STARTED_ENV = "SIMMIM_STARTED"  # when the command started (epoch seconds), inherited by the processes it launches


@contextlib.contextmanager
def command_clock() -> Iterator[None]:
    """Around a command: its start time, for the summary of a run it launches in other processes too."""
    previous = os.environ.get(STARTED_ENV)
    os.environ[STARTED_ENV] = f"{time.time():.3f}"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(STARTED_ENV, None)
        else:
            os.environ[STARTED_ENV] = previous


def seconds_since_start(fallback: float) -> float:
    """Seconds since the command started (:func:`command_clock`), else since ``fallback`` (a ``time.time()``)."""
    try:
        return time.time() - float(os.environ.get(STARTED_ENV, fallback))
    except ValueError:
        return time.time() - fallback


def duration(seconds: float) -> str:
    """``42 s``, ``4 min 12 s``, ``2 h 03 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def command(*words: Any) -> str:
    """A command line a shell takes as it is (paths with spaces quoted)."""
    return " ".join(shlex.quote(str(word)) for word in words)


# ---------------------------------------------------------------------------------------------- training runs


def training_summary(config: Any, output: Path, seconds: float, step: int, total_steps: int) -> Summary:
    """A training run's summary from its run folder: the rows of ``metrics.jsonl`` (the final loss, the best
    validation top-1 and its epoch), the checkpoints, previews and plot there."""
    from .checkpoints import latest_checkpoint
    from .plots import PLOT_FILE

    output = Path(output)
    rows = read_rows(output / "metrics.jsonl")
    train = [r for r in rows if "loss" in r and "lr" in r]
    figures: dict[str, Any] = {"step": step, "total_steps": total_steps}
    result = [f"{step:,} steps" + (f" of {total_steps:,} (--max-steps)" if step < total_steps else "")]
    if train:
        figures["final_loss"] = round(train[-1]["loss"], 5)
        result.append(f"final training loss {train[-1]['loss']:.4f}")
    held_out = [r for r in rows if "val_loss" in r and "val_top1" not in r]
    if held_out:
        figures["val_loss"] = held_out[-1]["val_loss"]
        result.append(f"held-out loss {held_out[-1]['val_loss']:.4f}")
    scored = [r for r in rows if "val_top1" in r]
    if scored:
        best = max(scored, key=lambda r: r["val_top1"])  # the first of equals: the one best.pth holds
        last = scored[-1]["val_top1"]
        figures.update(best_val_top1=best["val_top1"], best_epoch=best["epoch"], final_val_top1=last)
        result.append(f"best val_top1 {best['val_top1']:.2f}% at epoch {best['epoch']:g}"
                      + (f" (last epoch {last:.2f}%)" if last != best["val_top1"] else ""))
    knn = [r for r in rows if "knn_top1" in r]
    if knn:
        figures["knn_top1"] = knn[-1]["knn_top1"]
        result.append(f"k-NN top-1 {knn[-1]['knn_top1']:.2f}%")

    files: list[tuple[str, str]] = []
    classifier = config.command in ("finetune", "linear-probe")
    for name in ("best.pth", "last.pth") if classifier else ():
        if (output / name).is_file():
            files.append((name.removesuffix(".pth"), str(output / name)))
    resume_point = latest_checkpoint(output)
    if resume_point is not None:
        files.append(("checkpoint", str(resume_point)))
    previews = sorted(output.glob("preview-*.png"))
    if previews:
        files.append(("previews", str(output / "preview-*.png")))
    for what, name in (("plot", PLOT_FILE), ("metrics", "metrics.jsonl"), ("config", "config.yaml")):
        if (output / name).is_file():
            files.append((what, str(output / name)))

    next_steps = []
    if step < total_steps:
        next_steps.append(f"to train on to step {total_steps:,}: the same command without --max-steps, with "
                          f"--resume auto --output {shlex.quote(str(output))}")
    if classifier:
        model = output / ("best.pth" if (output / "best.pth").is_file() else "last.pth")
        next_steps += [command("simmim", "evaluate", "--checkpoint", model, "--data", config.val_data or "VAL_IMAGES",
                               "--output", output / "evaluation"),
                       command("simmim", "export", "--onnx", "--checkpoint", model, "--output", output / "model.onnx")]
    elif resume_point is not None:  # pretrain
        next_steps += [
            command("simmim", "visualize-recon", first_source(config.data), "--checkpoint", resume_point, "--output",
                    output / "recon.png"),
            command("simmim", "finetune", "--pretrained", resume_point, "--data", getattr(config, "knn_data", None)
                    or "TRAIN_IMAGES", "--val-data", getattr(config, "knn_val_data", None) or "VAL_IMAGES"),
        ]
    return Summary(config.command, seconds, "; ".join(result), files, next_steps, figures)


def first_source(data: Any) -> str:
    """``--data`` as one location for a command line: a mixture's (a list of sources) first source."""
    first = data[0] if isinstance(data, list) and data else data
    return str(first.get("path") if isinstance(first, dict) else first)
