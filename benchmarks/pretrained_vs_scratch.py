"""Does SimMIM pretraining pay? Fine-tuning from a SimMIM checkpoint against training from scratch with the same
budget, and a linear probe of the pretrained encoder against one of a random encoder; and what exporting the
fine-tuned model to ONNX in fp32 and int8 (`simmim export --int8`) costs in accuracy.

Data: the 1,797 real 8×8 handwritten digits scikit-learn ships, upscaled to 32×32 grey images; 1,437 for
training and 360 held out. Pretraining sees all 1,437 training images without labels; fine-tuning and probing
see the labels of only ``--labelled`` of them (the usual situation: many images, few labels). Prints one JSON
line per comparison and a summary line:

    python benchmarks/pretrained_vs_scratch.py [--pretrain-epochs 40] [--finetune-epochs 60] [--labelled 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simmim_cli.checkpoints import latest_checkpoint  # noqa: E402
from simmim_cli.commands.evaluate import evaluate  # noqa: E402
from simmim_cli.commands.export import export  # noqa: E402
from simmim_cli.commands.probe import linear_probe  # noqa: E402
from simmim_cli.config import FinetuneConfig, LinearProbeConfig, PretrainConfig  # noqa: E402
from simmim_cli.shards import write_shards  # noqa: E402
from simmim_cli.tool_configs import EvaluateConfig, ExportConfig  # noqa: E402

MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}
SIZE = 32


def digit_folders(root: Path, labelled: int, seed: int = 0) -> dict[str, Path]:
    """Image folders: all training images (unlabelled), a labelled subset, and the held-out images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    train, val = order[:1437], order[1437:]
    subset = train[:labelled]
    folders = {"unlabelled": root / "unlabelled", "labelled": root / "labelled", "val": root / "val"}
    for name, indices in (("unlabelled", train), ("labelled", subset), ("val", val)):
        for index in indices:
            grey = (digits.images[index] / 16.0 * 255).astype(np.uint8)
            image = Image.fromarray(grey).resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")
            folder = folders[name] if name == "unlabelled" else folders[name] / f"digit{digits.target[index]}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:04d}.png")
    return folders


def val_top1(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["val_top1"] for row in rows if "val_top1" in row][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=60)
    parser.add_argument("--probe-epochs", type=int, default=50)
    parser.add_argument("--labelled", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=4e-2, help="base lr (per 512) of both fine-tunings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep data and runs here (a pretraining found there is reused)")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        shards = {name: root / "shards" / name for name in ("unlabelled", "labelled", "val")}
        if not all((path / "_info.json").is_file() for path in shards.values()):
            folders = digit_folders(root / "images", args.labelled, args.seed)
            for name, folder in folders.items():
                write_shards(folder, shards[name], maxcount=256, split="train", force=True)
        common = {"model": MODEL, "model_kwargs": MODEL_KWARGS, "img_size": SIZE, "workers": 1, "seed": args.seed,
                  "log_every": 50}

        pretrain = PretrainConfig(data=str(shards["unlabelled"]), output=str(root / "pretrain"),
                                  mask_patch_size=8, epochs=args.pretrain_epochs, warmup_epochs=2, batch_size=64,
                                  base_lr=8e-3, warmup_lr=1e-4, min_lr=1e-4, **common)
        pretrain.validate()
        if latest_checkpoint(root / "pretrain") is None:
            pretrain(pretrain)
        checkpoint = str(latest_checkpoint(root / "pretrain"))

        results = {}
        # the same fine-tuning recipe and budget for both starts; crops keep most of a digit, no flips
        finetune = {"data": str(shards["labelled"]), "val_data": str(shards["val"]), "epochs": args.finetune_epochs,
                    "warmup_epochs": 3, "batch_size": 32, "base_lr": args.finetune_lr, "warmup_lr": 1e-5,
                    "min_lr": 1e-5, "layer_decay": 0.75, "drop_path": 0.1, "mixup": 0.0, "cutmix": 0.0,
                    "label_smoothing": 0.1, "auto_augment": None, "color_jitter": 0.0, "min_crop_scale": 0.5,
                    "hflip": 0.0, "reprob": 0.0, "crop_pct": 1.0, **common}
        for start in ("pretrained", "scratch"):
            config = FinetuneConfig(output=str(root / f"finetune-{start}"), force=True,
                                    pretrained=checkpoint if start == "pretrained" else None, **finetune)
            config.validate()
            finetune(config)
            results[f"finetune_{start}"] = val_top1(root / f"finetune-{start}")
        # what deployment costs: the pretrained fine-tuning exported in fp32 and int8, evaluated on the held-out set
        for precision in ("fp32", "int8"):
            exported = root / f"finetune-pretrained-{precision}.onnx"
            export(ExportConfig(checkpoint=str(root / "finetune-pretrained" / "last.pth"), output=str(exported),
                                int8=precision == "int8", verify=False, force=True))
            report = evaluate(EvaluateConfig(checkpoint=str(exported), data=str(shards["val"]), workers=1,
                                                   output=str(root / f"evaluate-{precision}"), force=True))
            results[f"onnx_{precision}"] = report["val_top1"]
        probe = {"data": str(shards["labelled"]), "val_data": str(shards["val"]), "epochs": args.probe_epochs,
                 "warmup_epochs": 5, "batch_size": 64, "base_lr": 0.5, "optimizer": "sgd", "cache_features": True,
                 "crop_pct": 1.0, **common}
        for start in ("pretrained", "random"):
            config = LinearProbeConfig(output=str(root / f"probe-{start}"), force=True,
                                       pretrained=checkpoint if start == "pretrained" else None, **probe)
            config.validate()
            linear_probe(config)
            results[f"probe_{start}"] = val_top1(root / f"probe-{start}")

    summary = {"data": "sklearn digits, 32x32", "labelled_images": args.labelled, "held_out_images": 360,
               "model": f"{MODEL} {MODEL_KWARGS}", "pretrain_epochs": args.pretrain_epochs,
               "finetune_epochs": args.finetune_epochs, "probe_epochs": args.probe_epochs,
               **{f"{k}_top1": v for k, v in results.items()},
               "finetune_gain": round(results["finetune_pretrained"] - results["finetune_scratch"], 2),
               "probe_gain": round(results["probe_pretrained"] - results["probe_random"], 2),
               "seconds": round(time.time() - started)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
