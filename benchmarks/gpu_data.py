"""Pretraining input speed with `--decode gpu` (NVIDIA DALI) against `--decode cpu` (loader processes).

On 500×375 JPEG shards (crops of the photos scikit-learn ships), the pretraining stream (paper's crop, flip,
SimMIM mask, uint8 batches) as `simmim pretrain` builds it:

- cpu: one loader process (`--workers 1`); images per second of wall time and per CPU-second, and the cores
  it kept busy. Multiply by `--workers` for a training process's input rate (while cores last).
- gpu: DALI on GPU 0 (`--dali-threads` CPU threads, hardware/CUDA JPEG decoding, crops decoded as regions);
  images per second per GPU and the CPU cores the process kept busy. Without a CUDA GPU (or DALI) it is
  reported as unmeasured, and DALI's CPU-only mode (the graph the tests run) is timed instead, which says
  nothing about GPU speed.

Both are read as a run reads them, one pass over `--epochs` epochs: images/s over the pass (DALI builds its
pipeline anew at each epoch's start, as in a run) and at steady state (from the median time between batches).

Prints one JSON line:

    python benchmarks/gpu_data.py [--images 512] [--epochs 2] [--img-size 224] [--batch-size 128] [--dali-threads 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_pipeline import make_jpegs  # noqa: E402

from simmim_cli import dali  # noqa: E402
from simmim_cli.masking import MaskGenerator  # noqa: E402
from simmim_cli.pipeline import ShardStream, make_loader  # noqa: E402
from simmim_cli.shards import resolve_shards, write_shards  # noqa: E402
from simmim_cli.transforms import PretrainTransform, decode_tensor, pretrain_decode_size  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its children that have ended (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(stream, epochs: int, sync=lambda: None) -> dict:
    """One warm-up epoch, then one pass over ``epochs`` epochs as ``simmim pretrain`` reads them: images/s over the
    pass (a DALI pipeline is built anew at each epoch's start, a cost a run pays too) and at steady state (the
    median time between batches, without the epochs' starts), per CPU-second, and the cores kept busy."""
    stream.set_epoch(0)
    loader = make_loader(stream)
    sum(batch["image"].shape[0] for batch in loader)
    del loader
    sync()
    stream.set_epoch(1, epochs=epochs)
    wall, cpu = time.perf_counter(), cpu_seconds()
    images, arrivals = 0, []
    loader = make_loader(stream)
    for batch in loader:
        images += batch["image"].shape[0]
        sync()
        arrivals.append(time.perf_counter())
    del loader  # joins loader workers, so their CPU time is counted
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    gaps = sorted(later - earlier for earlier, later in itertools.pairwise(arrivals))
    steady = stream.batch_size / gaps[len(gaps) // 2] if gaps else 0.0
    return {"img_per_s": round(images / wall, 1), "steady_img_per_s": round(steady, 1),
            "img_per_cpu_s": round(images / cpu, 1), "cpu_cores_used": round(cpu / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dali-threads", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    masks = MaskGenerator(args.img_size, 32, 16)
    result = {"benchmark": "gpu_data", "jpeg_size": "500x375", "img_size": args.img_size, "images": args.images,
              "batch_size": args.batch_size, "cpu_cores_visible": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp) / "images", args.images, (500, 375))
        write_shards(Path(tmp) / "images", Path(tmp) / "shards", maxcount=128)  # writes the DALI index files too
        shards = resolve_shards(str(Path(tmp) / "shards"))

        cpu_stream = ShardStream(shards, PretrainTransform(args.img_size, masks), args.batch_size, workers=1,
                                 decode=partial(decode_tensor, min_size=pretrain_decode_size(args.img_size)))
        result["decode_cpu_per_loader_process"] = timed(cpu_stream, args.epochs)

        if not dali.dali_installed():
            result["decode_gpu_per_gpu"] = f"unmeasured: DALI is not installed ({dali.INSTALL})"
        elif not torch.cuda.is_available():
            result["decode_gpu_per_gpu"] = "unmeasured: no CUDA GPU here"
            stream = dali.DaliStream(shards, dali.pretrain_augment(args.img_size), args.batch_size, "cpu",
                                     workers=args.dali_threads, masks=masks)
            result["dali_cpu_mode"] = {**timed(stream, args.epochs), "threads": args.dali_threads,
                                       "note": "DALI's CPU operators (the tests' mode), not a GPU figure"}
        else:
            stream = dali.DaliStream(shards, dali.pretrain_augment(args.img_size), args.batch_size,
                                     torch.device("cuda", 0), workers=args.dali_threads, masks=masks)
            result["decode_gpu_per_gpu"] = {**timed(stream, args.epochs, torch.cuda.synchronize),
                                            "threads": args.dali_threads, "gpu": torch.cuda.get_device_name(0)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
