"""``simmim predict``: top-k classes per image with an ONNX model (onnxruntime) or a checkpoint (PyTorch)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PredictConfig
from ..errors import SimmimError
from ..inference import OnnxClassifier, load_classifier
from ..pipeline import collect_images, image_views
from ..transforms import normalize


def _batches(entries: Iterator[tuple[str, bytes]], img_size: int, crop_pct: float, size: int, skipped: list[str],
             notes: list[str]):
    """Batches of (names, normalised images) for prediction."""
    names, tensors = [], []
    for name, tensor in image_views(entries, img_size, crop_pct, skipped, notes):
        names.append(name)
        tensors.append(tensor)
        if len(names) == size:
            yield names, normalize(torch.stack(tensors))
            names, tensors = [], []
    if names:
        yield names, normalize(torch.stack(tensors))


def predict(config: PredictConfig) -> dict[str, Any]:
    """``simmim predict``: top-k classes per image with an ONNX model (onnxruntime) or a checkpoint (PyTorch)."""
    path = Path(config.model)
    if not path.is_file():
        raise SimmimError(f"model {path} not found; give an .onnx file from simmim export or a best.pth")
    notes: list[str] = []
    if path.suffix == ".onnx":
        model = OnnxClassifier(path, config.provider)
        if config.provider == "auto" and model.provider == "CPUExecutionProvider":
            notes.append("note: running on the CPU (no usable CUDA provider for onnxruntime here)")
        size, classes, crop_pct = model.img_size, model.classes, model.crop_pct
        if config.img_size and config.img_size != size:
            raise SimmimError(f"{path} takes {size}×{size} images, not --img-size {config.img_size}; drop "
                              f"--img-size or export the model at {config.img_size}")

        def scores(batch: torch.Tensor) -> np.ndarray:
            return model(batch).numpy()
        runtime = f"onnxruntime ({model.provider})"
    else:
        from ..distributed import pick_device

        model, train_config, classes = load_classifier(path)
        device = pick_device({"auto": "auto", "cuda": "cuda", "cpu": "cpu"}.get(config.provider, "auto"))
        model.to(device)
        size, crop_pct = config.img_size or train_config.img_size, train_config.crop_pct

        def scores(batch: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return model(batch.to(device)).float().cpu().numpy()
        runtime = f"PyTorch ({device})"
    skipped: list[str] = []
    results = []
    started, counted = time.perf_counter(), 0
    for names, batch in _batches(collect_images(config.images, config.limit), size, crop_pct, config.batch_size,
                                 skipped, notes):
        logits = scores(batch).astype(np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        k = min(config.top_k, probs.shape[1])
        for name, row in zip(names, probs, strict=True):
            top = np.argsort(-row)[:k]
            entries = [{"label": classes[i] if i < len(classes) else str(i), "index": int(i),
                        "prob": round(float(row[i]), 6)} for i in top]
            results.append({"image": name, "top1": entries[0]["label"], "topk": entries})
        counted += len(names)
    if not results:
        raise SimmimError("none of the images could be read" + (f" ({skipped[0]})" if skipped else ""))
    seconds = time.perf_counter() - started
    return {"results": results, "skipped": skipped, "notes": notes, "runtime": runtime,
            "images_per_second": counted / max(seconds, 1e-9)}
