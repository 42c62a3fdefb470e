"""Per-process memory of a sharded (--shard-model, FSDP2) against a replicated (DDP) ViT-L SimMIM step, 2 gloo
CPU processes, and the step-time ratio sharded / replicated.

Each run goes through the engine's own steps (``Trainer.setup``, ``train_step``, ``optimizer_step``) on a fixed
synthetic batch, one thread per process. After a warm-up step the peak resident set is reset (as ``simmim check``
does: malloc_trim, then /proc/self/clear_refs), and the next steps' peak is the figure; the elements of parameters
and AdamW state each rank holds are read off its tensors (its shard when sharded). Prints one JSON line:

    python benchmarks/sharded_memory.py [--model vit_large_patch16_224] [--img-size 224] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
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
from simmim_cli.parallelize import local_numel, optimizer_numel  # noqa: E402
from simmim_cli.preflight import PeakMemory  # noqa: E402
from simmim_cli.tasks import PretrainTask  # noqa: E402


def step_figures(config: PretrainConfig, steps: int) -> dict | None:
    """One process: a warm-up step, then ``steps`` timed steps with the peak resident memory reset before them."""
    context = distributed.setup(config)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_simmim(config.model, config.img_size, {}, 0.0)
        masks = MaskGenerator(config.img_size, 32, model.patch_size, 0.6)
        dataset = SyntheticBatches(config.batch_size, config.img_size, masks, steps + 1)
        trainer = Trainer(PretrainTask(model, config), config, context)
        trainer.setup(dataset)
        batches = iter(dataset)
        memory = PeakMemory(torch.device("cpu"))
        trainer.train_step(next(batches), last_micro=True)  # the optimizer state is made at the first step
        trainer.optimizer_step()
        memory.reset()
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(next(batches), last_micro=True)
            trainer.optimizer_step()
        figures = {"rank": context.rank, "peak_rss": memory.read(), "step_s": (time.perf_counter() - started) / steps,
                   "parameters_held": local_numel(trainer.parameters),
                   "optimizer_held": optimizer_numel(trainer.optimizer),
                   "parameters": sum(p.numel() for p in trainer.parameters)}
        trainer.reporter.close()
        trainer.run_log.close()
        return distributed.gather_objects(figures)
    finally:
        distributed.teardown()


def run(model: str, img_size: int, batch_size: int, steps: int, shard: bool) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = PretrainConfig(data="synthetic", model=model, img_size=img_size, batch_size=batch_size, epochs=1,
                            warmup_epochs=0, workers=0, log_every=1000, precision="fp32", device="cpu", nproc=2,
                            master_port=port, shard_model=shard, output=tempfile.mkdtemp(prefix="simmim-shard-bench-"))
    return distributed.launch(step_figures, config, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_large_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    replicated = run(args.model, args.img_size, args.batch_size, args.steps, shard=False)
    sharded = run(args.model, args.img_size, args.batch_size, args.steps, shard=True)
    gib = 2**30
    print(json.dumps({
        "model": args.model, "img_size": args.img_size, "batch_per_process": args.batch_size, "processes": 2,
        "backend": "gloo", "precision": "fp32", "parameters": replicated[0]["parameters"],
        "ddp_peak_rss_gib": [round(r["peak_rss"] / gib, 2) for r in replicated],
        "sharded_peak_rss_gib": [round(r["peak_rss"] / gib, 2) for r in sharded],
        "peak_rss_ratio": round(max(r["peak_rss"] for r in sharded) / max(r["peak_rss"] for r in replicated), 3),
        "ddp_parameters_held": [r["parameters_held"] for r in replicated],
        "sharded_parameters_held": [r["parameters_held"] for r in sharded],
        "ddp_optimizer_held": [r["optimizer_held"] for r in replicated],
        "sharded_optimizer_held": [r["optimizer_held"] for r in sharded],
        "ddp_step_s": round(max(r["step_s"] for r in replicated), 3),
        "sharded_step_s": round(max(r["step_s"] for r in sharded), 3),
        "step_time_ratio": round(max(r["step_s"] for r in sharded) / max(r["step_s"] for r in replicated), 3),
    }), flush=True)


if __name__ == "__main__":
    main()
