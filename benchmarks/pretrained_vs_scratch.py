"""Does SimMIM pretraining pay? Fine-tuning from a SimMIM checkpoint against training from scratch with the same
budget, and a linear probe of the pretrained encoder against one of a random encoder; and what exporting the
fine-tuned model to ONNX in fp32 and int8 (`simmim export --int8`) costs in accuracy.

Data: the 1,797 real 8×8 handwritten digits scikit-learn ships, upscaled to 32×32 grey images; 1,437 for
training and 360 held out. Pretraining sees all 1,437 training images without labels; fine-tuning and probing
see the labels of only ``--labelled`` of them (the usual situation: many images, few labels). Prints one JSON
line per comparison and a summary line:

    python benchmarks/pretrained_vs_scratch.py [--pretrain-epochs 40] [--finetune-epochs 60] [--labelled 300]

**Against a git ref** (the guard of learning quality: run it before and after every change to the data path, the
engine or the models): the same SimMIM pretraining (fp32 on both sides, the same shards and seed) is run with the
ref's code, checked out into a temporary worktree, and with the working tree's, alternately, for each seed; both
checkpoints are then scored by the working tree's code, so only the pretraining differs: weighted k-NN top-1 of the
held-out images against all 1,437 labelled training images, the fine-tuning margin over training from scratch on
``--labelled`` images, and a linear probe. Prints each seed's figures and, per measure, the paired differences
(tree − ref), their mean and a 95% confidence interval (Student's t):

    python benchmarks/pretrained_vs_scratch.py --against 775f5f8 --seeds 0 1 2 [--measures knn finetune probe]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simmim_cli.checkpoints import latest_checkpoint  # noqa: E402
from simmim_cli.commands.evaluate import evaluate  # noqa: E402
from simmim_cli.commands.export import export  # noqa: E402
from simmim_cli.commands.finetune import finetune  # noqa: E402
from simmim_cli.commands.knn import knn  # noqa: E402
from simmim_cli.commands.pretrain import pretrain  # noqa: E402
from simmim_cli.commands.probe import linear_probe  # noqa: E402
from simmim_cli.config import FinetuneConfig, LinearProbeConfig, PretrainConfig  # noqa: E402
from simmim_cli.shards import write_shards  # noqa: E402
from simmim_cli.tool_configs import EvaluateConfig, ExportConfig, KnnConfig  # noqa: E402

MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}
SIZE = 32


def digit_folders(root: Path, labelled: int, seed: int = 0) -> dict[str, Path]:
    """Image folders: all training images (unlabelled, and labelled as the k-NN memory bank), a labelled subset,
    and the held-out images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    train, val = order[:1437], order[1437:]
    subset = train[:labelled]
    folders = {name: root / name for name in ("unlabelled", "labelled", "val", "bank")}
    for name, indices in (("unlabelled", train), ("labelled", subset), ("val", val), ("bank", train)):
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


def digit_shards(root: Path, labelled: int, seed: int = 0) -> dict[str, Path]:
    """The digit folders as shards under ``root/shards`` (made once; reused when already there)."""
    shards = {name: root / "shards" / name for name in ("unlabelled", "labelled", "val", "bank")}
    if not all((path / "_info.json").is_file() for path in shards.values()):
        folders = digit_folders(root / "images", labelled, seed)
        for name, folder in folders.items():
            write_shards(folder, shards[name], maxcount=256, split="train", force=True)
    return shards


MODEL_ARGS = {"model": MODEL, "model_kwargs": MODEL_KWARGS, "img_size": SIZE}
PRETRAIN = {"mask_patch_size": 8, "warmup_epochs": 2, "batch_size": 64, "base_lr": 8e-3, "warmup_lr": 1e-4,
            "min_lr": 1e-4, "log_every": 50}


# ---------------------------------------------------------------------------------------------- against a ref


def worktree(ref: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="simmim-ref-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(folder), ref], check=True)
    return folder


def pretrain_in(tree: Path, data: Path, output: Path, epochs: int, seed: int) -> Path:
    """`simmim pretrain` with ``tree``'s code in a fresh process (only options every version since 775f5f8 has),
    in fp32; returns the last checkpoint."""
    options = {**MODEL_ARGS, **PRETRAIN, "data": data, "output": output, "epochs": epochs, "seed": seed,
               "workers": 1, "precision": "fp32", "model_kwargs": json.dumps(MODEL_KWARGS)}
    command = [sys.executable, "-m", "simmim_cli", "pretrain", "--force"]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    # -m puts the working folder first on the path: run in the tree whose code is measured
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode:
        raise SystemExit(f"pretraining with {tree} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return latest_checkpoint(output)


def score(checkpoint: Path | None, shards: dict[str, Path], root: Path, seed: int, measures: list[str],
          finetune_epochs: int, probe_epochs: int) -> dict[str, float]:
    """The working tree's measures of an encoder (``checkpoint`` None: a random one, and fine-tuning from scratch)."""
    encoder = str(checkpoint) if checkpoint else None
    name = checkpoint.parent.name if checkpoint else "random"
    common = {**MODEL_ARGS, "workers": 1, "seed": seed, "precision": "fp32"}
    result = {}
    if "knn" in measures:
        result["knn_top1"] = knn(KnnConfig(data=str(shards["bank"]), val_data=str(shards["val"]), pretrained=encoder,
                                           crop_pct=1.0, **common))["top1"]
    if "finetune" in measures:
        config = FinetuneConfig(output=str(root / f"finetune-{name}"), force=True, pretrained=encoder,
                                **finetune_settings(shards, finetune_epochs), **common)
        config.validate()
        finetune(config)
        result["finetune_top1"] = val_top1(root / f"finetune-{name}")
    if "probe" in measures:
        config = LinearProbeConfig(output=str(root / f"probe-{name}"), force=True, pretrained=encoder,
                                   **probe_settings(shards, probe_epochs), **common)
        config.validate()
        linear_probe(config)
        result["probe_top1"] = val_top1(root / f"probe-{name}")
    return result


def paired(differences: list[float]) -> dict[str, float]:
    """Mean of paired differences and its 95% confidence interval (Student's t; none for one pair)."""
    from scipy.stats import t

    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"mean": round(mean, 3)}
    half = t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / len(differences) ** 0.5
    return {"mean": round(mean, 3), "ci95": [round(mean - half, 3), round(mean + half, 3)]}


def against(args: argparse.Namespace) -> None:
    reference = worktree(args.against)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="simmim-learning-ab-"))
    try:
        shards = digit_shards(root, args.labelled)
        rows = []
        for index, seed in enumerate(args.seeds):
            sides = [("ref", reference), ("tree", ROOT)]
            if index % 2:  # alternate which side runs first
                sides.reverse()
            figures = {}
            for label, tree in sides:
                started = time.time()
                checkpoint = pretrain_in(tree, shards["unlabelled"], root / f"pretrain-{label}-{seed}",
                                         args.pretrain_epochs, seed)
                figures[label] = score(checkpoint, shards, root, seed, args.measures, args.finetune_epochs,
                                       args.probe_epochs)
                figures[label]["seconds"] = round(time.time() - started)
            if "finetune" in args.measures:  # the margin over fine-tuning from scratch, the same for both sides
                scratch = score(None, shards, root, seed, ["finetune"], args.finetune_epochs, args.probe_epochs)
                for label in ("ref", "tree"):
                    figures[label]["finetune_margin"] = round(
                        figures[label]["finetune_top1"] - scratch["finetune_top1"], 3)
            rows.append(figures)
            print(json.dumps({"seed": seed, **figures}), flush=True)
        keys = [key for key in rows[0]["tree"] if key != "seconds"]
        summary = {"against": args.against, "seeds": args.seeds, "pretrain_epochs": args.pretrain_epochs,
                   "precision": "fp32", "model": f"{MODEL} {MODEL_KWARGS}",
                   **{f"{key}_tree_minus_ref": paired([row["tree"][key] - row["ref"][key] for row in rows])
                      for key in keys}}
        print(json.dumps(summary), flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(reference)], check=False)


def finetune_settings(shards: dict[str, Path], epochs: int, lr: float = 4e-2) -> dict:
    """The same fine-tuning recipe and budget for every start; crops keep most of a digit, no flips."""
    return {"data": str(shards["labelled"]), "val_data": str(shards["val"]), "epochs": epochs, "warmup_epochs": 3,
            "batch_size": 32, "base_lr": lr, "warmup_lr": 1e-5, "min_lr": 1e-5, "layer_decay": 0.75,
            "drop_path": 0.1, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1, "auto_augment": None,
            "color_jitter": 0.0, "min_crop_scale": 0.5, "hflip": 0.0, "reprob": 0.0, "crop_pct": 1.0}


def probe_settings(shards: dict[str, Path], epochs: int) -> dict:
    return {"data": str(shards["labelled"]), "val_data": str(shards["val"]), "epochs": epochs, "warmup_epochs": 5,
            "batch_size": 64, "base_lr": 0.5, "optimizer": "sgd", "cache_features": True, "crop_pct": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=60)
    parser.add_argument("--probe-epochs", type=int, default=50)
    parser.add_argument("--labelled", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=4e-2, help="base lr (per 512) of both fine-tunings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep data and runs here (a pretraining found there is reused)")
    parser.add_argument("--against", metavar="REF", help="pretrain with this git ref's code and the working tree's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="with --against: paired seeds")
    parser.add_argument("--measures", nargs="+", default=["knn", "finetune", "probe"],
                        choices=["knn", "finetune", "probe"], help="with --against: what to score")
    args = parser.parse_args()
    if args.against:
        against(args)
        return
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        shards = digit_shards(root, args.labelled, args.seed)
        common = {**MODEL_ARGS, "workers": 1, "seed": args.seed}
        config = PretrainConfig(data=str(shards["unlabelled"]), output=str(root / "pretrain"),
                                epochs=args.pretrain_epochs, **PRETRAIN, **common)
        config.validate()
        if latest_checkpoint(root / "pretrain") is None:
            pretrain(config)
        checkpoint = str(latest_checkpoint(root / "pretrain"))

        results = {}
        for start in ("pretrained", "scratch"):
            config = FinetuneConfig(output=str(root / f"finetune-{start}"), force=True,
                                    pretrained=checkpoint if start == "pretrained" else None,
                                    **finetune_settings(shards, args.finetune_epochs, args.finetune_lr), **common)
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
        for start in ("pretrained", "random"):
            config = LinearProbeConfig(output=str(root / f"probe-{start}"), force=True,
                                       pretrained=checkpoint if start == "pretrained" else None,
                                       **probe_settings(shards, args.probe_epochs), **common)
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
