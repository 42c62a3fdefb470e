"""Pretraining speed: the step alone against this machine's matmul peak, and against another commit's code.

The step alone: the real `simmim pretrain` engine (engine.Trainer, default settings) on synthetic uint8
batches, so decoding is not measured; the best window of a few counts. For each model: training FLOPs per
image (torch.utils.flop_counter, forward + backward), img/s, and the share of a large matmul's speed in the
step's precision (bf16 under bf16 autocast; fp32 on a CPU without bf16 instructions, where `auto` trains in fp32).

    python benchmarks/pretrain_step.py [--models vit_small swin_tiny] [--steps 5] [--batch-size 16]

Against a git ref (a commit, tag or branch): the ref's code is checked out into a temporary worktree and the
two are run alternately, ``--rounds`` times, each run in a fresh process (the order swaps every round), so that
a noisy, shared machine slows both alike. Prints each pair, the ratios (working tree ÷ ref) and their median:

    python benchmarks/pretrain_step.py --against d76357b [--rounds 3]
    python benchmarks/pretrain_step.py --against d76357b --real-loop   # the real `simmim pretrain` command

``--real-loop`` runs `python -m simmim_cli pretrain` of each tree on shards cut from the built-in demo images,
with the real loader and its default worker count, for a few epochs, and reports the throughput over the
whole run (log rows' wall clock: checkpoints, previews and epoch boundaries included) and, per epoch, the first
log window's img/s against the epoch's median window (below 1: a stall at the epoch's start).
Use it before and after every change to the engine, the pipeline or the models.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

ROOT = Path(__file__).resolve().parent.parent

MODELS = {
    "vit_small": ("vit_small_patch16_224", {}, 224),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {"window_size": 6}, 192),
    # the authors' ViT (BEiT-style: shared relative position bias, layer scale) at ViT-S width
    "beit_small": ("beit_base_patch16_224", {"embed_dim": 384, "num_heads": 6, "use_abs_pos_emb": False,
                                             "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False,
                                             "init_values": 0.1}, 224),
}


class SyntheticBatches(IterableDataset):
    """The same uint8 batch over and over: the engine's view of a dataset, with no decoding cost. Takes both the
    older ``set_epoch(epoch, skip_batches)`` and the newer one that spans ``epochs``."""

    workers = 0

    def __init__(self, batch_size: int, img_size: int, masks, batches: int):
        self.batch_size = batch_size
        self.batches_per_epoch = batches
        self.skip, self.epochs = 0, 1
        generator = torch.Generator().manual_seed(0)
        self.batch = {"image": torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8,
                                             generator=generator),
                      "mask": masks(batch_size, generator)}

    def set_epoch(self, epoch: int, skip_batches: int = 0, epochs: int = 1) -> None:
        self.skip, self.epochs = skip_batches, epochs

    def __iter__(self):
        for _ in range(self.batches_per_epoch * self.epochs - self.skip):
            yield dict(self.batch)


def measure_step(key: str, batch_size: int, steps: int, windows: int, precision: str, compile: bool) -> dict:
    """A warmup window and ``windows`` timed windows of ``steps`` steps through ``engine.Trainer``; the best
    window is the figure (the one least disturbed by whatever else runs on the machine). Imports only what
    every version of the engine since the first has, so that it runs any ref's code."""
    from simmim_cli import distributed
    from simmim_cli.config import PretrainConfig
    from simmim_cli.engine import Trainer
    from simmim_cli.masking import MaskGenerator
    from simmim_cli.models import build_simmim
    from simmim_cli.tasks import PretrainTask

    name, kwargs, size = MODELS[key]
    config = PretrainConfig(model=name, model_kwargs=kwargs, img_size=size, batch_size=batch_size, epochs=1,
                            warmup_epochs=0, workers=0, log_every=steps, precision=precision, compile=compile,
                            output=tempfile.mkdtemp(prefix="simmim-bench-"), data="synthetic")
    torch.manual_seed(0)
    model = build_simmim(name, size, kwargs, 0.0)
    masks = MaskGenerator(size, 32, model.patch_size, 0.6)
    dataset = SyntheticBatches(batch_size, size, masks, (1 + windows) * steps)
    with contextlib.redirect_stdout(sys.stderr):  # the engine's progress lines; stdout is for the JSON figures
        Trainer(PretrainTask(model, config), config, distributed.Context()).fit(dataset)
    rows = [json.loads(line) for line in (Path(config.output) / "metrics.jsonl").read_text().splitlines()]
    timed = [r["img_per_s"] for r in rows if "img_per_s" in r][1:]
    return {"model": key, "img_per_s": max(timed), "img_per_s_windows": timed}


def train_flops_per_image(key: str, batch_size: int) -> float:
    from simmim_cli import flops
    from simmim_cli.image_spec import IMAGENET_RGB
    from simmim_cli.masking import MaskGenerator
    from simmim_cli.models import build_simmim

    name, kwargs, size = MODELS[key]
    model = build_simmim(name, size, kwargs, 0.0)
    masks = MaskGenerator(size, 32, model.patch_size, 0.6)
    batch = SyntheticBatches(batch_size, size, masks, 1).batch
    normalize = IMAGENET_RGB.normalize
    counted, _ = flops.count_training_flops(model, batch, lambda m, b: m(normalize(b["image"]), b["mask"])[0])
    return counted


def matmul_peak_gflops(precision: str) -> float:
    """GFLOP/s of a large matmul in the step's precision (bf16 where the step runs under bf16 autocast, fp32 on
    a CPU without bf16 instructions), the best of the rounds that fit in 3 seconds."""
    from simmim_cli import flops

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return flops.matmul_peak(dtype, size=4096, seconds=3.0) / 1e9


# ---------------------------------------------------------------------------------------------- the real loop


def make_demo_shards(folder: Path, images: int) -> Path:
    """``images`` demo crops written as shards by this tree's `simmim make-shards` (read alike by every version)."""
    from simmim_cli.demo import make_demo_images

    make_demo_images(folder / "images", count=images)
    run_cli(ROOT, ["make-shards", str(folder / "images"), str(folder / "shards"), "--max-size", "1"])
    return folder / "shards"


def run_cli(tree: Path, arguments: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "simmim_cli", *arguments], check=True, cwd=tree, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(tree)})


def measure_real_loop(tree: Path, key: str, shards: Path, batch_size: int, epochs: int, log_every: int,
                      precision: str) -> dict:
    """`simmim pretrain` of ``tree`` on ``shards``: img/s over the whole run and each epoch's first window
    against its median."""
    name, kwargs, size = MODELS[key]
    output = Path(tempfile.mkdtemp(prefix="simmim-bench-")) / "run"
    run_cli(tree, ["pretrain", "--data", str(shards), "--model", name, "--model-kwargs", json.dumps(kwargs),
                   "--img-size", str(size), "--batch-size", str(batch_size), "--epochs", str(epochs),
                   "--warmup-epochs", "0", "--base-lr", "2e-4", "--mask-patch-size", "32", "--log-every",
                   str(log_every), "--precision", precision, "--output", str(output)])
    rows = [row for line in (output / "metrics.jsonl").read_text().splitlines()
            if "img_per_s" in (row := json.loads(line))]
    # the first row's window holds the start (model building, first-batch costs): measure from its end
    seconds = rows[-1]["time"] - rows[0]["time"]
    run_img_per_s = (rows[-1]["step"] - rows[0]["step"]) * batch_size / seconds
    first_windows = []  # per epoch after the first: its first window ÷ the median of its windows
    for epoch in range(1, epochs):
        windows = [r["img_per_s"] for r in rows if epoch < r["epoch"] <= epoch + 1]
        if len(windows) >= 3:
            first_windows.append(round(windows[0] / statistics.median(windows), 3))
    return {"model": key, "img_per_s": round(run_img_per_s, 2),
            "img_per_s_windows": [r["img_per_s"] for r in rows], "first_window_of_epoch": first_windows}


# ---------------------------------------------------------------------------------------------- against a ref


def worktree(ref: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="simmim-ref-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(folder), ref], check=True)
    return folder


def run_worker(tree: Path, args: argparse.Namespace, key: str, shards: Path | None) -> dict:
    """One measurement of ``tree``'s code in a fresh process (this script, ``tree`` first on the path)."""
    command = [sys.executable, __file__, "--worker", str(tree), "--models", key, "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--windows", str(args.windows), "--precision",
               args.precision, "--epochs", str(args.epochs)]
    if shards is not None:
        command += ["--real-loop", "--shards", str(shards)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    return json.loads(done.stdout.strip().splitlines()[-1])


def against(args: argparse.Namespace) -> None:
    reference = worktree(args.against)
    here = Path(ROOT)
    scratch = Path(tempfile.mkdtemp(prefix="simmim-bench-data-"))
    try:
        shards = make_demo_shards(scratch, args.images) if args.real_loop else None
        for key in args.models:
            pairs = []
            for round_index in range(args.rounds):
                order = [("ref", reference), ("tree", here)]
                if round_index % 2:
                    order.reverse()
                results = {label: run_worker(tree, args, key, shards) for label, tree in order}
                pairs.append((results["ref"], results["tree"]))
                print(json.dumps({"model": key, "round": round_index + 1, "ref": results["ref"],
                                  "tree": results["tree"]}), file=sys.stderr, flush=True)
            ratios = [round(new["img_per_s"] / old["img_per_s"], 3) for old, new in pairs]
            summary = {
                "model": key, "measure": "real_loop" if args.real_loop else "step", "against": args.against,
                "batch_size": args.batch_size, "ref_img_per_s": [old["img_per_s"] for old, _ in pairs],
                "tree_img_per_s": [new["img_per_s"] for _, new in pairs], "ratios": ratios,
                "median_ratio": statistics.median(ratios), "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            }
            if args.real_loop:
                summary["ref_first_window_of_epoch"] = [old["first_window_of_epoch"] for old, _ in pairs]
                summary["tree_first_window_of_epoch"] = [new["first_window_of_epoch"] for _, new in pairs]
            print(json.dumps(summary), flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(reference)], check=False)


# ---------------------------------------------------------------------------------------------- entry points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small", "swin_tiny"], choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window (and in the warmup)")
    parser.add_argument("--windows", type=int, default=3, help="timed windows; the best one counts")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--against", metavar="REF", help="compare with this git ref's code, alternately")
    parser.add_argument("--rounds", type=int, default=3, help="with --against: pairs of runs")
    parser.add_argument("--real-loop", action="store_true", help="with --against: the real `simmim pretrain` loop")
    parser.add_argument("--images", type=int, default=320, help="with --real-loop: demo images in the shards")
    parser.add_argument("--epochs", type=int, default=3, help="with --real-loop: epochs per run")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one measurement of that tree's code
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        sys.path.insert(0, str(args.worker.resolve()))
        key = args.models[0]
        if args.real_loop:
            log_every = max(1, args.images // args.batch_size // 4)  # four windows an epoch
            result = measure_real_loop(args.worker, key, args.shards, args.batch_size, args.epochs, log_every,
                                       args.precision)
        else:
            result = measure_step(key, args.batch_size, args.steps, args.windows, args.precision, args.compile)
        print(json.dumps(result), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    if args.against:
        against(args)
        return
    from simmim_cli.precision import resolve_precision

    precision = resolve_precision(args.precision, torch.device("cpu"))
    for key in args.models:
        before = matmul_peak_gflops(precision)
        result = measure_step(key, args.batch_size, args.steps, args.windows, args.precision, args.compile)
        peak = max(before, matmul_peak_gflops(precision))  # the machine's capability: the best of before and after
        gflop = train_flops_per_image(key, args.batch_size) / 1e9
        result.update(
            img_size=MODELS[key][2], batch_size=args.batch_size, compile=args.compile,
            precision=precision, train_gflop_per_image=round(gflop, 2), matmul_peak_gflops=round(peak, 1),
            limit_img_per_s=round(peak / gflop, 2), ratio_of_limit=round(result["img_per_s"] * gflop / peak, 3),
            threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
            torch=torch.__version__)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
