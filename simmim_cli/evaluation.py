"""Classification accuracy: top-1/top-5 during finetune and linear-probe, the `simmim evaluate` report, and
weighted k-NN classification on frozen features (`simmim knn`, and during pretraining)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import distributed, storage
from .errors import SimmimError
from .image_spec import IMAGENET_RGB, ImageSpec


@torch.no_grad()
def evaluate_classifier(
    predict: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterable[dict[str, Any]],
    num_classes: int,
    device: torch.device,
    with_confusion: bool = False,
) -> dict[str, Any]:
    """Runs ``predict(batch) -> logits`` over every batch, on every rank, and sums the counts over ranks.

    Returns ``val_top1``, ``val_top5`` (percent), ``val_loss`` and ``count``; with ``with_confusion`` also
    ``confusion`` (true class × predicted class counts) and ``skipped`` (samples that could not be read).
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, count
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device) if with_confusion else None
    skipped: list[str] = []
    k = min(5, num_classes)
    for batch in batches:
        skipped += batch.pop("skipped", [])
        labels = batch["label"].to(device, non_blocking=True)
        if labels.numel() == 0:
            continue
        logits = predict({key: value.to(device, non_blocking=True) for key, value in batch.items()}).float()
        top = logits.topk(k, dim=1).indices
        sums[0] += (top[:, 0] == labels).sum()
        sums[1] += (top == labels[:, None]).any(dim=1).sum()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum")
        sums[3] += labels.numel()
        if confusion is not None:
            confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels), accumulate=True)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
        if confusion is not None:
            torch.distributed.all_reduce(confusion)
        skipped = [s for part in distributed.gather_objects(skipped) for s in part]
    count = max(float(sums[3]), 1.0)
    result: dict[str, Any] = {"val_top1": round(100 * float(sums[0]) / count, 3),
                              "val_top5": round(100 * float(sums[1]) / count, 3),
                              "val_loss": round(float(sums[2]) / count, 5), "count": int(sums[3])}
    if confusion is not None:
        result["confusion"] = confusion.cpu()
        result["skipped"] = skipped
    return result


def image_logits(model: torch.nn.Module, precision_context: Callable[[], Any], spec: ImageSpec = IMAGENET_RGB):
    """``predict`` for :func:`evaluate_classifier` from a model taking images normalised as ``spec`` says."""

    def predict(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with precision_context():
            return model(spec.normalize(batch["image"]))

    return predict


def per_class_report(confusion: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """Accuracy (recall) and support per class from a confusion matrix."""
    support = confusion.sum(dim=1)
    correct = confusion.diagonal()
    return [{"index": i, "class": name, "support": int(support[i]),
             "accuracy": round(100 * float(correct[i]) / int(support[i]), 3) if support[i] else None}
            for i, name in enumerate(classes)]


def write_report(output: Path, metrics: dict[str, Any], classes: list[str], source: str) -> dict[str, Path]:
    """``metrics.json`` (top-1/5, per-class accuracy), ``confusion.json`` and ``confusion.png`` in ``output``."""
    from .visualize import confusion_png, save_png

    with storage.writing(output):
        output.mkdir(parents=True, exist_ok=True)
    confusion = metrics["confusion"]
    summary = {"checkpoint": source, "top1": metrics["val_top1"], "top5": metrics["val_top5"],
               "loss": metrics["val_loss"], "count": metrics["count"], "skipped": metrics["skipped"],
               "per_class": per_class_report(confusion, classes)}
    paths = {"metrics": output / "metrics.json", "confusion": output / "confusion.json",
             "confusion_png": output / "confusion.png"}
    _write_json(paths["metrics"], summary)
    _write_json(paths["confusion"], {"classes": classes, "matrix": confusion.tolist(),
                                     "rows": "true class", "columns": "predicted class"})
    with storage.best_effort("confusion picture", paths["confusion_png"]):
        save_png(confusion_png(confusion, classes), paths["confusion_png"])
    return paths


def _write_json(path: Path, value: Any) -> None:
    storage.write_text(path, json.dumps(value, indent=2))


@torch.no_grad()
def knn_classify(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    device: torch.device | str = "cpu",
    chunk: int = 1024,
) -> dict[str, Any]:
    """Weighted k-NN (Wu et al. 2018, as DINO evaluates): each query ``(N, C)`` takes the ``k`` most
    cosine-similar features of the memory bank ``(M, C)``; each votes for its class with weight
    ``exp(similarity / temperature)``; the classes with the most weight are the prediction.

    Returns ``top1``, ``top5`` (percent), ``k`` (used: at most the bank's size), ``temperature``, ``count``
    (queries) and ``bank`` (memory-bank size)."""
    if len(bank_features) == 0 or len(features) == 0:
        raise SimmimError("k-NN needs features: the memory bank (--knn-data / --data) and the queries "
                          "(--knn-val-data / --val-data) must each hold at least one readable image")
    bank = F.normalize(bank_features.to(device).float(), dim=1).T  # (C, M)
    bank_labels = bank_labels.to(device)
    k = min(k, bank.shape[1])
    top_k = min(5, num_classes)
    correct = torch.zeros(2, dtype=torch.long, device=device)  # top-1, top-5
    for start in range(0, len(features), chunk):
        queries = F.normalize(features[start:start + chunk].to(device).float(), dim=1)  # (n, C)
        similarity, nearest = (queries @ bank).topk(k, dim=1)  # (n, k)
        votes = torch.zeros(len(queries), num_classes, device=device).scatter_add_(
            1, bank_labels[nearest], (similarity / temperature).exp())  # (n, classes)
        predicted = votes.topk(top_k, dim=1).indices
        truth = labels[start:start + chunk].to(device)
        correct[0] += (predicted[:, 0] == truth).sum()
        correct[1] += (predicted == truth[:, None]).any(dim=1).sum()
    count = len(features)
    return {"top1": round(100 * int(correct[0]) / count, 3), "top5": round(100 * int(correct[1]) / count, 3),
            "k": k, "temperature": temperature, "count": count, "bank": len(bank_labels)}
