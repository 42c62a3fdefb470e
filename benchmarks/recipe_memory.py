"""Per-GPU memory forecasts of pretraining recipes on N GPUs, replicated and sharded, with and without activation
checkpointing, without a GPU: ``simmim check``'s memory model (memory_plan.py) fed with activations counted on the
meta device at the recipe's batch per GPU in bf16 (the tensors autograd keeps for the backward pass). A forecast,
not a measurement: run ``simmim check --forecast-gpus N`` on the GPUs themselves for measured activations.

    python benchmarks/recipe_memory.py recipes/pretrain_vit_huge_224_800ep.yaml --gpus 8 64

One JSON line per recipe and GPU count.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from simmim_cli.config import PretrainConfig, from_dict, load_recipe
from simmim_cli.image_spec import IMAGENET_RGB
from simmim_cli.masking import MaskGenerator
from simmim_cli.memory_plan import block_parameters, forecast, saved_activation_bytes
from simmim_cli.models import build_simmim
from simmim_cli.parallelize import transformer_blocks

GIB = 2**30


def bf16_step(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """A SimMIM step of bf16 weights on bf16 inputs: what autocast computes in, near enough for a forecast."""
    return model(IMAGENET_RGB.normalize(batch["image"]).to(torch.bfloat16), batch["mask"])[0]


def recipe_forecast(recipe: str, gpus: int, per_node: int = 8) -> dict:
    config = from_dict(PretrainConfig, load_recipe(recipe), source=recipe)
    config.auto = ["grad_accum"]
    config.split_global_batch(gpus)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_simmim(config.model, config.img_size, config.model_kwargs, config.drop_path)
    parameters = sum(p.numel() for p in model.parameters())
    masks = MaskGenerator(config.img_size, config.mask_patch_size, model.patch_size, config.mask_ratio)
    batch = {"image": torch.zeros(config.batch_size, 3, config.img_size, config.img_size, dtype=torch.uint8),
             "mask": masks(config.batch_size, torch.Generator().manual_seed(0))}
    plain = saved_activation_bytes(model, batch, bf16_step, dtype=torch.bfloat16)
    # checkpointed: each block's input, plus one block's activations recomputed at a time
    checkpointed = (saved_activation_bytes(model, batch, bf16_step, True, torch.bfloat16)
                    + plain / len(transformer_blocks(model)))
    rows = forecast(parameters, plain, checkpointed, gpus, min(gpus, per_node), block_parameters(model),
                    accumulation=config.grad_accum)
    return {"recipe": recipe, "model": config.model, "parameters": parameters, "gpus": gpus,
            "batch_per_gpu": config.batch_size, "grad_accum": config.grad_accum,
            "per_gpu_gib": {f"{row['layout']}{' + checkpointing' if row['checkpointing'] else ''}":
                            round(row["bytes"] / GIB, 1) for row in rows},
            "activations_gib": round(plain / GIB, 2), "activations_checkpointed_gib": round(checkpointed / GIB, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    args = parser.parse_args()
    for recipe in args.recipes:
        for gpus in args.gpus:
            print(json.dumps(recipe_forecast(recipe, gpus)), flush=True)


if __name__ == "__main__":
    main()
