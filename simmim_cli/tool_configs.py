"""Configurations of the commands that use a trained model rather than train one: ``evaluate``, ``knn``,
``visualize-recon``, ``export`` and ``predict`` (the CLI's ``cli/tools.py``), ``embed`` and ``search``
(``cli/embeddings.py``). The training commands' configs, the
recipes and the command-line overrides (``resolve_config``) are ``config.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import limits
from .config import DECODES, DEVICES, PRECISIONS, check_img_size_option, check_mask_patch_size
from .errors import SimmimError
from .remote import DEFAULT_CACHE_SIZE, DEFAULT_IO_RETRIES


@dataclass
class SampleLimits:
    """``--max-sample-mb`` and ``--max-image-pixels`` of the commands that read images (``limits.py``)."""

    max_sample_mb: float = limits.DEFAULT_MAX_MEMBER_BYTES / 2**20
    max_image_pixels: float = limits.DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class LocalProcesses:
    """Several processes on this machine with the images split between them (``--gpus N``/``--nproc N``): the
    fields distributed.py reads, for the commands that are not training runs."""

    gpus: int = 0
    nproc: int = 0
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    dist_timeout: float = 30.0


@dataclass
class KnnConfig(SampleLimits, LocalProcesses):
    """``simmim knn``: weighted k-NN classification on frozen features (DINO's protocol: cosine, k 20, T 0.07)."""

    data: str | None = None  # labelled shards: the memory bank
    val_data: str | None = None  # labelled shards: scored
    pretrained: str | None = None  # none: a randomly initialised encoder, the baseline
    allow_missing: bool = False
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    layer: int = -1
    pool: str = "mean"
    k: int = 20
    temperature: float = 0.07
    crop_pct: float = 0.875
    cache_features: bool = False
    cache_dir: str | None = None  # default runs/features
    batch_size: int = 64
    workers: int = field(default_factory=lambda: min(4, limits.usable_cores()))
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0  # the random encoder's weights
    json: bool = False
    bands: list[str] | None = None  # as the training commands' (config.py)
    mean: list[float] | None = None
    std: list[float] | None = None
    image_spec: dict[str, Any] | None = None
    epoch_size: int | None = None  # not used; what the shared checks of --data read
    io_retries: int = DEFAULT_IO_RETRIES
    shard_cache: str | None = None
    shard_cache_size: str = DEFAULT_CACHE_SIZE

    command = "knn"

    def validate(self) -> None:
        if self.data is None or self.val_data is None:
            raise SimmimError("give --data (labelled shards: the memory bank) and --val-data (labelled shards to "
                              "classify)")
        if self.model is None and self.pretrained is None:
            raise SimmimError("no encoder: give --pretrained CHECKPOINT, or --model NAME for a random one")
        if self.k < 1 or self.temperature <= 0:
            raise SimmimError(f"--k must be at least 1 and --temperature above 0, got {self.k} and {self.temperature}")
        if self.pool not in ("mean", "cls"):
            raise SimmimError(f"--pool must be mean or cls, got '{self.pool}'")
        if self.batch_size < 1 or self.workers < 0:
            raise SimmimError("--batch-size must be > 0 and --workers >= 0")
        limits.check_processes("--workers", self.workers)
        limits.check_processes("--nproc", self.nproc)
        limits.check_settings(self.max_sample_mb, self.max_image_pixels)
        check_img_size_option(self.img_size)
        for name, choices in (("precision", PRECISIONS), ("device", DEVICES)):
            if getattr(self, name) not in choices:
                raise SimmimError(f"--{name} must be one of {', '.join(choices)}, got '{getattr(self, name)}'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EmbedConfig(SampleLimits, LocalProcesses):
    """``simmim embed``: one embedding per image of --data, written as Parquet (``embeddings.py``)."""

    data: str | None = None  # shards or a folder of images, labelled or not
    output: str = "embeddings.parquet"
    pretrained: str | None = None  # what knn takes, or an .onnx file from export --what features
    allow_missing: bool = False
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    layer: int = -1
    pool: str = "mean"
    crop_pct: float | None = None  # knn's 0.875, or an ONNX file's own
    batch_size: int = 64
    workers: int = field(default_factory=lambda: min(4, limits.usable_cores()))
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0  # the random encoder's weights (without --pretrained)
    force: bool = False
    bands: list[str] | None = None  # as the training commands' (config.py)
    mean: list[float] | None = None
    std: list[float] | None = None
    image_spec: dict[str, Any] | None = None
    epoch_size: int | None = None  # not used; what the shared checks of --data read
    io_retries: int = DEFAULT_IO_RETRIES
    shard_cache: str | None = None
    shard_cache_size: str = DEFAULT_CACHE_SIZE

    command = "embed"

    @property
    def onnx(self) -> bool:
        return bool(self.pretrained) and str(self.pretrained).endswith(".onnx")

    def validate(self) -> None:
        if self.data is None:
            raise SimmimError("give --data: shards or a folder of images to embed")
        if self.model is None and self.pretrained is None:
            raise SimmimError("no encoder: give --pretrained CHECKPOINT, or --model NAME for a random one")
        if not self.output.endswith(".parquet"):
            raise SimmimError(f"--output {self.output}: embeddings are written as Parquet; give a .parquet file name")
        if self.pool not in ("mean", "cls"):
            raise SimmimError(f"--pool must be mean or cls, got '{self.pool}'")
        if self.batch_size < 1 or self.workers < 0:
            raise SimmimError("--batch-size must be > 0 and --workers >= 0")
        limits.check_processes("--workers", self.workers)
        limits.check_processes("--nproc", self.nproc)
        limits.check_settings(self.max_sample_mb, self.max_image_pixels)
        check_img_size_option(self.img_size)
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise SimmimError(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        for name, choices in (("precision", PRECISIONS), ("device", DEVICES)):
            if getattr(self, name) not in choices:
                raise SimmimError(f"--{name} must be one of {', '.join(choices)}, got '{getattr(self, name)}'")
        if self.onnx and (self.model or self.model_kwargs or self.img_size or self.layer != -1 or self.pool != "mean"):
            raise SimmimError("an .onnx model computes the features it was exported with; drop --model, "
                              "--model-kwargs, --img-size, --layer and --pool")
        if self.onnx and (procs := max(self.gpus, self.nproc)) > 1:
            raise SimmimError(f"an .onnx model is embedded in one process (onnxruntime uses the cores and GPU "
                              f"itself); drop --gpus/--nproc {procs}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SearchConfig:
    """``simmim search``: neighbours of queries, near-duplicates, outliers or a map of an embeddings file."""

    embeddings: str | None = None
    queries: list[str] = field(default_factory=list)  # keys of the file, or image files (embedded as the file was)
    k: int = 10
    sheet: str | None = None  # a contact sheet PNG of the queries and their neighbours
    duplicates: float | None = None  # cosine threshold: groups of images at least this similar
    outliers: int | None = None  # this many images farthest from their neighbours
    map: str | None = None  # a PNG: the embeddings in 2-D
    projection: str = "auto"  # auto (UMAP when installed, else PCA) | pca | umap
    color_by: str = "auto"  # auto (label when there are labels, else source) | label | source
    thumbnails: int = 40  # images drawn on the map
    backend: str = "auto"  # auto (FAISS when installed) | exact | faiss
    device: str = "auto"
    json: bool = False
    force: bool = False

    command = "search"

    def validate(self) -> None:
        if not self.embeddings:
            raise SimmimError("give an embeddings file: simmim search embeddings.parquet QUERY...")
        actions = [bool(self.queries), self.duplicates is not None, self.outliers is not None, self.map is not None]
        if sum(actions) != 1:
            raise SimmimError("search does one thing at a time: give query images or keys, or --duplicates "
                              "THRESHOLD, or --outliers N, or --map FILE.png")
        if self.k < 1:
            raise SimmimError(f"--k must be at least 1, got {self.k}")
        if self.duplicates is not None and not 0 < self.duplicates <= 1:
            raise SimmimError(f"--duplicates takes a cosine similarity in (0, 1], e.g. 0.95; got {self.duplicates}")
        if self.outliers is not None and self.outliers < 1:
            raise SimmimError(f"--outliers must be at least 1, got {self.outliers}")
        if self.sheet and not self.queries:
            raise SimmimError("--sheet draws the neighbours of queries; give query images or keys too")
        for name, value in (("sheet", self.sheet), ("map", self.map)):
            if value and not value.lower().endswith(".png"):
                raise SimmimError(f"--{name} {value}: give a .png file name")
        for name, choices in (("projection", ("auto", "pca", "umap")), ("color_by", ("auto", "label", "source")),
                              ("backend", ("auto", "exact", "faiss")), ("device", DEVICES)):
            if getattr(self, name) not in choices:
                raise SimmimError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                  f"got '{getattr(self, name)}'")
        if self.thumbnails < 0:
            raise SimmimError(f"--thumbnails must be >= 0, got {self.thumbnails}")


@dataclass
class EvaluateConfig(SampleLimits, LocalProcesses):
    """``simmim evaluate``: accuracy, per-class accuracy and a confusion matrix of a classifier checkpoint."""

    checkpoint: str | None = None
    data: str | None = None
    output: str | None = None
    batch_size: int = 64
    workers: int = field(default_factory=lambda: min(4, limits.usable_cores()))
    decode: str = "cpu"  # cpu | gpu (NVIDIA DALI)
    crop_pct: float | None = None  # the checkpoint's own unless given
    device: str = "auto"
    precision: str = "auto"
    force: bool = False
    io_retries: int = DEFAULT_IO_RETRIES
    shard_cache: str | None = None
    shard_cache_size: str = DEFAULT_CACHE_SIZE

    command = "evaluate"

    def validate(self) -> None:
        if self.data is None:
            raise SimmimError("give --data: labelled shards or a folder with one sub-folder per class")
        if self.batch_size < 1 or self.workers < 0:
            raise SimmimError("--batch-size must be > 0 and --workers >= 0")
        limits.check_processes("--workers", self.workers)
        limits.check_processes("--nproc", self.nproc)
        limits.check_settings(self.max_sample_mb, self.max_image_pixels)
        if self.precision not in PRECISIONS:
            raise SimmimError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.decode not in DECODES:
            raise SimmimError(f"--decode must be one of {', '.join(DECODES)}, got '{self.decode}'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VisualizeConfig(SampleLimits):
    """``simmim visualize-recon``: reconstruction panels for images."""

    images: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    output: str = "recon.png"
    force: bool = False
    mask_ratio: float | None = None  # the checkpoint's unless given
    mask_patch_size: int | None = None
    seed: int = 0
    mask: str | None = None  # a .npy 0/1 array on the mask-patch or model-patch grid
    save_arrays: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    limit: int = 16
    show_bands: str | None = None  # channels shown as RGB (or one in grey): indices or band names
    per_band: bool = False  # also one panel per channel
    device: str = "auto"

    command = "visualize-recon"

    def validate(self) -> None:
        if not self.images:
            raise SimmimError("give images: files, folders or shards, e.g. simmim visualize-recon photo.jpg")
        if self.limit < 1:
            raise SimmimError("--limit must be at least 1")
        if self.mask_ratio is not None and not 0 < self.mask_ratio < 1:
            raise SimmimError(f"--mask-ratio {self.mask_ratio} is outside (0, 1)")
        if self.save_arrays and not self.save_arrays.endswith(".npz"):
            raise SimmimError("--save-arrays takes a .npz file name")
        check_mask_patch_size(self.mask_patch_size)
        check_img_size_option(self.img_size)
        limits.check_settings(self.max_sample_mb, self.max_image_pixels)


@dataclass
class ExportConfig:
    """``simmim export``: ONNX (and TorchScript) files for deployment."""

    checkpoint: str | None = None
    onnx: bool = True
    what: str | None = None  # classifier | features | reconstruction; by the checkpoint's kind unless given
    output: str | None = None
    opset: int = 18
    exporter: str = "auto"  # auto | dynamo | torchscript
    fp16: bool = False
    int8: bool = False  # dynamic int8 quantization (CPU deployment)
    torchscript: bool = False
    verify: bool = True
    tolerance: float = 1e-4
    force: bool = False
    timm: str | None = None  # a folder in timm's hub layout (model.safetensors + config.json)
    hf: str | None = None  # a folder in transformers' layout (config.json + model.safetensors + preprocessor)
    push_to_hub: str | None = None  # a Hugging Face Hub repository for the --timm or --hf folder
    img_size: int | None = None  # the --timm folder's model at another input size; the checkpoint's unless given
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # likewise, e.g. {"window_size": 7}
    consolidate: str | None = None  # a sharded checkpoint folder written as one .pth file

    command = "export"

    def validate(self) -> None:
        if self.what not in (None, "classifier", "features", "reconstruction"):
            raise SimmimError(f"--what must be classifier, features or reconstruction, got '{self.what}'")
        if self.exporter not in ("auto", "dynamo", "torchscript"):
            raise SimmimError(f"--exporter must be auto, dynamo or torchscript, got '{self.exporter}'")
        if not self.onnx and not self.torchscript and not self.timm and not self.hf and not self.consolidate:
            raise SimmimError("nothing to export: give --onnx, --torchscript, --timm DIR, --hf DIR and/or "
                              "--consolidate FILE")
        if self.push_to_hub and not (self.timm or self.hf):
            raise SimmimError("--push-to-hub uploads the --timm or --hf folder; give one of them too")
        if self.push_to_hub and self.timm and self.hf:
            raise SimmimError("--push-to-hub uploads one folder: give --timm DIR or --hf DIR, not both")
        if self.timm and self.hf and Path(self.timm).resolve() == Path(self.hf).resolve():
            raise SimmimError("--timm and --hf need two folders (both write config.json and model.safetensors)")
        if self.fp16 and self.int8:
            raise SimmimError("choose one of --fp16 (GPUs) and --int8 (CPUs)")
        if self.opset < 17:
            raise SimmimError(f"--opset {self.opset} is too old for these models; use 17 or newer (default 18)")
        if self.img_size is not None and self.img_size < 1:
            raise SimmimError(f"--img-size must be a positive number of pixels, got {self.img_size}")


@dataclass
class PredictConfig(SampleLimits):
    """``simmim predict``: top-k classes of images from an ONNX model or a checkpoint."""

    model: str | None = None
    images: list[str] = field(default_factory=list)
    top_k: int = 5
    batch_size: int = 32
    workers: int = field(default_factory=lambda: min(4, limits.usable_cores()))  # loader processes: decode, crop
    provider: str = "auto"  # auto | cuda | tensorrt | cpu (ONNX); the torch device for checkpoints
    json: bool = False
    img_size: int | None = None
    limit: int | None = None
    io_retries: int = DEFAULT_IO_RETRIES

    command = "predict"

    def validate(self) -> None:
        if not self.model:
            raise SimmimError("give a model: simmim predict model.onnx IMAGE... (or a best.pth checkpoint)")
        if not self.images:
            raise SimmimError("give images: files, folders or shards after the model")
        if self.provider not in ("auto", "cuda", "tensorrt", "cpu"):
            raise SimmimError(f"--provider must be auto, cuda, tensorrt or cpu, got '{self.provider}'")
        if self.top_k < 1 or self.batch_size < 1:
            raise SimmimError("--top-k and --batch-size must be at least 1")
        if self.provider == "tensorrt" and self.model.endswith(".onnx"):
            from .inference import TENSORRT_BATCHES  # the engines' profile; inference.py pulls in the models

            if self.batch_size > TENSORRT_BATCHES[-1]:
                raise SimmimError(f"--batch-size {self.batch_size} is above the {TENSORRT_BATCHES[-1]} images "
                                  f"TensorRT engines are built for; use --batch-size {TENSORRT_BATCHES[-1]} or less, "
                                  "or --provider cuda")
        if self.workers < 0:
            raise SimmimError(f"--workers must be >= 0, got {self.workers}")
        limits.check_processes("--workers", self.workers)
        limits.check_settings(self.max_sample_mb, self.max_image_pixels)
        check_img_size_option(self.img_size)
