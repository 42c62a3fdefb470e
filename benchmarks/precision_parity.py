"""The default precision (bf16 autocast where the machine has it) against plain fp32: same run, same seed,
a few hundred steps of SimMIM pretraining on the demo images. Prints the loss of both every 25 steps and one
JSON line with the mean loss over the last 100 steps of each:

    python benchmarks/precision_parity.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simmim_cli.commands.pretrain import pretrain  # noqa: E402
from simmim_cli.config import PretrainConfig  # noqa: E402
from simmim_cli.demo import DEMO_SETTINGS, make_demo_images  # noqa: E402
from simmim_cli.shards import write_shards  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(make_demo_images(root / "images"), root / "shards", maxcount=160)
        losses = {}
        for precision in ("fp32", "bf16"):
            settings = {**DEMO_SETTINGS, "epochs": 100, "warmup_epochs": 1, "log_every": 25}
            config = PretrainConfig(data=str(root / "shards"), output=str(root / precision), precision=precision,
                                    max_steps=args.steps, **settings)
            config.validate()
            pretrain(config)
            rows = [json.loads(line) for line in (root / precision / "metrics.jsonl").read_text().splitlines()]
            losses[precision] = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    for (step, fp32), (_, bf16) in zip(losses["fp32"], losses["bf16"], strict=True):
        print(f"step {step:4d}  fp32 {fp32:.4f}  bf16 {bf16:.4f}  difference {bf16 - fp32:+.4f}")

    def tail_mean(rows):
        tail = [loss for step, loss in rows if step > args.steps - 100]
        return sum(tail) / len(tail)

    fp32, bf16 = tail_mean(losses["fp32"]), tail_mean(losses["bf16"])
    print(json.dumps({"steps": args.steps, "fp32_mean_loss_last_100": round(fp32, 4),
                      "bf16_mean_loss_last_100": round(bf16, 4),
                      "relative_difference": round((bf16 - fp32) / fp32, 4)}), flush=True)


if __name__ == "__main__":
    main()
