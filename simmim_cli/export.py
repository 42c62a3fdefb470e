"""ONNX files from checkpoints: what to export, the conversion (fp32, fp16, int8) and its verification.

Exported models take normalised float32 images ``(batch, channels, H, W)`` with a dynamic batch and a fixed image
size, and carry their preprocessing in the file's metadata (image size, channels, bands, mean, std, scale, crop,
class names: ``image`` is the run's ``image_spec.ImageSpec``).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, storage
from .errors import SimmimError
from .image_spec import IMAGENET_RGB, ImageSpec
from .inference import session
from .models import set_fused_attention
from .transforms import CropTransform

# ---------------------------------------------------------------------------------------------- what to export


class PreLogits(nn.Module):
    """A timm classifier's pooled features, the input of its last linear layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


class Reconstruction(nn.Module):
    """SimMIM's reconstruction: normalised images and a 0/1 token mask ``(B, H/p, W/p)`` → pixels."""

    def __init__(self, simmim: nn.Module):
        super().__init__()
        self.simmim = simmim

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.simmim(images, mask)[1]


def exportable(checkpoint: str, what: str | None, img_size: int | None = None,
               model_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, str, dict[str, Any]]:
    """(module in eval mode, what it computes, metadata) for a checkpoint; ``img_size``/``model_kwargs`` build
    it at another input size or window, resized as finetune resizes pretrained weights."""
    from .inference import load_classifier
    from .models import FeatureExtractor
    from .weights import load_simmim, read_weights

    found = read_weights(checkpoint)
    kind, spec = found.kind, ImageSpec.from_dict((found.config or {}).get("image_spec"))
    classifier = kind in ("finetune", "linear-probe")
    what = what or ("classifier" if classifier else "features")
    if what == "classifier" and not classifier:
        raise SimmimError(f"{checkpoint} is not a classifier (finetune or linear-probe) checkpoint; export "
                          "--what features or --what reconstruction from it, or fine-tune it first")
    metadata: dict[str, Any] = {"what": what, "source_checkpoint": str(Path(checkpoint).resolve()),
                                "mean": list(spec.mean), "std": list(spec.std), "channels": spec.channels,
                                "image": spec.to_dict(), "simmim_cli_version": __version__}
    if classifier and what != "reconstruction":
        model, config, classes = load_classifier(checkpoint, img_size, model_kwargs)
        metadata.update(img_size=config.img_size, crop_pct=config.crop_pct, model=config.model,
                        class_names=classes if what == "classifier" else [])
        if what == "classifier":
            module = model
        else:  # a linear probe's features are the probed ones; a fine-tuned model's, its pre-logits
            module = model.extractor if hasattr(model, "extractor") else PreLogits(model)
    else:
        simmim, weights, _ = load_simmim(checkpoint, model_kwargs=model_kwargs, img_size=img_size)
        img_size = simmim.encoder.backbone.patch_embed.img_size[0]
        metadata.update(img_size=img_size, crop_pct=1.0, model=(weights.config or {}).get("model", weights.source))
        if what == "reconstruction":
            if not weights.decoder:
                raise SimmimError(f"{checkpoint} has no decoder weights; --what reconstruction needs a pretraining "
                                  "checkpoint")
            metadata["patch_size"] = simmim.patch_size
            module = Reconstruction(simmim)
        else:
            module = FeatureExtractor(simmim.encoder.backbone, -1, "mean")
    set_fused_attention(module, False)  # explicit attention exports cleanly to every opset and runtime
    return module.eval(), what, metadata


def example_inputs(module: nn.Module, what: str, img_size: int, images: torch.Tensor | None = None,
                   batch: int = 2, channels: int = 3) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing and checking: real images when given, else random ones."""
    if images is None:
        images = torch.randn(batch, channels, img_size, img_size, generator=torch.Generator().manual_seed(0))
    if what != "reconstruction":
        return (images,)
    patch = module.simmim.patch_size
    grid = img_size // patch
    mask = (torch.rand(images.shape[0], grid, grid, generator=torch.Generator().manual_seed(1)) < 0.6).float()
    return images, mask


def names_for(what: str) -> tuple[list[str], list[str]]:
    inputs = ["images", "mask"] if what == "reconstruction" else ["images"]
    outputs = {"classifier": ["logits"], "features": ["features"], "reconstruction": ["reconstruction"]}[what]
    return inputs, outputs


# ---------------------------------------------------------------------------------------------- export


def to_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], what: str, path: Path, opset: int,
            exporter: str) -> str:
    """Writes ``path`` with a dynamic batch axis; returns the exporter that did it.

    ``auto`` tries PyTorch's dynamo exporter (the default since torch 2.9) and falls back to the TorchScript
    exporter with a note."""
    input_names, output_names = names_for(what)
    if exporter in ("auto", "dynamo"):
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(module, inputs, dynamo=True, opset_version=opset, verbose=False,
                                            input_names=input_names, output_names=output_names,
                                            dynamic_shapes={name: {0: batch} for name in _arg_names(module, inputs)})
            program.save(str(path))
            return "dynamo"
        except Exception as error:  # the dynamo exporter fails in many ways; the fallback is the point
            if storage.os_error_in(error):  # but a full disk is no exporter's fault
                raise
            if exporter == "dynamo":
                raise SimmimError(f"the dynamo ONNX exporter failed ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0][:200]}); try --exporter torchscript") from error
            print(f"note: the dynamo exporter failed ({type(error).__name__}); using the TorchScript exporter",
                  file=sys.stderr)
    axes = {name: {0: "batch"} for name in input_names + output_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=axes)
    return "torchscript"


def _arg_names(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[str]:
    import inspect

    return list(inspect.signature(module.forward).parameters)[: len(inputs)]


def set_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(path))


def to_fp16(source: Path, target: Path) -> None:
    """Half-precision weights and compute; inputs and outputs stay float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))


def to_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of the weights of matrix multiplications (activations quantized on the fly):
    for CPUs with int8 dot-product instructions. Inputs and outputs stay float32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    metadata = [(entry.key, entry.value) for entry in model.metadata_props]
    del model.graph.value_info[:]  # the dynamo exporter's shape annotations trip the quantizer's shape inference
    plain = source.with_name(source.name + ".plain")
    onnx.save(model, str(plain))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice about optional pre-processing on the root logger
    try:
        quantize_dynamic(str(plain), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
        plain.unlink(missing_ok=True)
    set_metadata(target, {key: json.loads(value) for key, value in metadata})


def verify(path: Path, module: nn.Module, inputs: tuple[torch.Tensor, ...], what: str,
           provider: str = "cpu") -> dict[str, float]:
    """Runs the ONNX file in onnxruntime (on ``provider``; ``auto`` takes CUDA where it runs) and PyTorch on the
    same inputs: the largest absolute difference, the smallest cosine similarity of an output, for classifiers
    the top-1 agreement, and the provider that ran it."""
    created, active = session(path, provider)
    feeds = {arg.name: tensor.numpy() for arg, tensor in zip(created.get_inputs(), inputs, strict=True)}
    onnx_out = torch.from_numpy(created.run(None, feeds)[0]).float()
    with torch.no_grad():
        torch_out = module(*inputs).float()
    cosine = torch.nn.functional.cosine_similarity(onnx_out.flatten(1), torch_out.flatten(1), dim=1)
    result = {"max_abs_diff": float((onnx_out - torch_out).abs().max()), "min_cosine": float(cosine.min()),
              "provider": active}
    if what == "classifier":
        result["top1_agreement"] = float((onnx_out.argmax(1) == torch_out.argmax(1)).float().mean())
    return result


def verification_images(img_size: int, count: int = 4, spec: ImageSpec = IMAGENET_RGB) -> torch.Tensor:
    """Real photographs for checking an export: crops of the sample photos scikit-learn ships, normalised. A model
    of other channels gets their bands in turn (a photo's structure in every channel: no noise), normalised as it
    sees its data: standard scores."""
    from PIL import Image

    from .demo import photo_paths

    view = CropTransform(img_size, crop_pct=1.0)
    images = []
    for index in range(count):
        photo = Image.open(photo_paths()[index % 2]).convert("RGB")
        side = min(photo.size) // (1 + index // 2)
        images.append(view(photo.crop((0, 0, side, side)))["image"])
    images = torch.stack(images)
    if spec.channels == 3 and spec.scale == 255.0:
        return spec.normalize(images)
    bands = images[:, [channel % 3 for channel in range(spec.channels)]].float()
    return (bands - bands.mean(dim=(2, 3), keepdim=True)) / bands.std(dim=(2, 3), keepdim=True)


