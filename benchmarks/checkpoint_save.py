"""What safe checkpoint saving costs: ``torch.save`` to a path then a rename (the old way) against
``checkpoints.save_checkpoint`` (an open file, flushed and fsync'ed, the storage-fault handling) and
``RunCheckpoints.save`` (also the free-space check before the save and the pruning after it).

Prints one JSON line: seconds per save (median of --repeats) for each, and the checkpoint size.

    python benchmarks/checkpoint_save.py --megabytes 256 --folder /path/on/the/disk/to/measure
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from simmim_cli import checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=256.0, help="size of the state's tensors")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    tensors = max(1, int(args.megabytes * 1e6 / 4 / 4_000_000))
    state = {"model": {f"w{i}": torch.randn(int(args.megabytes * 1e6 / 4 / tensors)) for i in range(tensors)},
             "step": 1}
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)

        def plain(step: int) -> None:
            path = folder / checkpoints.checkpoint_name(step)
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)

        saver = checkpoints.RunCheckpoints(folder, keep=1, say=lambda line: None)
        ways = {"torch_save_and_rename": plain,
                "save_checkpoint_fsync": lambda step: checkpoints.save_checkpoint(
                    state, folder / checkpoints.checkpoint_name(step)),
                "run_checkpoints_save": lambda step: saver.save(state, folder / checkpoints.checkpoint_name(step))}
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for repeat in range(args.repeats + 1):  # interleaved, so that no way profits from going first
            for name, save in ways.items():
                started = time.perf_counter()
                save(repeat)
                if repeat:  # the first round warms the page cache and the allocator up
                    seconds[name].append(time.perf_counter() - started)
                checkpoints.prune_checkpoints(folder, 1)
        result = {f"{name}_s": round(statistics.median(times), 3) for name, times in seconds.items()}
        size = checkpoints.latest_checkpoint(folder).stat().st_size
    print(json.dumps({"checkpoint_mb": round(size / 1e6, 1), **result, "repeats": args.repeats,
                      "folder": args.folder or tempfile.gettempdir()}))


if __name__ == "__main__":
    main()
