"""Do the defaults learn on small labelled sets? Fine-tuning with every schedule and augmentation option left to
the defaults (as `simmim finetune` without a recipe), from a SimMIM pretraining (also with defaults) and from
scratch, on small real image sets that ship with scikit-learn and scikit-image (nothing is downloaded):

- digits: scikit-learn's 1,797 8×8 handwritten digits upscaled to 32×32, 10 classes (1,437 train, 360 held out);
- faces: scikit-image's LFW subset, 200 25×25 grey crops, face or not, upscaled to 32×32 (160 train, 40 held out).

Pretraining sees the training images of the same set without labels. Given are only the data, the epochs, the
model (a ViT of patch 4, width 64, depth 4: small enough for a busy 2-core CPU), the image size, fp32 and the
mask patch size (8: the default 32 would be the whole 32-px image); the rest is left to the defaults.
Prints one JSON line per set (means over the seeds, and each seed's figures):

    OMP_NUM_THREADS=1 python benchmarks/small_data_finetune.py [--pretrain-epochs 30] [--finetune-epochs 15]
        [--sets digits faces] [--seeds 0 1 2]

One thread: on a CPU shared with other jobs, two spinning intra-op threads ran 60× slower here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simmim_cli.checkpoints import latest_checkpoint  # noqa: E402
from simmim_cli.commands.finetune import finetune  # noqa: E402
from simmim_cli.commands.pretrain import pretrain  # noqa: E402
from simmim_cli.config import FinetuneConfig, PretrainConfig, resolve_config  # noqa: E402
from simmim_cli.shards import write_shards  # noqa: E402

MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}  # tiny: a 2-core CPU
SIZE = 32


def digits_set() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images / 16.0, digits.target, [f"digit{i}" for i in range(10)]


def faces_set() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from skimage.data import lfw_subset

    images = lfw_subset()  # the first 100 are faces, the other 100 are not
    return images, (np.arange(len(images)) >= 100).astype(int), ["face", "other"]


SETS = {"digits": digits_set, "faces": faces_set}


def write_set(name: str, root: Path, seed: int) -> dict[str, Path]:
    """Shards of a set: training images without labels, the same with labels, and the held-out 20%."""
    images, labels, classes = SETS[name]()
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(round(0.8 * len(order)))
    shards = {}
    for split, indices in (("unlabelled", order[:cut]), ("labelled", order[:cut]), ("val", order[cut:])):
        folder = root / "images" / split
        for index in indices:
            grey = (np.clip(images[index], 0, 1) * 255).astype(np.uint8)
            image = Image.fromarray(grey).resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")
            target = folder if split == "unlabelled" else folder / classes[labels[index]]
            target.mkdir(parents=True, exist_ok=True)
            image.save(target / f"{index:04d}.png")
        shards[split] = root / "shards" / split
        write_shards(folder, shards[split], maxcount=512, force=True)
    return shards


def with_defaults(config_class, **given):
    """A config as the command line makes it when only ``given`` is typed: the rest is left to the defaults."""
    return resolve_config(config_class, given, set(given))


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def epoch_loss(run: Path, epoch: int) -> float:
    losses = [row["loss"] for row in rows(run) if "loss" in row and epoch - 1 < row["epoch"] <= epoch]
    return float(np.mean(losses))


def run_set(name: str, root: Path, args, seed: int) -> dict:
    """Pretraining, then fine-tuning from it and from scratch, on one split (``seed``) of one set."""
    started = time.time()
    shards = write_set(name, root, seed)
    # fp32: on a small shared CPU, bf16 autocast costs more than it saves for a model this small
    common = {"model": MODEL, "model_kwargs": MODEL_KWARGS, "img_size": SIZE, "workers": 1, "seed": seed,
              "log_every": 5, "precision": "fp32"}
    run = root / "pretrain"
    config = with_defaults(PretrainConfig, data=str(shards["unlabelled"]), output=str(run), force=True,
                           mask_patch_size=8, epochs=args.pretrain_epochs, **common)
    with contextlib.redirect_stdout(sys.stderr):  # the runs' lines: stdout keeps the JSON lines only
        pretrain(config)
    result = {"set": name, "seed": seed, "train_images": len(list((root / "images" / "labelled").rglob("*.png"))),
              "held_out_images": len(list((root / "images" / "val").rglob("*.png"))),
              "pretrain_epochs": args.pretrain_epochs, "pretrain_batch": config.batch_size,
              "pretrain_base_lr": config.base_lr,
              "masked_l1_first_epoch": round(epoch_loss(run, 1), 4),
              "masked_l1_last_epoch": round(epoch_loss(run, args.pretrain_epochs), 4)}
    result["masked_l1_drop"] = round(1 - result["masked_l1_last_epoch"] / result["masked_l1_first_epoch"], 3)
    checkpoint = str(latest_checkpoint(run))
    for start in ("simmim", "scratch"):
        output = root / f"finetune-{start}"
        config = with_defaults(FinetuneConfig, data=str(shards["labelled"]), val_data=str(shards["val"]),
                               output=str(output), force=True, epochs=args.finetune_epochs,
                               **({"pretrained": checkpoint} if start == "simmim" else {}), **common)
        with contextlib.redirect_stdout(sys.stderr):
            finetune(config)
        top1 = [row["val_top1"] for row in rows(output) if "val_top1" in row]
        result[f"{start}_top1"], result[f"{start}_best_top1"] = top1[-1], max(top1)
    result["finetune_defaults"] = {k: getattr(config, k) for k in (
        "batch_size", "base_lr", "warmup_epochs", "layer_decay", "mixup", "cutmix", "auto_augment", "min_crop_scale",
        "reprob")}
    result.update(finetune_epochs=args.finetune_epochs, seconds=round(time.time() - started))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="splits and initialisations")
    parser.add_argument("--workdir", help="keep data and runs here")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            runs = [run_set(name, Path(args.workdir or tmp) / f"{name}-{seed}", args, seed) for seed in args.seeds]
            line = {key: runs[0][key] for key in ("set", "train_images", "held_out_images", "pretrain_epochs",
                                                  "finetune_epochs", "pretrain_batch", "pretrain_base_lr",
                                                  "finetune_defaults")}
            for key in ("simmim_top1", "scratch_top1", "masked_l1_first_epoch", "masked_l1_last_epoch",
                        "masked_l1_drop"):
                line[key] = round(float(np.mean([run[key] for run in runs])), 3)
                line[f"{key}_per_seed"] = [run[key] for run in runs]
            line.update(gain=round(line["simmim_top1"] - line["scratch_top1"], 2), seeds=args.seeds,
                        seconds=sum(run["seconds"] for run in runs))
            lines.append(line)
            print(json.dumps(line), flush=True)
    print(json.dumps({"summary": {line["set"]: [line["simmim_top1"], line["scratch_top1"]] for line in lines},
                      "simmim_beats_scratch_everywhere": all(line["gain"] > 0 for line in lines)}), flush=True)


if __name__ == "__main__":
    main()
