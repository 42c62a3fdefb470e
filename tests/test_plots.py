"""metrics.png from a run's rows, best effort; the confusion picture at any class count; bounded previews."""

import json

import pytest
import torch
from PIL import Image, ImageFont

from simmim_cli import plots
from simmim_cli.plots import draw_metrics, plot_metrics
from simmim_cli.visualize import confusion_png, prune_previews


def classifier_rows() -> list[dict]:
    rows = [{"step": s, "epoch": s / 4, "loss": 2.0 / s, "lr": 1e-3 * min(1.0, s / 4)} for s in range(1, 13)]
    rows += [{"step": 4 * e, "epoch": e, "val_top1": v, "val_top5": 100.0, "val_loss": 1.0 / e}
             for e, v in ((1, 40.0), (2, 75.0), (3, 70.0))]
    return sorted(rows, key=lambda r: r["step"])


def test_the_plot_draws_the_runs_own_rows():
    rows = classifier_rows()
    figure = draw_metrics(rows, title="run")
    loss, lr, top = figure.axes
    train = [r for r in rows if "lr" in r]
    assert list(loss.lines[0].get_xdata()) == [r["epoch"] for r in train]
    assert list(loss.lines[0].get_ydata()) == [r["loss"] for r in train]
    assert list(loss.lines[1].get_ydata()) == [1.0, 0.5, 1 / 3]  # the held-out loss, per epoch
    assert list(lr.lines[0].get_ydata()) == [r["lr"] for r in train]
    assert list(top.lines[0].get_ydata()) == [40.0, 75.0, 70.0] and list(top.lines[0].get_xdata()) == [1, 2, 3]
    assert top.get_legend().get_texts()[0].get_text() == "validation top-1 (best 75.00%, epoch 2)"
    assert figure.get_suptitle() == "run: 12 steps, epoch 3"


def test_plot_metrics_writes_the_picture_and_skips_the_summary_row(tmp_path):
    rows = classifier_rows()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                            + json.dumps({"summary": {"command": "finetune"}, "step": 12}) + "\n")
    path = plot_metrics(tmp_path)
    assert path == tmp_path / "metrics.png" and Image.open(path).size == (800, 780)  # three panels
    assert path.stat().st_size > 20_000 and not list(tmp_path.glob(".*.tmp"))


def test_a_plot_that_cannot_be_drawn_is_one_warning(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 0.5, "loss": 1.0, "lr": 1e-3}) + "\n")

    def broken(rows, title=""):
        raise ValueError("no room for the axes")

    monkeypatch.setattr(plots, "draw_metrics", broken)
    warnings = []
    assert plot_metrics(tmp_path, warnings.append) is None and plot_metrics(tmp_path, warnings.append) is None
    assert warnings == [f"warning: could not draw {tmp_path / 'metrics.png'} (no room for the axes); going on "
                        "without it"]
    assert plot_metrics(tmp_path / "empty", warnings.append) is None and len(warnings) == 1  # no rows: no plot


@pytest.mark.parametrize("count", [2, 10, 1000])
def test_the_confusion_picture_fits_its_title_and_any_class_count(count):
    confusion = torch.eye(count, dtype=torch.long) * 5 + 1
    image = confusion_png(confusion, [f"class {i}" for i in range(count)])
    title = "% of the row: the diagonal is each class's accuracy"
    assert image.width >= ImageFont.load_default(size=14).getlength(title)  # the old picture cut it at 142 px
    assert max(image.size) <= 1300  # cells shrink with the class count
    assert image.getpixel((image.width - 2, image.height - 2)) == (255, 255, 255)  # a margin, nothing cut


def test_previews_keep_the_first_the_newest_and_evenly_spread_ones(tmp_path):
    for step in range(20, 241, 20):  # the demo: a checkpoint every 20 steps
        (tmp_path / f"preview-{step:08d}.png").write_bytes(b"png")
        prune_previews(tmp_path, 6)
    assert sorted(int(p.name[8:16]) for p in tmp_path.glob("preview-*.png")) == [20, 60, 100, 140, 180, 240]
    prune_previews(tmp_path, 0)  # 0 keeps all
    assert len(list(tmp_path.glob("preview-*.png"))) == 6


def test_the_background_plot_draws_the_newest_rows_last_at_most_once_a_minute(tmp_path, monkeypatch):
    import threading
    import time

    drawn, started = [], threading.Event()

    def slow_plot(output, warn=None):
        drawn.append(len((output / "metrics.jsonl").read_text().splitlines()))  # the rows when it starts
        started.set()
        time.sleep(0.2)

    monkeypatch.setattr(plots, "plot_metrics", slow_plot)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    background = plots.BackgroundPlot(tmp_path, interval=0)
    background.request()
    started.wait(5)
    for rows in (2, 3):  # two more checkpoints while the first drawing goes on: drawn once more, with all rows
        (tmp_path / "metrics.jsonl").write_text("{}\n" * rows)
        background.request()
    background.wait()
    assert drawn == [1, 3]
    # at most once a minute, and at the end
    minutely = plots.BackgroundPlot(tmp_path)
    minutely.request()
    minutely.wait()
    assert drawn == [1, 3]
    minutely.request(final=True)
    minutely.wait()
    assert drawn == [1, 3, 3]
