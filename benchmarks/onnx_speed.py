"""Exported classifiers in onnxruntime (CPU provider, all graph optimisations) against PyTorch eager fp32,
in fp32 and as `simmim export --int8` writes them (dynamic int8 quantization).

The same weights and inputs in one process, timed in alternating blocks: ViT-S/16 and Swin-T at 224, batch 1
and 32. PyTorch runs timm's defaults (fused scaled-dot-product attention); the export uses explicit attention,
as `simmim export` does.
Prints one JSON line per model and batch size:

    python benchmarks/onnx_speed.py [--models vit_small swin_tiny] [--batches 1 32] [--rounds 3]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_step import matmul_peak_gflops  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from simmim_cli.export import to_int8, to_onnx  # noqa: E402
from simmim_cli.inference import session  # noqa: E402
from simmim_cli.models import create_backbone, set_fused_attention  # noqa: E402

MODELS = {
    "vit_small": ("vit_small_patch16_224", {}),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
}


def interleaved(run_a, run_b, rounds: int, repeats: int) -> tuple[float, float]:
    """Seconds per call of each, timed in alternating blocks (A B A B ...) so both see the same machine load;
    the best block of each counts."""
    run_a(), run_b()
    best_a = best_b = float("inf")
    for _ in range(rounds):
        for run, slot in ((run_a, 0), (run_b, 1)):
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            seconds = (time.perf_counter() - start) / repeats
            best_a, best_b = (min(best_a, seconds), best_b) if slot == 0 else (best_a, min(best_b, seconds))
    return best_a, best_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    peak = matmul_peak_gflops("fp32")  # the ceiling for fp32 inference on this machine
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            name, kwargs = MODELS[key]
            torch.manual_seed(0)
            model = create_backbone(name, 224, kwargs, 0.0, num_classes=1000, norm_all_tokens=False).eval()
            path = Path(tmp) / f"{key}.onnx"
            exported = create_backbone(name, 224, kwargs, 0.0, num_classes=1000, norm_all_tokens=False).eval()
            exported.load_state_dict(model.state_dict())
            set_fused_attention(exported, False)
            to_onnx(exported, (torch.randn(2, 3, 224, 224),), "classifier", path, 18, "auto")
            ort_session, _ = session(path, "cpu")
            to_int8(path, Path(tmp) / f"{key}-int8.onnx")  # what `simmim export --int8` writes
            int8_session, _ = session(Path(tmp) / f"{key}-int8.onnx", "cpu")
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(torch.randn(1, 3, 224, 224))
            gflop = counter.get_total_flops() / 1e9
            for batch in args.batches:
                images = torch.randn(batch, 3, 224, 224)
                feed = {"images": images.numpy()}
                with torch.no_grad():
                    difference = float(np.abs(ort_session.run(None, feed)[0] - model(images).numpy()).max())
                    torch_s, onnx_s = interleaved(lambda: model(images), lambda: ort_session.run(None, feed),  # noqa: B023
                                                  args.rounds, max(1, 16 // batch))
                    torch_again, int8_s = interleaved(lambda: model(images),  # noqa: B023
                                                      lambda: int8_session.run(None, feed),  # noqa: B023
                                                      args.rounds, max(1, 16 // batch))
                print(json.dumps({"model": key, "batch": batch,
                                  "pytorch_eager_fp32_img_per_s": round(batch / torch_s, 1),
                                  "onnxruntime_cpu_img_per_s": round(batch / onnx_s, 1),
                                  "speedup": round(torch_s / onnx_s, 2), "max_abs_diff": difference,
                                  "onnxruntime_int8_img_per_s": round(batch / int8_s, 1),
                                  "int8_speedup": round(torch_again / int8_s, 2),
                                  "forward_gflop_per_image": round(gflop, 2), "fp32_matmul_peak_gflops": round(peak),
                                  "pytorch_fraction_of_peak": round(batch / torch_s * gflop / peak, 2),
                                  "onnxruntime_fraction_of_peak": round(batch / onnx_s * gflop / peak, 2),
                                  "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
