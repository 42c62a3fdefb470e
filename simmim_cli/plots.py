"""``metrics.png`` in every training run folder: the run's curves drawn from its ``metrics.jsonl`` with matplotlib,
so that a run can be judged without a tracker. Redrawn at checkpoints (at most once a minute) and at the end,
beside the training (a thread); a failure is one warning.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import storage
from .tracking import read_rows

PLOT_FILE = "metrics.png"
MAX_POINTS = 4000  # training rows drawn at most (evenly thinned): a long run's plot stays quick to draw
_warned: set[str] = set()


def plot_metrics(output: Path, warn=None) -> Path | None:
    """Draws ``<output>/metrics.png`` from the run's rows (written atomically) and returns its path; None when
    the run has no training row yet or the plot could not be drawn (then one warning through ``warn``, stderr
    by default; the run goes on)."""
    path = Path(output) / PLOT_FILE
    rows = read_rows(Path(output) / "metrics.jsonl")
    if not any("loss" in row and "lr" in row for row in rows):
        return None
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        figure = draw_metrics(rows, title=Path(output).name)
        with storage.writing(path, temporary=tmp):
            figure.savefig(tmp, format="png")
            tmp.replace(path)
        return path
    except ImportError:
        _warn_once("matplotlib", "warning: no metrics.png: matplotlib is not installed (pip install matplotlib)",
                   warn)
    except storage.StorageError as error:
        _warn_once(f"storage {path.parent}", f"warning: {error}; going on without metrics.png", warn)
    except (ValueError, TypeError, RuntimeError, OverflowError) as error:  # a row matplotlib cannot draw
        _warn_once(f"draw {path.parent}", f"warning: could not draw {path} ({error}); going on without it", warn)
    return None


class BackgroundPlot:
    """Redraws ``metrics.png`` in a thread of its own, at most every ``interval`` seconds and at the end, so that
    checkpoints do not wait for matplotlib, and a run of short epochs does not spend its CPU on pictures (about
    0.3 s a drawing on a shared 2-core CPU, 1–2 s the first with the import: more than a small model's epoch). A
    request while a drawing is under way is drawn after it: the newest rows are always drawn in the end."""

    def __init__(self, output: Path, warn=None, interval: float = 60.0):
        self.output, self.warn, self.interval = Path(output), warn, interval
        self.lock = threading.Lock()
        self.pending = self.running = False
        self.thread: threading.Thread | None = None
        self.last = time.monotonic()  # the first drawing a minute into the run (or at its end)

    def request(self, final: bool = False) -> None:
        """At a checkpoint; ``final`` at the run's end, whenever the last drawing was."""
        if not final and time.monotonic() - self.last < self.interval:
            return
        self.last = time.monotonic()
        with self.lock:
            self.pending = True
            if self.running:
                return
            self.running = True
        self.thread = threading.Thread(target=self._draw, name="metrics.png", daemon=True)
        self.thread.start()

    def _draw(self) -> None:
        while True:
            with self.lock:
                if not self.pending:
                    self.running = False
                    return
                self.pending = False
            plot_metrics(self.output, self.warn)

    def wait(self, timeout: float = 120.0) -> None:
        """Until the last requested drawing is written (at a run's end, before its summary names the file)."""
        if self.thread is not None:
            self.thread.join(timeout)


def _warn_once(key: str, message: str, warn) -> None:
    if key not in _warned:
        _warned.add(key)
        (warn or (lambda text: print(text, file=sys.stderr, flush=True)))(message)


def draw_metrics(rows: list[dict[str, Any]], title: str = ""):
    """A matplotlib Figure: training loss (with the held-out loss per epoch), the learning rate, and where the run
    has them the validation top-1/top-5 and k-NN top-1 per epoch; epochs on every x axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in rows if "loss" in r and "lr" in r]
    train = train[:: max(1, -(-len(train) // MAX_POINTS))] + ([train[-1]] if len(train) > MAX_POINTS else [])
    held_out = [r for r in rows if "val_loss" in r]
    scores = {name: [r for r in rows if name in r] for name in ("val_top1", "val_top5", "knn_top1")}
    has_scores = any(scores.values())
    panels = 3 if has_scores else 2
    height = 2.6 * panels  # inches; fixed margins (a constrained layout draws the figure twice: twice the time)
    figure = Figure(figsize=(8, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True)
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.55 / height, top=1 - 0.45 / height, hspace=0.15)
    loss, lr = axes[0], axes[1]
    loss.plot([r["epoch"] for r in train], [r["loss"] for r in train], color="tab:blue", linewidth=1,
              label="training loss")
    if held_out:
        loss.plot([r["epoch"] for r in held_out], [r["val_loss"] for r in held_out], "o-", color="tab:orange",
                  markersize=4, label="held-out loss (per epoch)")
    loss.set_ylabel("loss")
    loss.legend(loc="upper right", fontsize="small")
    lr.plot([r["epoch"] for r in train], [r["lr"] for r in train], color="tab:green", linewidth=1)
    lr.set_ylabel("learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if has_scores:
        top = axes[2]
        styles = {"val_top1": ("o-", "tab:red", "validation top-1"), "val_top5": ("s--", "tab:purple",
                                                                                  "validation top-5"),
                  "knn_top1": ("^-", "tab:brown", "k-NN top-1")}
        headline = "val_top1" if scores["val_top1"] else "knn_top1"
        best = max(scores[headline], key=lambda r: r[headline]) if scores[headline] else None
        for name, found in scores.items():
            if found:
                marker, colour, label = styles[name]
                if name == headline and best is not None:  # in the legend: never cut off at the plot's edge
                    label += f" (best {best[name]:.2f}%, epoch {best['epoch']:g})"
                top.plot([r["epoch"] for r in found], [r[name] for r in found], marker, color=colour, markersize=4,
                         label=label)
        if best is not None:
            top.plot([best["epoch"]], [best[headline]], "*", color="gold", markeredgecolor="black", markersize=12,
                     zorder=3)
        lowest = min(r[name] for name, found in scores.items() for r in found)
        top.set_ylim(max(0.0, lowest - 5), 100.5)  # accuracy: never above 100
        top.set_ylabel("accuracy (%)")
        top.legend(loc="lower right", fontsize="small")
    axes[-1].set_xlabel("epoch")
    for axis in axes:
        axis.grid(True, alpha=0.3)
    if title:
        figure.suptitle(f"{title}: {train[-1]['step']:,} steps, epoch {train[-1]['epoch']:g}", fontsize="medium")
    return figure
