"""Hugging Face transformers parity at full size: simmim against transformers on the same weights, images and masks.

Builds (random weights, nothing downloaded) the architecture of the Hub's SimMIM Swin-B
(microsoft/swin-base-simmim-window6-192: 192 px, window 6) and run_mim.py's default ViT-B/16 (224 px,
layer_norm_eps 1e-12), saves each with save_pretrained, reads it as `simmim visualize-recon`/`finetune` do, and
compares the reconstructions and losses on photos (scikit-learn's) masked by simmim's mask generator. Then the
other way: a simmim pretraining checkpoint of the Swin-B written with `export --hf` (which loads it back with
transformers and compares). Prints one JSON line per check:

    python benchmarks/hf_parity.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simmim_cli import checkpoints  # noqa: E402
from simmim_cli.commands.export import export  # noqa: E402
from simmim_cli.export import verification_images  # noqa: E402
from simmim_cli.masking import MaskGenerator  # noqa: E402
from simmim_cli.models import build_simmim  # noqa: E402
from simmim_cli.tool_configs import ExportConfig  # noqa: E402
from simmim_cli.weights import load_simmim  # noqa: E402

SWIN_B = dict(image_size=192, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
              window_size=6, encoder_stride=32)  # microsoft/swin-base-simmim-window6-192's config.json
VIT_B = dict(image_size=224, patch_size=16, encoder_stride=16)  # run_mim.py with a default ViTConfig


def read_check(kind: str, folder: Path) -> dict:
    import transformers

    torch.manual_seed(0)
    if kind == "swin":
        theirs = transformers.SwinForMaskedImageModeling(transformers.SwinConfig(**SWIN_B))
    else:
        theirs = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**VIT_B))
    theirs.eval().save_pretrained(str(folder))
    started = time.perf_counter()
    ours, weights, report = load_simmim(folder)
    read_s = time.perf_counter() - started
    size = theirs.config.image_size
    images = verification_images(size, count=4)
    mask = MaskGenerator(size, 32, theirs.config.patch_size, 0.6)(len(images), torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(pixel_values=images, bool_masked_pos=mask.flatten(1))
        loss, reconstruction = ours(images, mask)
    return {"check": f"read {weights.source}", "image_size": size,
            "parameters_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
            "max_abs_diff_reconstruction": float((reconstruction - expected.reconstruction).abs().max()),
            "reconstruction_abs_max": float(expected.reconstruction.abs().max()),
            "abs_diff_loss": abs(float(loss) - float(expected.loss)), "read_seconds": round(read_s, 2),
            "notes": report.adapted}


def export_check(folder: Path) -> dict:
    torch.manual_seed(0)
    model = build_simmim("swin_base_patch4_window7_224", 192, {"window_size": 6}, 0.0)
    path = folder / "checkpoint.pth"
    checkpoints.save_checkpoint({"kind": "pretrain", "model": model.state_dict(), "config": {
        "model": "swin_base_patch4_window7_224", "model_kwargs": {"window_size": 6}, "img_size": 192}}, path)
    started = time.perf_counter()
    report = export(ExportConfig(checkpoint=str(path), onnx=False, hf=str(folder / "hf")))
    return {"check": f"export --hf {report['hf']['architecture']}", "image_size": 192,
            "max_abs_diff_reconstruction": report["hf"]["max_abs_diff"],
            "export_seconds": round(time.perf_counter() - started, 2),
            "folder_mb": round(sum(p.stat().st_size for p in (folder / "hf").iterdir()) / 2**20, 1)}


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("swin", "vit"):
            print(json.dumps(read_check(kind, Path(tmp) / kind)), flush=True)
        print(json.dumps(export_check(Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
