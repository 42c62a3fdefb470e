"""The pretraining step on a GPU, and whether this node's cores can feed it.

For ViT-B/16 at 224 px and Swin-B at 192 px (window 6), batch 128, default settings (`--precision auto`,
fused attention, fused AdamW): img/s, MFU and `data_wait` as the engine logs them (`simmim pretrain`'s own loop
over synthetic uint8 batches, so decoding is not measured here), and the peak GPU memory. Then the input side:
images per second of one loader process (`simmim pretrain`'s shard stream over 500×375 JPEGs, by CPU time) ×
the loader processes this node gives each GPU, against what the GPU consumes. Prints one JSON line per model
and one verdict line; on a machine without CUDA it prints one line saying so and exits 0.

    python benchmarks/gpu_step.py [--models vit_base swin_base] [--batch-size 128] [--steps 10] [--gpus-per-node 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_pipeline import make_jpegs, shard_stream  # noqa: E402
from pretrain_step import SyntheticBatches  # noqa: E402

from simmim_cli import distributed  # noqa: E402
from simmim_cli.config import PretrainConfig  # noqa: E402
from simmim_cli.engine import Trainer  # noqa: E402
from simmim_cli.masking import MaskGenerator  # noqa: E402
from simmim_cli.models import build_simmim  # noqa: E402
from simmim_cli.pipeline import default_workers  # noqa: E402
from simmim_cli.shards import write_shards  # noqa: E402
from simmim_cli.tasks import PretrainTask  # noqa: E402

MODELS = {
    "vit_base": ("vit_base_patch16_224", {}, 224),
    "swin_base": ("swin_base_patch4_window7_224", {"window_size": 6}, 192),
}


def measure_step(key: str, batch_size: int, steps: int, windows: int) -> dict:
    name, kwargs, size = MODELS[key]
    device = torch.device("cuda", 0)
    config = PretrainConfig(model=name, model_kwargs=kwargs, img_size=size, batch_size=batch_size, epochs=1,
                            warmup_epochs=0, workers=0, log_every=steps, device="cuda",
                            output=tempfile.mkdtemp(prefix="simmim-gpu-bench-"), data="synthetic")
    torch.manual_seed(0)
    model = build_simmim(name, size, kwargs, 0.0)
    dataset = SyntheticBatches(batch_size, size, MaskGenerator(size, 32, model.patch_size, 0.6),
                               (1 + windows) * steps)
    torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(PretrainTask(model, config), config, distributed.Context(device=device))
    trainer.fit(dataset)
    rows = [json.loads(line) for line in (Path(config.output) / "metrics.jsonl").read_text().splitlines()]
    timed = [row for row in rows if "img_per_s" in row][1:]  # the first window holds warmup and autotuning
    best = max(timed, key=lambda row: row["img_per_s"])
    return {"model": key, "timm_name": name, "img_size": size, "batch_size": batch_size,
            "precision": trainer.precision, "gpu": torch.cuda.get_device_name(device),
            "train_gflop_per_image": round((trainer.flops_per_image or 0) / 1e9, 2),
            "img_per_s": best["img_per_s"], "mfu": best.get("mfu"), "data_wait": best["data_wait"],
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "img_per_s_windows": [row["img_per_s"] for row in timed]}


def loader_process_speed(img_size: int) -> float:
    """Images per CPU-second of one loader process on 500×375 JPEGs (the paper's crop and the SimMIM mask)."""
    folder = Path(tempfile.mkdtemp(prefix="simmim-gpu-bench-jpegs-"))
    make_jpegs(folder / "images", 300, (500, 375))
    write_shards(folder / "images", folder / "shards", maxcount=100)
    return shard_stream(folder / "shards", img_size, rounds=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows after a warmup one; the best counts")
    parser.add_argument("--gpus-per-node", type=int, default=torch.cuda.device_count() or 8,
                        help="training processes sharing this node's cores")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"gpu": None, "note": "no CUDA device: GPU step figures unmeasured on this machine"}))
        return
    results = [measure_step(key, args.batch_size, args.steps, args.windows) for key in args.models]
    for result in results:
        print(json.dumps(result), flush=True)
    per_process = loader_process_speed(192)
    workers = default_workers(args.gpus_per_node)
    supply = per_process * workers
    demand = max(result["img_per_s"] for result in results)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(json.dumps({
        "loader_img_per_s_per_process": round(per_process, 1), "cores": cores, "gpus_per_node": args.gpus_per_node,
        "workers_per_gpu": workers, "supply_img_per_s_per_gpu": round(supply, 1),
        "demand_img_per_s_per_gpu": demand,
        "verdict": f"this node's cores {'can' if supply >= demand else 'cannot'} feed the GPU with --decode cpu "
                   f"({supply:.0f} of {demand:.0f} img/s)"}), flush=True)


if __name__ == "__main__":
    main()
