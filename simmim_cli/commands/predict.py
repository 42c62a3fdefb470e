"""``simmim predict``: top-k classes per image with an ONNX model (onnxruntime) or a checkpoint (PyTorch)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoints
from ..errors import SimmimError
from ..image_inputs import PredictStream, image_sources
from ..image_spec import ImageSpec
from ..inference import OnnxClassifier, load_classifier
from ..pipeline import make_loader
from ..tool_configs import PredictConfig


def predict(config: PredictConfig) -> dict[str, Any]:
    """``simmim predict``: top-k classes per image with an ONNX model (onnxruntime) or a checkpoint (PyTorch).
    Loader workers decode and crop the images; the results keep the input order."""
    path = Path(config.model)
    if not (path.is_file() or checkpoints.is_sharded_checkpoint(path)):
        raise SimmimError(f"model {path} not found; give an .onnx file from simmim export or a best.pth")
    notes: list[str] = []
    if path.suffix == ".onnx":
        model = OnnxClassifier(path, config.provider)
        if config.provider == "auto" and model.provider == "CPUExecutionProvider":
            notes.append("note: running on the CPU (no usable CUDA provider for onnxruntime here)")
        size, classes, crop_pct, spec = model.img_size, model.classes, model.crop_pct, model.spec
        if config.img_size and config.img_size != size:
            raise SimmimError(f"{path} takes {size}×{size} images, not --img-size {config.img_size}; drop "
                              f"--img-size or export the model at {config.img_size}")
        device = torch.device("cuda") if model.on_gpu else torch.device("cpu")  # on a GPU: bound in place
        runtime = f"onnxruntime ({model.provider})"
    else:
        from ..distributed import pick_device

        model, train_config, classes = load_classifier(path)
        device = pick_device({"auto": "auto", "cuda": "cuda", "cpu": "cpu"}.get(config.provider, "auto"))
        model.to(device)
        size, crop_pct = config.img_size or train_config.img_size, train_config.crop_pct
        spec = ImageSpec.from_dict(train_config.image_spec)
        runtime = f"PyTorch ({device})"
    stream = PredictStream(image_sources(config.images), size, crop_pct, config.batch_size, config.workers,
                           config.limit, spec)
    skipped: list[str] = []
    results = []
    started, counted = time.perf_counter(), 0
    for batch in make_loader(stream):
        skipped += batch["skipped"]
        notes += batch["notes"]
        if not batch["name"]:
            continue
        with torch.no_grad():
            logits = model(spec.normalize(batch["image"].to(device))).double().cpu().numpy()
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        k = min(config.top_k, probs.shape[1])
        for name, row in zip(batch["name"], probs, strict=True):
            top = np.argsort(-row)[:k]
            entries = [{"label": classes[i] if i < len(classes) else str(i), "index": int(i),
                        "prob": round(float(row[i]), 6)} for i in top]
            results.append({"image": name, "top1": entries[0]["label"], "topk": entries})
        counted += len(batch["name"])
    if not results:
        raise SimmimError("none of the images could be read" + (f" ({skipped[0]})" if skipped else ""))
    seconds = time.perf_counter() - started
    return {"results": results, "skipped": skipped, "notes": notes, "runtime": runtime,
            "images_per_second": counted / max(seconds, 1e-9)}
