"""A classifier from a checkpoint (this toolkit's finetune/linear-probe runs) or an exported ONNX file: the one
way evaluate, predict and export get one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import FinetuneConfig, LinearProbeConfig, TrainConfig, from_dict
from .errors import SimmimError
from .image_spec import ImageSpec
from .models import check_img_size, make_classifier
from .weights import Weights, load_encoder, read_weights

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def load_classifier(
    path: str | Path, img_size: int | None = None, model_kwargs: dict[str, Any] | None = None
) -> tuple[nn.Module, TrainConfig, list[str]]:
    """A finetune or linear-probe checkpoint → (model in eval mode, its run config, class names).

    ``img_size``/``model_kwargs`` rebuild it at another input size or window (export --timm): position embeddings
    and relative position tables are resized as finetune resizes pretrained ones (``weights.load_encoder``), and
    the returned config says the new size."""
    weights = read_weights(path)
    config_class = {"finetune": FinetuneConfig, "linear-probe": LinearProbeConfig}.get(weights.kind or "")
    if config_class is None:
        raise SimmimError(f"{path} is a {weights.source} checkpoint, not a classifier; give the best.pth or "
                          "last.pth of a simmim finetune or linear-probe run")
    config = from_dict(config_class, weights.config or {}, strict=False)
    classes = weights.classes or [str(i) for i in range(_head_size(weights.encoder))]
    probe = weights.kind == "linear-probe"
    model = make_classifier(config, len(classes), probe=probe)
    try:
        model.load_state_dict(weights.encoder)
    except RuntimeError as error:
        raise SimmimError(f"{path} does not fit the model its config describes: "
                          f"{str(error).splitlines()[1].strip()}") from error
    if img_size is not None or model_kwargs:
        model, config = _resized(model, config, len(classes), probe, img_size, model_kwargs or {}, weights)
    return model.eval(), config, classes


def _resized(model: nn.Module, config: TrainConfig, num_classes: int, probe: bool, img_size: int | None,
             model_kwargs: dict[str, Any], weights: Weights) -> tuple[nn.Module, TrainConfig]:
    """The classifier built again at ``img_size`` with ``model_kwargs``, holding ``model``'s weights fitted to it."""
    config = copy.copy(config)
    config.img_size = img_size or config.img_size
    config.model_kwargs = {**config.model_kwargs, **model_kwargs}
    resized = make_classifier(config, num_classes, probe)
    source, target = (model.backbone, resized.backbone) if probe else (model, resized)
    load_encoder(target, Weights(encoder=source.state_dict(), source=weights.source, path=weights.path))
    if probe:
        resized.head.load_state_dict(model.head.state_dict())
    check_img_size(resized, config.img_size, config.model)
    return resized, config


def _head_size(state: dict[str, torch.Tensor]) -> int:
    heads = [v for k, v in state.items() if k.endswith("weight") and k.startswith(("head", "head.fc"))]
    return heads[-1].shape[0] if heads else 0


def newest_classifier(runs_root: Path = Path("runs")) -> Path | None:
    """best.pth (else last.pth) of the newest finetune or linear-probe run."""
    found = [p for pattern in ("finetune-*/best.pth", "finetune-*/last.pth", "linear-probe-*/best.pth",
                               "linear-probe-*/last.pth") for p in runs_root.glob(pattern)]
    if not found:
        return None
    newest_run = max({p.parent for p in found}, key=lambda run: max(q.stat().st_mtime for q in run.glob("*.pth")))
    return newest_run / "best.pth" if (newest_run / "best.pth").is_file() else newest_run / "last.pth"


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of an ONNX file (simmim export's class names, size, crop), checked to be a model at all."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and onnx's own: the bytes are no model
        raise not_a_model(path, error) from error
    if not model.graph.input or not model.graph.output:  # an empty file parses as an empty model
        raise not_a_model(path, None)
    result = {}
    for entry in model.metadata_props:
        try:
            result[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            result[entry.key] = entry.value
    return result


def not_a_model(path: Path | str, error: BaseException | None) -> SimmimError:
    """The one line for a file that is no ONNX model (garbage, empty, truncated)."""
    why = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}" if error and str(error).strip() else (
        type(error).__name__ if error else "it holds no graph")
    return SimmimError(f"{path} is not a readable ONNX model ({why}); give an .onnx file written by simmim export, "
                       "or export it again")


TENSORRT_BATCHES = (1, 32, 256)  # the dynamic batch's optimisation profile: smallest, most common, largest


def tensorrt_options(path: Path) -> dict[str, Any]:
    """onnxruntime's TensorRT provider options for an exported model: the engine (minutes to build) and its
    timing cache kept in ``MODEL.onnx.trt-cache/`` so that later sessions start at once, fp16 kernels allowed,
    and one optimisation profile over the dynamic batch (1, 32 and 256 images of the model's size)."""
    import onnx

    graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    name = graph_input.name
    channels, height, width = (d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:])
    shapes = {key: f"{name}:{batch}x{channels}x{height}x{width}"
              for key, batch in zip(("min", "opt", "max"), TENSORRT_BATCHES, strict=True)}
    cache = Path(f"{path}.trt-cache")
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache), "trt_fp16_enable": True,
            "trt_profile_min_shapes": shapes["min"], "trt_profile_opt_shapes": shapes["opt"],
            "trt_profile_max_shapes": shapes["max"]}


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
    if "TensorrtExecutionProvider" in providers:
        Path(f"{path}.trt-cache").mkdir(exist_ok=True)
        providers = [(p, tensorrt_options(path)) if p == "TensorrtExecutionProvider" else p for p in providers]
    try:
        created = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:
        if type(error).__name__ in ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoSuchFile"):
            raise not_a_model(path, error) from error  # a file onnx parsed that onnxruntime cannot run
        raise
    active = created.get_providers()[0]
    if provider in ("cuda", "tensorrt") and active != PROVIDERS[provider]:
        raise SimmimError(f"--provider {provider}: {PROVIDERS[provider]} did not load (no usable GPU or CUDA "
                          "libraries); use --provider cpu or auto")
    return created, active


# onnxruntime's input/output types → torch's and numpy's (simmim export writes float32 inputs and outputs, also
# with --fp16; a model converted to fp16 elsewhere may take and return float16)
ONNX_TYPES = {"tensor(float)": (torch.float32, np.float32), "tensor(float16)": (torch.float16, np.float16)}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class OnnxClassifier(nn.Module):
    """An exported classifier behind PyTorch's module interface (normalised images in, logits out), so that
    ``predict`` and ``evaluate`` score an ``.onnx`` file exactly as they score a checkpoint; with
    ``what="features"`` an exported feature extractor (features out), for ``embed``.

    Images and logits are bound to onnxruntime in place (IO binding): on the CUDA and TensorRT providers a CUDA
    tensor is read where it lies and the logits are written into a CUDA tensor, with no copy through the host;
    other tensors go through CPU memory."""

    def __init__(self, path: Path | str, provider: str = "auto", what: str = "classifier"):
        super().__init__()
        if not Path(path).is_file():
            raise SimmimError(f"{path} not found; give an .onnx file written by simmim export")
        metadata = read_metadata(Path(path))
        if metadata.get("what", "classifier") != what:  # embed reads --what features files the same way
            wanted = "class scores" if what == "classifier" else what
            raise SimmimError(f"{path} computes {metadata.get('what', 'classifier')}, not {wanted}; export "
                              f"--what {what}")
        self.metadata = metadata
        self.session, self.provider = session(Path(path), provider)
        graph_input, graph_output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        for value in (graph_input, graph_output):
            if value.type not in ONNX_TYPES:
                raise SimmimError(f"{path}: {value.name} is a {value.type}; simmim reads classifiers with float32 "
                                  "or float16 images and logits (export them with simmim export)")
        self.input_name, self.output_name = graph_input.name, graph_output.name
        self.input_type, self.output_type = ONNX_TYPES[graph_input.type], ONNX_TYPES[graph_output.type]
        shape = graph_input.shape
        self.img_size = shape[-1] if isinstance(shape[-1], int) else metadata.get("img_size")
        self.classes: list[str] = metadata.get("class_names") or []
        self.crop_pct: float = metadata.get("crop_pct", 0.875)
        self.spec = ImageSpec.from_dict(metadata.get("image"))  # files from before the record: RGB photos
        self.num_outputs = graph_output.shape[-1] if isinstance(graph_output.shape[-1], int) else len(self.classes)
        if not self.num_outputs:
            raise SimmimError(f"{path}: the number of classes is neither in its output shape nor in its metadata; "
                              "export it with simmim export")

    @property
    def on_gpu(self) -> bool:
        """Whether onnxruntime runs the model on a GPU, which then reads CUDA tensors in place."""
        return self.provider in GPU_PROVIDERS

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) → float32 logits (B, classes) on the images' device."""
        device = images.device if images.is_cuda and self.on_gpu else torch.device("cpu")
        logits = torch.empty(images.shape[0], self.num_outputs, dtype=self.output_type[0], device=device)
        if images.shape[0] == 0:  # nothing to bind
            return logits.float().to(images.device)
        inputs = images.to(device=device, dtype=self.input_type[0]).contiguous()
        place = {"device_type": device.type, "device_id": device.index or 0}  # a tensor's CUDA device has an index
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, element_type=self.input_type[1], shape=tuple(inputs.shape),
                           buffer_ptr=inputs.data_ptr(), **place)
        binding.bind_output(self.output_name, element_type=self.output_type[1], shape=tuple(logits.shape),
                            buffer_ptr=logits.data_ptr(), **place)
        if device.type == "cuda":  # onnxruntime reads the input on its own stream: torch's work must be done
            torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding)  # returns once the outputs are written (the stream is synced)
        return logits.float().to(images.device)
