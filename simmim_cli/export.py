"""ONNX export with verification, onnxruntime sessions (CUDA when there is one), and prediction.

Exported models take normalised float32 images ``(batch, 3, H, W)`` with a dynamic batch and a fixed image
size, and carry their preprocessing in the file's metadata (image size, mean, std, crop, class names).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__, checkpoints
from .config import ExportConfig, PredictConfig
from .data import MEAN, STD, CropTransform, collect_images, image_views, normalize
from .errors import SimmimError
from .models import set_fused_attention

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


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


def exportable(checkpoint: str, what: str | None) -> tuple[nn.Module, str, dict[str, Any]]:
    """(module in eval mode, what it computes, metadata) for a checkpoint."""
    from .models import FeatureExtractor
    from .tasks import load_classifier
    from .weights import load_simmim, read_weights

    kind = read_weights(checkpoint).kind
    classifier = kind in ("finetune", "linear-probe")
    what = what or ("classifier" if classifier else "features")
    if what == "classifier" and not classifier:
        raise SimmimError(f"{checkpoint} is not a classifier (finetune or linear-probe) checkpoint; export "
                          "--what features or --what reconstruction from it, or fine-tune it first")
    metadata: dict[str, Any] = {"what": what, "source_checkpoint": str(Path(checkpoint).resolve()),
                                "mean": MEAN.flatten().tolist(), "std": STD.flatten().tolist(),
                                "simmim_cli_version": __version__}
    if classifier and what != "reconstruction":
        model, config, classes = load_classifier(checkpoint)
        metadata.update(img_size=config.img_size, crop_pct=config.crop_pct, model=config.model,
                        class_names=classes if what == "classifier" else [])
        if what == "classifier":
            module = model
        else:  # a linear probe's features are the probed ones; a fine-tuned model's, its pre-logits
            module = model.extractor if hasattr(model, "extractor") else PreLogits(model)
    else:
        simmim, weights, _ = load_simmim(checkpoint)
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
                   batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing and checking: real images when given, else random ones."""
    if images is None:
        images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
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


def read_metadata(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    result = {}
    for entry in model.metadata_props:
        try:
            result[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            result[entry.key] = entry.value
    return result


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


def session(path: Path, provider: str = "cpu", optimize: bool = True):
    """An onnxruntime session on the provider asked for; ``auto`` takes CUDA when it loads, else the CPU with a
    note. Asking for ``cuda``/``tensorrt`` where they cannot run is an error, not a silent CPU run."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider in ("cuda", "tensorrt") and PROVIDERS[provider] not in available:
        raise SimmimError(f"--provider {provider}: onnxruntime has no {PROVIDERS[provider]} here (installed: "
                          f"{', '.join(available)}); install onnxruntime-gpu on a machine with a GPU")
    gpu = torch.cuda.is_available()  # onnxruntime-gpu lists CUDA even where no driver could run it
    if provider in ("cuda", "tensorrt") and not gpu:
        raise SimmimError(f"--provider {provider}: this machine has no usable GPU (no CUDA driver); "
                          "use --provider cpu or auto")
    wanted = {"auto": ["cuda", "cpu"] if gpu else ["cpu"], "cuda": ["cuda", "cpu"],
              "tensorrt": ["tensorrt", "cuda", "cpu"], "cpu": ["cpu"]}[provider]
    providers = [PROVIDERS[p] for p in wanted if PROVIDERS[p] in available]
    if any(p != "CPUExecutionProvider" for p in providers) and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # CUDA and cuDNN from torch's wheels
        except Exception:  # noqa: S110 - without them the CUDA provider simply does not load
            pass
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3  # a provider that cannot load is reported below, once
    created = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    active = created.get_providers()[0]
    if provider in ("cuda", "tensorrt") and active != PROVIDERS[provider]:
        raise SimmimError(f"--provider {provider}: {PROVIDERS[provider]} did not load (no usable GPU or CUDA "
                          "libraries); use --provider cpu or auto")
    return created, active


class OnnxClassifier(nn.Module):
    """An exported classifier behind PyTorch's module interface (normalised images in, logits out), so that
    ``predict`` and ``evaluate`` score an ``.onnx`` file exactly as they score a checkpoint."""

    def __init__(self, path: Path | str, provider: str = "auto"):
        super().__init__()
        if not Path(path).is_file():
            raise SimmimError(f"{path} not found; give an .onnx file written by simmim export")
        metadata = read_metadata(Path(path))
        if metadata.get("what", "classifier") != "classifier":
            raise SimmimError(f"{path} computes {metadata['what']}, not class scores; export --what classifier")
        self.session, self.provider = session(Path(path), provider)
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self.img_size = shape[-1] if isinstance(shape[-1], int) else metadata.get("img_size")
        self.classes: list[str] = metadata.get("class_names") or []
        self.crop_pct: float = metadata.get("crop_pct", 0.875)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {self.input_name: images.float().cpu().numpy()})[0]
        return torch.from_numpy(logits).float().to(images.device)


def verify(path: Path, module: nn.Module, inputs: tuple[torch.Tensor, ...], what: str) -> dict[str, float]:
    """Runs the ONNX file in onnxruntime (CPU) and PyTorch on the same inputs: the largest absolute difference,
    the smallest cosine similarity of an output, and for classifiers the top-1 agreement."""
    created, _ = session(path, "cpu")
    feeds = {arg.name: tensor.numpy() for arg, tensor in zip(created.get_inputs(), inputs, strict=True)}
    onnx_out = torch.from_numpy(created.run(None, feeds)[0]).float()
    with torch.no_grad():
        torch_out = module(*inputs).float()
    cosine = torch.nn.functional.cosine_similarity(onnx_out.flatten(1), torch_out.flatten(1), dim=1)
    result = {"max_abs_diff": float((onnx_out - torch_out).abs().max()), "min_cosine": float(cosine.min())}
    if what == "classifier":
        result["top1_agreement"] = float((onnx_out.argmax(1) == torch_out.argmax(1)).float().mean())
    return result


def verification_images(img_size: int, count: int = 4) -> torch.Tensor:
    """Real photographs for checking an export: crops of the sample photos scikit-learn ships, normalised."""
    from PIL import Image

    from .demo import photo_paths

    view = CropTransform(img_size, crop_pct=1.0)
    images = []
    for index in range(count):
        photo = Image.open(photo_paths()[index % 2]).convert("RGB")
        side = min(photo.size) // (1 + index // 2)
        images.append(view(photo.crop((0, 0, side, side)))["image"])
    return normalize(torch.stack(images))


def export(config: ExportConfig) -> dict[str, Any]:
    """``simmim export``: ONNX (fp32, fp16 or int8) and/or TorchScript files, verified against PyTorch."""
    from .tasks import newest_classifier

    if config.checkpoint is None:
        found = newest_classifier() or checkpoints.newest_run_checkpoint(Path("runs"), "pretrain")
        if found is None:
            raise SimmimError("no --checkpoint given and no finetune, linear-probe or pretrain run under runs/")
        config.checkpoint = str(found)
    module, what, metadata = exportable(config.checkpoint, config.what)
    output = Path(config.output or f"{what}.onnx")
    targets = ([output] if config.onnx else []) + ([output.with_suffix(".pt")] if config.torchscript else [])
    for target in targets:
        if target.exists() and not config.force:
            raise SimmimError(f"{target} exists; pass --force to replace it or choose another --output")
    images = verification_images(metadata["img_size"])
    inputs = example_inputs(module, what, metadata["img_size"], images)
    report: dict[str, Any] = {"checkpoint": config.checkpoint, "what": what, "files": [], "metadata": metadata}
    if config.onnx:
        tmp = output.with_name(f".{output.name}.tmp")
        report["exporter"] = to_onnx(module, example_inputs(module, what, metadata["img_size"]), what, tmp,
                                     config.opset, config.exporter)
        precision = "int8" if config.int8 else "fp16" if config.fp16 else "fp32"
        set_metadata(tmp, {**metadata, "opset": config.opset, "precision": precision})
        if precision == "fp16":
            to_fp16(tmp, tmp)
        elif precision == "int8":
            to_int8(tmp, tmp)
        if config.verify:
            checked = verify(tmp, module, inputs, what)
            report["verification"] = checked
            problem = None
            if precision == "fp32" and checked["max_abs_diff"] > config.tolerance:
                problem = (f"onnxruntime and PyTorch differ by {checked['max_abs_diff']:.2e} (above "
                           f"{config.tolerance:g}); try --exporter torchscript, or --tolerance if that is acceptable")
            elif precision != "fp32" and checked.get("top1_agreement", 1.0) < 1.0:
                problem = (f"the {precision} model's top-1 differs from PyTorch on "
                           f"{100 * (1 - checked['top1_agreement']):.0f}% of the check photos")
            elif precision != "fp32" and checked["min_cosine"] < 0.99:
                problem = (f"the {precision} model's outputs are too far from PyTorch's (cosine similarity "
                           f"{checked['min_cosine']:.3f} < 0.99)")
            if problem and precision != "fp32":
                problem += (f"; export without --{precision}, or with --no-verify and measure the accuracy on your "
                            "own data with simmim evaluate --checkpoint FILE.onnx")
            if problem:
                tmp.unlink()
                raise SimmimError(f"{problem}; nothing was written")
        tmp.replace(output)
        report["files"].append(output)
    if config.torchscript:
        target = output.with_suffix(".pt")
        tmp = target.with_name(f".{target.name}.tmp")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, inputs, check_trace=False)
        traced.save(str(tmp))
        tmp.replace(target)
        report["files"].append(target)
    return report


# ---------------------------------------------------------------------------------------------- predict


def _batches(entries: Iterator[tuple[str, bytes]], img_size: int, crop_pct: float, size: int, skipped: list[str],
             notes: list[str]):
    """Batches of (names, normalised images) for prediction."""
    names, tensors = [], []
    for name, tensor in image_views(entries, img_size, crop_pct, skipped, notes):
        names.append(name)
        tensors.append(tensor)
        if len(names) == size:
            yield names, normalize(torch.stack(tensors))
            names, tensors = [], []
    if names:
        yield names, normalize(torch.stack(tensors))


def predict(config: PredictConfig) -> dict[str, Any]:
    """``simmim predict``: top-k classes per image with an ONNX model (onnxruntime) or a checkpoint (PyTorch)."""
    path = Path(config.model)
    if not path.is_file():
        raise SimmimError(f"model {path} not found; give an .onnx file from simmim export or a best.pth")
    notes: list[str] = []
    if path.suffix == ".onnx":
        model = OnnxClassifier(path, config.provider)
        if config.provider == "auto" and model.provider == "CPUExecutionProvider":
            notes.append("note: running on the CPU (no usable CUDA provider for onnxruntime here)")
        size, classes, crop_pct = model.img_size, model.classes, model.crop_pct
        if config.img_size and config.img_size != size:
            raise SimmimError(f"{path} takes {size}×{size} images, not --img-size {config.img_size}; drop "
                              f"--img-size or export the model at {config.img_size}")

        def scores(batch: torch.Tensor) -> np.ndarray:
            return model(batch).numpy()
        runtime = f"onnxruntime ({model.provider})"
    else:
        from .distributed import pick_device
        from .tasks import load_classifier

        model, train_config, classes = load_classifier(path)
        device = pick_device({"auto": "auto", "cuda": "cuda", "cpu": "cpu"}.get(config.provider, "auto"))
        model.to(device)
        size, crop_pct = config.img_size or train_config.img_size, train_config.crop_pct

        def scores(batch: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return model(batch.to(device)).float().cpu().numpy()
        runtime = f"PyTorch ({device})"
    skipped: list[str] = []
    results = []
    started, counted = time.perf_counter(), 0
    for names, batch in _batches(collect_images(config.images, config.limit), size, crop_pct, config.batch_size,
                                 skipped, notes):
        logits = scores(batch).astype(np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        k = min(config.top_k, probs.shape[1])
        for name, row in zip(names, probs, strict=True):
            top = np.argsort(-row)[:k]
            entries = [{"label": classes[i] if i < len(classes) else str(i), "index": int(i),
                        "prob": round(float(row[i]), 6)} for i in top]
            results.append({"image": name, "top1": entries[0]["label"], "topk": entries})
        counted += len(names)
    if not results:
        raise SimmimError("none of the images could be read" + (f" ({skipped[0]})" if skipped else ""))
    seconds = time.perf_counter() - started
    return {"results": results, "skipped": skipped, "notes": notes, "runtime": runtime,
            "images_per_second": counted / max(seconds, 1e-9)}
