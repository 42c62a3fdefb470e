"""Our pretraining step against the authors' SimMIM code, side by side in one process, on the same batches.

The authors' models come from a checkout of https://github.com/microsoft/SimMIM that you pass (nothing of it
is kept in this repository): their ``models/simmim.py`` encoders (``SwinTransformerForSimMIM``,
``VisionTransformerForSimMIM``) and head, trained the way their ``main_simmim.py`` trains them: autocast in
the precision ``auto`` picks for the device (bf16 on recent GPUs and bf16 CPUs; fp16, with a gradient scaler as
their apex AMP, on older GPUs), ``torch.optim.AdamW``, gradient clipping at 5. Ours is the real engine
(``engine.Trainer`` with ``PretrainTask``) on the same synthetic uint8 batches and masks. The two
alternate, ``--rounds`` times (the order swaps every round), each the best of a few timed windows, so that a
shared machine's noise hits both alike. Prints one JSON line per model with the pairs, the ratios (ours ÷
theirs) and their median:

    git clone https://github.com/microsoft/SimMIM /tmp/SimMIM   # once, anywhere
    python benchmarks/against_official.py --official /tmp/SimMIM [--models swin_tiny beit_small] [--rounds 3]
    python benchmarks/against_official.py --official /tmp/SimMIM --device cuda --batch-size 128   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simmim_cli import distributed  # noqa: E402
from simmim_cli.config import PretrainConfig  # noqa: E402
from simmim_cli.engine import Trainer  # noqa: E402
from simmim_cli.errors import SimmimError  # noqa: E402
from simmim_cli.image_spec import IMAGENET_RGB  # noqa: E402
from simmim_cli.masking import MaskGenerator  # noqa: E402
from simmim_cli.models import build_simmim  # noqa: E402
from simmim_cli.precision import autocast, resolve_precision  # noqa: E402
from simmim_cli.preflight import synchronize  # noqa: E402
from simmim_cli.tasks import PretrainTask  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_step import MODELS, SyntheticBatches  # noqa: E402

# The same architectures in the authors' constructor arguments (their configs' values; no drop path, as ours)
OFFICIAL = {
    "swin_tiny": ("swin", dict(img_size=192, patch_size=4, in_chans=3, num_classes=0, embed_dim=96, depths=[2, 2, 6, 2],
                               num_heads=[3, 6, 12, 24], window_size=6, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                               drop_rate=0.0, drop_path_rate=0.0, ape=False, patch_norm=True,
                               use_checkpoint=False), 32),
    "beit_small": ("vit", dict(img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=384, depth=12,
                               num_heads=6, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, drop_path_rate=0.0,
                               norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=0.1, use_abs_pos_emb=False,
                               use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_mean_pooling=False), 16),
}


def official_model(folder: Path, key: str) -> nn.Module:
    sys.path.insert(0, str(folder))
    try:
        from models.simmim import SimMIM, SwinTransformerForSimMIM, VisionTransformerForSimMIM
    except ImportError as error:
        raise SystemExit(f"error: {folder} has no importable models/simmim.py ({error}); pass a checkout of "
                         "https://github.com/microsoft/SimMIM") from error
    kind, kwargs, stride = OFFICIAL[key]
    encoder = (SwinTransformerForSimMIM if kind == "swin" else VisionTransformerForSimMIM)(**kwargs)
    return SimMIM(encoder=encoder, encoder_stride=stride)


def time_official(folder: Path, key: str, batch: dict, precision: str, steps: int, windows: int,
                  device: torch.device) -> float:
    """img/s of the authors' step (forward, backward, clip 5, AdamW), the best of ``windows`` windows."""
    torch.manual_seed(0)
    model = official_model(folder, key).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    images, mask = IMAGENET_RGB.normalize(batch["image"].to(device)), batch["mask"].int().to(device)
    best = 0.0
    for window in range(windows + 1):  # the first is warmup
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            with autocast(precision, device):
                loss = model(images, mask)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if window:
            best = max(best, steps * len(images) / (time.perf_counter() - started))
    return best


def time_ours(key: str, dataset: SyntheticBatches, precision: str, steps: int, windows: int,
              device: torch.device) -> float:
    """img/s of our engine's step, the best of ``windows`` windows after a warmup window."""
    name, kwargs, size = MODELS[key]
    config = PretrainConfig(model=name, model_kwargs=kwargs, img_size=size, batch_size=dataset.batch_size,
                            epochs=1, warmup_epochs=0, workers=0, log_every=steps, precision=precision,
                            clip_grad=5.0, output=tempfile.mkdtemp(prefix="simmim-bench-"), data="synthetic",
                            device=device.type)
    torch.manual_seed(0)
    model = build_simmim(name, size, kwargs, 0.0)
    dataset.batches_per_epoch = (1 + windows) * steps
    with contextlib.redirect_stdout(sys.stderr):  # the engine's progress lines; stdout is for the JSON figures
        Trainer(PretrainTask(model, config), config, distributed.Context(device=device)).fit(dataset)
    rows = [json.loads(line) for line in (Path(config.output) / "metrics.jsonl").read_text().splitlines()]
    return max([r["img_per_s"] for r in rows if "img_per_s" in r][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of microsoft/SimMIM")
    parser.add_argument("--models", nargs="+", default=["swin_tiny", "beit_small"], choices=sorted(OFFICIAL))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=2, help="timed windows per measurement; the best counts")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of measurements, alternating")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where both steps run; auto: the GPU if torch sees one")
    args = parser.parse_args()
    try:
        device = distributed.pick_device(args.device)
    except SimmimError as error:
        raise SystemExit(f"error: {error}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(args.precision, device)
    for key in args.models:
        _, _, size = MODELS[key]
        masks = MaskGenerator(size, 32, OFFICIAL[key][1]["patch_size"], 0.6)
        dataset = SyntheticBatches(args.batch_size, size, masks, 1)
        # one untimed run of each first: the process's first steps pay one-off costs (kernel selection, the
        # allocator growing its heap) that would otherwise fall on whichever side runs first
        time_ours(key, dataset, precision, 1, 1, device)
        time_official(args.official, key, dataset.batch, precision, 1, 1, device)
        pairs = []
        for round_index in range(args.rounds):
            order = ["theirs", "ours"] if round_index % 2 else ["ours", "theirs"]
            figures = {}
            for name in order:
                figures[name] = (time_ours(key, dataset, precision, args.steps, args.windows, device)
                                 if name == "ours" else
                                 time_official(args.official, key, dataset.batch, precision, args.steps,
                                               args.windows, device))
            pairs.append((round(figures["ours"], 2), round(figures["theirs"], 2)))
            print(json.dumps({"model": key, "round": round_index + 1, "ours": pairs[-1][0], "theirs": pairs[-1][1]}),
                  file=sys.stderr, flush=True)
        ratios = [round(ours / theirs, 3) for ours, theirs in pairs]
        print(json.dumps({"model": key, "img_size": size, "batch_size": args.batch_size, "precision": precision,
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "ours_img_per_s": [p[0] for p in pairs], "theirs_img_per_s": [p[1] for p in pairs],
                          "ratios": ratios, "median_ratio": statistics.median(ratios),
                          "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                          "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
