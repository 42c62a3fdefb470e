"""`simmim embed` against `simmim evaluate` on the same model, data, batch, loader processes and device: images per
second of each command, start to end (model loading, decoding, the forward passes, writing the Parquet file or
the report). Embedding should run at evaluate's forward throughput: the target ratio is 0.9 or more.

The model is a fine-tuned classifier checkpoint (random weights; evaluate needs a classifier) whose encoder embed
reads; the data are labelled shards of 256-pixel JPEGs made from scikit-learn's sample photos. The two commands
run in alternating rounds, so both see the same machine load; the best round of each counts.
Prints one JSON line:

    python benchmarks/embed_speed.py [--model vit_small] [--images 512] [--batch-size 64] [--workers 2]
                                     [--rounds 2] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simmim_cli.commands.embed import embed  # noqa: E402
from simmim_cli.commands.evaluate import evaluate  # noqa: E402
from simmim_cli.config import FinetuneConfig  # noqa: E402
from simmim_cli.models import make_classifier  # noqa: E402
from simmim_cli.shards import write_shards  # noqa: E402
from simmim_cli.tasks import save_model_file  # noqa: E402
from simmim_cli.tool_configs import EmbedConfig, EvaluateConfig  # noqa: E402

MODELS = {
    "vit_small": ("vit_small_patch16_224", {}, 224),
    "vit_base": ("vit_base_patch16_224", {}, 224),
    "tiny": ("vit_tiny_patch16_224", {"embed_dim": 64, "depth": 2, "num_heads": 2}, 64),
}
CLASSES = ["a", "b", "c", "d"]


def make_data(root: Path, count: int) -> Path:
    """``count`` 256-pixel JPEG crops of the sample photos in four class folders, as shards of 128."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(photo) for photo in load_sample_images().images]
    rng = np.random.default_rng(0)
    for index in range(count):
        photo = photos[index % len(photos)]
        left, top = int(rng.integers(0, photo.width - 256)), int(rng.integers(0, photo.height - 256))
        folder = root / "images" / CLASSES[index % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        photo.crop((left, top, left + 256, top + 256)).save(folder / f"{index:05d}.jpg", quality=90)
    write_shards(root / "images", root / "shards", maxcount=128)
    return root / "shards"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small", choices=sorted(MODELS))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    name, kwargs, size = MODELS[args.model]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shards = make_data(root, args.images)
        config = FinetuneConfig(data="x", model=name, model_kwargs=kwargs, img_size=size, drop_path=0.0)
        torch.manual_seed(0)
        checkpoint = root / "best.pth"
        save_model_file(checkpoint, "finetune", make_classifier(config, len(CLASSES), probe=False), config, CLASSES, {})
        common = {"batch_size": args.batch_size, "workers": args.workers, "device": args.device,
                  "precision": args.precision}

        def run_evaluate() -> int:
            return evaluate(EvaluateConfig(checkpoint=str(checkpoint), data=str(shards), output=str(root / "report"),
                                           force=True, **common))["count"]

        def run_embed() -> int:
            return embed(EmbedConfig(data=str(shards), output=str(root / "e.parquet"), pretrained=str(checkpoint),
                                     force=True, **common))["rows"]

        best = {"evaluate": float("inf"), "embed": float("inf")}
        for _ in range(args.rounds):
            for label, run in (("evaluate", run_evaluate), ("embed", run_embed)):
                started = time.perf_counter()
                count = run()
                best[label] = min(best[label], time.perf_counter() - started)
                assert count == args.images, (label, count)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    rates = {label: round(args.images / seconds, 1) for label, seconds in best.items()}
    print(json.dumps({"benchmark": "embed_speed", "model": name, "img_size": size, "images": args.images,
                      "batch_size": args.batch_size, "workers": args.workers, "device": device,
                      "evaluate_images_per_s": rates["evaluate"], "embed_images_per_s": rates["embed"],
                      "ratio": round(rates["embed"] / rates["evaluate"], 3)}))


if __name__ == "__main__":
    main()
