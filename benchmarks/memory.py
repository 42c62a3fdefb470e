"""Training memory per image with and without gradient checkpointing, for the large models.

Each configuration runs in a fresh process: model, gradients and AdamW state are allocated first, then one
training step runs while a thread samples the resident memory every millisecond. The figure is that step's peak
above its start, divided by the batch: the activation memory (with autocast's bf16 weight copies) a batch costs.
It is measured on the first step of the process, because memory freed by one step stays resident for the next.
Prints one JSON line per configuration:

    python benchmarks/memory.py [--models vit_large swin_large] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MODELS = {
    "vit_base": ("vit_base_patch16_224", {}, 224),
    "vit_large": ("vit_large_patch16_224", {}, 224),
    "swin_large": ("swin_large_patch4_window7_224", {"window_size": 6}, 192),
}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(key: str, batch: int, checkpointing: bool) -> dict:
    """In this process: the peak extra resident memory of one training step."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from simmim_cli.image_spec import IMAGENET_RGB
    from simmim_cli.masking import MaskGenerator
    from simmim_cli.models import build_simmim, set_fused_attention
    from simmim_cli.optim import build_optimizer
    from simmim_cli.precision import autocast

    name, kwargs, size = MODELS[key]
    model = build_simmim(name, size, kwargs, 0.0)
    set_fused_attention(model, False)
    model.encoder.backbone.set_grad_checkpointing(checkpointing)
    optimizer = build_optimizer(model, 1e-4, 0.05)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    mask = MaskGenerator(size, 32, model.patch_size)(batch)

    def step() -> None:
        with autocast("bf16", torch.device("cpu")):
            loss, _ = model(IMAGENET_RGB.normalize(images), mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    for parameter in model.parameters():  # gradients and optimizer state exist before the measured step
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    start, peak, running = resident_bytes(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    began = time.perf_counter()
    step()
    seconds = time.perf_counter() - began
    running[0] = False
    thread.join()
    extra = max(0, peak[0] - start)
    parameters = sum(p.numel() for p in model.parameters())
    return {"model": key, "timm_name": name, "img_size": size, "batch_size": batch,
            "grad_checkpointing": checkpointing, "parameters_m": round(parameters / 1e6),
            "step_peak_extra_mb": round(extra / 2**20), "mb_per_image": round(extra / 2**20 / batch, 1),
            "step_seconds": round(seconds, 2), "precision": "bf16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_large", "swin_large"], choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: MODEL CHECKPOINTING
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.batch_size, args.one[1] == "1")), flush=True)
        return
    for key in args.models:
        rows = []
        for checkpointing in (False, True):
            result = subprocess.run([sys.executable, __file__, "--batch-size", str(args.batch_size), "--one", key,
                                     "1" if checkpointing else "0"], capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        saved = 1 - rows[1]["step_peak_extra_mb"] / max(rows[0]["step_peak_extra_mb"], 1)
        print(json.dumps({"model": key, "activation_memory_saved_by_checkpointing": round(saved, 2),
                          "extra_step_time": round(rows[1]["step_seconds"] / rows[0]["step_seconds"] - 1, 2)}),
              flush=True)


if __name__ == "__main__":
    main()
