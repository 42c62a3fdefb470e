"""Step-time overhead of data-parallel training: 2 gloo processes against 1 process, same per-process batch.

Each process gets one thread (one core of this 2-core machine), so the only difference between the runs is
DDP: gradient all-reduce, the per-step agreement on finite gradients, and process start-up outside the timed
windows. Prints one JSON line:

    python benchmarks/distributed_overhead.py [--model vit_tiny] [--batch-size 8] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_step import SyntheticBatches  # noqa: E402

from simmim_cli import distributed  # noqa: E402
from simmim_cli.config import PretrainConfig  # noqa: E402
from simmim_cli.engine import Trainer  # noqa: E402
from simmim_cli.masking import MaskGenerator  # noqa: E402
from simmim_cli.models import build_simmim  # noqa: E402
from simmim_cli.tasks import PretrainTask  # noqa: E402

MODELS = {
    "vit_tiny": ("vit_tiny_patch16_224", {}, 224),
    "vit_small": ("vit_small_patch16_224", {}, 224),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {"window_size": 6}, 192),
}


def train(config: PretrainConfig, model_key: str, steps: int, windows: int) -> None:
    context = distributed.setup(config)
    torch.set_num_threads(1)  # one core per process, in both runs
    try:
        name, kwargs, size = MODELS[model_key]
        torch.manual_seed(0)
        model = build_simmim(name, size, kwargs, 0.0)
        dataset = SyntheticBatches(config.batch_size, size, MaskGenerator(size, 32, model.patch_size),
                                   (1 + windows) * steps)
        Trainer(PretrainTask(model, config), config, context).fit(dataset)
    finally:
        distributed.teardown()


def run(model_key: str, nproc: int, batch_size: int, steps: int, windows: int) -> dict:
    name, kwargs, size = MODELS[model_key]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = PretrainConfig(data="synthetic", model=name, model_kwargs=kwargs, img_size=size, batch_size=batch_size,
                            epochs=1, warmup_epochs=0, workers=0, log_every=steps, device="cpu",
                            nproc=nproc if nproc > 1 else 0, master_port=port,
                            output=tempfile.mkdtemp(prefix="simmim-ddp-bench-"))
    if nproc > 1:
        distributed.launch(train, config, model_key, steps, windows)
    else:
        train(config, model_key, steps, windows)
    rows = [json.loads(line) for line in (Path(config.output) / "metrics.jsonl").read_text().splitlines()]
    timed = [r["img_per_s"] for r in rows if "img_per_s" in r][1:]  # global images per second
    best = max(timed)
    return {"img_per_s": best, "step_s": round(batch_size * nproc / best, 4), "windows": timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny", choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window (and in the warmup)")
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    one = run(args.model, 1, args.batch_size, args.steps, args.windows)
    two = run(args.model, 2, args.batch_size, args.steps, args.windows)
    print(json.dumps({
        "model": args.model, "batch_per_process": args.batch_size, "backend": "gloo", "threads_per_process": 1,
        "one_process_step_s": one["step_s"], "two_process_step_s": two["step_s"],
        "step_time_overhead": round(two["step_s"] / one["step_s"] - 1, 3),
        "scaling_efficiency": round(two["img_per_s"] / (2 * one["img_per_s"]), 3),
        "one_process_img_per_s": one["img_per_s"], "two_process_img_per_s": two["img_per_s"],
    }), flush=True)


if __name__ == "__main__":
    main()
