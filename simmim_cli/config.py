"""Run configurations: dataclass defaults, YAML recipes on top, explicit command-line options on top of those
(``resolve_config``, for every command). Here the training commands' configs; those of the commands that use a
trained model are in ``tool_configs.py``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from . import limits, mixture
from .errors import SimmimError
from .redact import redact_values
from .remote import DEFAULT_CACHE_SIZE, DEFAULT_IO_RETRIES
from .tracking import check_trackers

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "multistep")
DEVICES = ("auto", "cuda", "cpu")
DECODES = ("cpu", "gpu")  # --decode: loader processes (pipeline.py) or NVIDIA DALI on the GPU (dali.py)
MAX_IMG_SIZE = 4096  # pixels: a ViT/16 at 4096 px already attends over 65,536 tokens


def check_img_size_option(value: int | None, option: str = "--img-size") -> None:
    """An input size a model can be built for: positive, and not so large that its position tables and attention
    fill the memory (``--img-size 100000``)."""
    if value is not None and value > MAX_IMG_SIZE:
        raise SimmimError(f"{option} {value} is larger than any model input ({MAX_IMG_SIZE} px at most): position "
                          "tables and attention grow with its square; give the size the model works at, e.g. 224, "
                          "the shards' images are resized to it")


def check_mask_patch_size(value: int | None) -> None:
    if value is not None and value < 1:
        raise SimmimError(f"--mask-patch-size must be a positive number of pixels, a multiple of the model's patch "
                          f"size (the paper's 32), got {value}")


@dataclass
class TrainConfig:
    """What every training command shares. Defaults follow the official SimMIM code."""

    # data
    data: str | list | None = None  # one source, or several with their shares (mixture.py)
    epoch_size: int | None = None  # samples per epoch when the shards do not say
    io_retries: int = DEFAULT_IO_RETRIES  # tries after a failed read of a remote shard (remote.py)
    shard_cache: str | None = None  # local folder keeping remote shards
    shard_cache_size: str = DEFAULT_CACHE_SIZE
    workers: int | None = None  # loader processes per training process; None: sized to the node
    decode: str = "cpu"  # cpu | gpu (NVIDIA DALI)
    max_sample_mb: float = limits.DEFAULT_MAX_MEMBER_BYTES / 2**20  # a larger shard member is skipped, unread
    max_image_pixels: float = limits.DEFAULT_MAX_IMAGE_PIXELS  # a larger image is skipped before decoding
    bands: list[str] | None = None  # --bands: band indices (0-based) or names picked from multi-band images
    mean: list[float] | None = None  # per-channel normalisation in the data's units; None: the data's (image_spec.py)
    std: list[float] | None = None
    image_spec: dict[str, Any] | None = None  # what the model takes, resolved from the data (not an option)
    # model
    model: str = "vit_base_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    # optimisation
    epochs: int = 100
    batch_size: int = 128  # per process
    base_lr: float = 2e-4  # per 512 images: lr = base_lr × global batch / 512
    warmup_epochs: float = 10.0
    warmup_lr: float = 1e-6  # per 512 images, like base_lr
    min_lr: float = 1e-5  # per 512 images, like base_lr
    weight_decay: float = 0.05
    clip_grad: float = 5.0  # 0 turns clipping off
    grad_accum: int = 1
    global_batch: int | None = None  # images per optimizer step over all processes: sets grad_accum (and batch_size)
    schedule: str = "cosine"
    lr_milestones: list[int] = field(default_factory=list)  # epochs, for the multistep schedule
    precision: str = "auto"
    compile: bool = False
    # run
    seed: int = 0
    output: str | None = None
    resume: str | None = None  # "auto", or a checkpoint path
    force: bool = False
    log_every: int = 10  # steps
    save_every: int = 0  # steps; 0 saves at the end of every epoch only
    keep: int = 3  # checkpoints kept (the newest)
    max_steps: int = 0  # stop after this many optimizer steps (the schedule is unchanged); 0 = no limit
    device: str = "auto"
    log_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb, mlflow
    # distributed
    gpus: int = 0
    nproc: int = 0
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    dist_timeout: float = 30.0  # minutes a collective may wait before the job fails
    bf16_grad_reduce: bool = False  # all-reduce gradients in bf16: half the traffic, ~3 digits kept
    shard_model: bool = False  # FSDP2: weights, gradients and optimizer state split over the ranks (parallelize.py)
    # settings nobody gave (command line, recipe) that the command fits to the run and the data (defaults.py)
    auto: list[str] = field(default_factory=list)

    command = "train"
    data_defaults = ()  # what defaults.py may choose from the data when not given

    def validate(self) -> None:
        positive = ["workers", "epochs", "batch_size", "grad_accum", "log_every", "keep", "img_size", "nnodes",
                    "global_batch"]
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < (0 if name == "workers" else 1):
                raise SimmimError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'workers' else '> 0'}, "
                                  f"got {value}")
        limits.check_processes("--workers", self.workers)
        limits.check_processes("--nproc", self.nproc)
        limits.check_settings(self.max_sample_mb, self.max_image_pixels)
        check_img_size_option(self.img_size)
        for name, choices in (("precision", PRECISIONS), ("schedule", SCHEDULES), ("device", DEVICES),
                              ("decode", DECODES)):
            if getattr(self, name) not in choices:
                raise SimmimError(f"--{name} must be one of {', '.join(choices)}, got '{getattr(self, name)}'")
        for name in ("base_lr", "warmup_lr", "min_lr", "weight_decay", "clip_grad", "drop_path", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise SimmimError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs >= self.epochs:
            raise SimmimError(f"--warmup-epochs {self.warmup_epochs:g} must be below --epochs {self.epochs}; "
                              f"give a shorter warmup, e.g. --warmup-epochs {self.epochs / 10:g}")
        if self.schedule == "multistep" and not self.lr_milestones:
            raise SimmimError("the multistep schedule needs --lr-milestones (epochs, e.g. 700)")
        if self.gpus and self.nproc:
            raise SimmimError("give either --gpus N (one process per GPU) or --nproc N (e.g. CPU processes), not both")
        if self.gpus and self.device == "cpu":
            raise SimmimError("--gpus asks for GPUs but --device is cpu; use --nproc N --device cpu for CPU processes")
        if self.nnodes > 1 and not self.output:
            raise SimmimError("a multi-node run needs --output: one run folder on storage every node can reach")
        if not 0 <= self.node_rank < self.nnodes:
            raise SimmimError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes}")
        if not isinstance(self.model_kwargs, dict):
            raise SimmimError("--model-kwargs must be a JSON object, e.g. '{\"embed_dim\": 192, \"depth\": 6}'")
        check_trackers(self.log_to)

    def split_global_batch(self, processes: int) -> None:
        """``--global-batch N``: the per-process batch (when not given, the largest divisor of N / processes up to
        ``batch_size``) and the accumulation steps, so that batch × processes × accumulation = N on any cluster."""
        total = self.global_batch
        if not total or self.batch_size * processes * self.grad_accum == total:
            return
        if "grad_accum" not in self.auto:
            raise SimmimError(f"--global-batch {total} sets the accumulation steps itself; leave out --grad-accum "
                              f"{self.grad_accum}")
        if total % processes:
            raise SimmimError(f"--global-batch {total} cannot be split evenly over {processes} processes; give a "
                              f"multiple of {processes}")
        share = total // processes
        if "batch_size" in self.auto:
            self.batch_size = next(b for b in range(min(self.batch_size, share), 0, -1) if share % b == 0)
        elif share % self.batch_size:
            raise SimmimError(f"--global-batch {total} is not a multiple of --batch-size {self.batch_size} × "
                              f"{processes} processes; give a multiple of {self.batch_size * processes} or leave out "
                              "--batch-size")
        self.grad_accum = share // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """The config as stored (``config.yaml``, checkpoints, trackers): credentials in locations redacted."""
        return redact_values(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)  # "…" where a credential was


def check_param_groups(value: str) -> None:
    if value not in ("timm", "official"):
        raise SimmimError(f"--param-groups must be timm or official, got '{value}'")


@dataclass
class PretrainConfig(TrainConfig):
    """``simmim pretrain``: SimMIM masking on top of the shared training settings."""

    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    demo: bool = False
    val_data: str | None = None  # held-out images: masked L1 (val_loss) after every epoch
    knn_data: str | None = None  # labelled shards: the k-NN memory bank, scored at every checkpoint
    knn_val_data: str | None = None  # labelled shards: the k-NN queries (knn_top1, knn_top5)
    param_groups: str = "timm"  # timm | official: whose weight-decay rules (optim.py)
    keep_previews: int = 6  # reconstruction previews kept: the first, the newest, spread between; 0 keeps all

    command = "pretrain"
    data_defaults = ("batch_size", "base_lr", "mask_patch_size")

    def validate(self) -> None:
        super().validate()
        if self.data is None and not self.demo:
            raise SimmimError("no training data: pass --data SHARDS (made with simmim make-shards), "
                              "or --demo to try the built-in image set")
        if self.data is not None and self.demo:
            raise SimmimError("--demo brings its own images; drop --data or drop --demo")
        if self.demo and self.nnodes > 1:
            raise SimmimError("--demo runs on one machine; drop --nnodes")
        check_param_groups(self.param_groups)
        check_mask_patch_size(self.mask_patch_size)
        if self.keep_previews < 0 or self.keep_previews == 1:
            raise SimmimError(f"--keep-previews must be 0 (keep all) or at least 2 (the first and the newest), got "
                              f"{self.keep_previews}")
        if (self.knn_data is None) != (self.knn_val_data is None):
            raise SimmimError("the k-NN score needs both --knn-data (labelled memory bank) and --knn-val-data "
                              "(labelled queries)")


@dataclass
class FinetuneConfig(TrainConfig):
    """``simmim finetune``: the official SimMIM fine-tuning recipe as defaults."""

    model: str | None = None  # taken from --pretrained when not given
    img_size: int | None = None  # likewise; 224 from scratch
    pretrained: str | None = None
    allow_missing: bool = False
    val_data: str | None = None
    global_pool: str | None = None  # the model's own pooling unless given (avg, token)
    layer_decay: float | None = None  # None: 0.65 for ViT/BEiT, 0.9 for Swin
    param_groups: str = "timm"  # timm | official: whose layer ids and weight-decay rules (optim.py)
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    min_crop_scale: float = 0.08  # RandomResizedCrop keeps at least this fraction of the image's area
    hflip: float = 0.5  # horizontal flip probability (0 for text, digits, anything handed)
    reprob: float = 0.25  # random erasing probability
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct, center crop
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    epochs: int = 100
    warmup_epochs: float = 20.0
    base_lr: float = 1.25e-3
    warmup_lr: float = 2.5e-7
    min_lr: float = 2.5e-7

    command = "finetune"
    data_defaults = ("batch_size", "base_lr", "layer_decay", "mixup", "cutmix", "auto_augment", "min_crop_scale",
                     "reprob")

    def validate(self) -> None:
        super().validate()
        if self.data is None:
            raise SimmimError("no training data: pass --data SHARDS made by simmim make-shards from class folders")
        if self.model is None and self.pretrained is None:
            raise SimmimError("no model: give --pretrained CHECKPOINT (its model is used) or --model NAME")
        for name in ("mixup", "cutmix", "label_smoothing", "reprob", "color_jitter"):
            if getattr(self, name) < 0:
                raise SimmimError(f"--{name.replace('_', '-')} must be >= 0")
        if not 0 < self.min_crop_scale <= 1 or not 0 <= self.hflip <= 1:
            raise SimmimError("--min-crop-scale must be in (0, 1] and --hflip in [0, 1]")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise SimmimError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        check_param_groups(self.param_groups)
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise SimmimError("mixup/cutmix pair up images: use an even --batch-size, or --mixup 0 --cutmix 0")


@dataclass
class LinearProbeConfig(TrainConfig):
    """``simmim linear-probe``: a BatchNorm (no affine) and a linear layer on frozen features (MAE's protocol)."""

    model: str | None = None
    img_size: int | None = None
    pretrained: str | None = None  # none: a randomly initialised encoder, the baseline
    allow_missing: bool = False
    val_data: str | None = None
    layer: int = -1  # block (ViT/BEiT) or stage (Swin) whose output is probed; negative counts from the end
    pool: str = "mean"  # mean | cls
    optimizer: str = "lars"  # lars | sgd
    cache_features: bool = False  # extract features once (centre crops), then train on them: fast repeated probes
    cache_dir: str | None = None  # where cached features live; default <output>/features
    crop_pct: float = 0.875
    drop_path: float = 0.0
    epochs: int = 90
    warmup_epochs: float = 10.0
    batch_size: int = 256
    base_lr: float = 0.2  # per 512 images like every other command: MAE's 0.1 per 256
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    weight_decay: float = 0.0
    clip_grad: float = 0.0

    command = "linear-probe"

    def validate(self) -> None:
        super().validate()
        if self.data is None:
            raise SimmimError("no training data: pass --data SHARDS made by simmim make-shards from class folders")
        if self.model is None and self.pretrained is None:
            raise SimmimError("no encoder: give --pretrained CHECKPOINT, or --model NAME to probe a random one")
        if self.pool not in ("mean", "cls"):
            raise SimmimError(f"--pool must be mean or cls, got '{self.pool}'")
        if self.optimizer not in ("lars", "sgd"):
            raise SimmimError(f"--optimizer must be lars or sgd, got '{self.optimizer}'")
        if self.cache_features and mixture.is_mixture(self.data):
            raise SimmimError("--cache-features extracts the features of one --data source, not a mixture of "
                              "several; drop --cache-features to probe on the mixture")


C = TypeVar("C", bound=TrainConfig)


def field_names(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def from_dict(config_class: type[C], values: dict[str, Any], strict: bool = True, source: str = "config") -> C:
    """Builds a config; unknown keys are an error when ``strict`` (recipes), skipped otherwise (old checkpoints)."""
    known = field_names(config_class)
    unknown = sorted(set(values) - known)
    if unknown and strict:
        raise SimmimError(f"{source} has keys that `simmim {config_class.command}` does not know: "
                          f"{', '.join(unknown)}; see simmim {config_class.command} --help for the options")
    return config_class(**{k: v for k, v in values.items() if k in known})


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe: a mapping of option names (with underscores or dashes) to values."""
    path = Path(path)
    if not path.is_file():
        raise SimmimError(f"recipe {path} not found; the recipes/ folder of simmim-cli has examples")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SimmimError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(values, dict):
        raise SimmimError(f"recipe {path} must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _training_settings(from_recipe: dict[str, Any], recipe: str, explicit: set[str]) -> dict[str, Any]:
    """A recipe's values, less what must not come back from a run's own ``config.yaml`` used as a recipe: that run's
    folder and checkpoint (``output``, ``resume``: the recipe repeats the run in a new folder), a ``--demo`` run's
    shard folder (``data``), and ``force`` from any recipe (deleting a run's checkpoints takes a ``--force`` typed
    on the command line). A note names what was left out."""
    settings = dict(from_recipe)
    left_out = ["force"] if settings.pop("force", False) else []
    output = settings.get("output")
    if output and Path(output).resolve() == Path(recipe).resolve().parent:  # the record of the run in that folder
        left_out += [key for key in ("output", "resume") if settings.pop(key, None)]
    if settings.get("demo"):
        settings.pop("data", None)
    left_out = [key for key in left_out if key not in explicit]
    if left_out and os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"note: --recipe {recipe}: left out its {', '.join(left_out)} (a run's record, or force, which only the "
              f"command line gives); give {' '.join('--' + key for key in left_out)} to use them", file=sys.stderr)
    return settings


def parse_model_kwargs(text: str | dict | None) -> dict[str, Any]:
    """``--model-kwargs`` JSON text → dict."""
    if text is None or isinstance(text, dict):
        return dict(text or {})
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SimmimError(f"--model-kwargs is not valid JSON ({error.msg}); "
                          "write it like '{\"embed_dim\": 192, \"depth\": 6}'") from error
    if not isinstance(value, dict):
        raise SimmimError("--model-kwargs must be a JSON object, e.g. '{\"embed_dim\": 192, \"depth\": 6}'")
    return value


def resolve_config(config_class: type[C], cli_values: dict[str, Any], explicit: set[str]) -> C:
    """Dataclass defaults < ``--recipe`` file < options given on the command line; then validated.

    Options nobody gave are listed in ``config.auto``: the warmup is fitted to the run here, and without a recipe
    the command fits ``data_defaults`` to the data (defaults.py). A recipe keeps the paper's values."""
    values = {k: v for k, v in cli_values.items() if k in field_names(config_class)}
    values.pop("auto", None)
    recipe = cli_values.get("recipe")
    given = set(explicit)
    if recipe:
        from_recipe = load_recipe(recipe)
        from_dict(config_class, from_recipe, strict=True, source=f"recipe {recipe}")  # reject unknown keys
        from_recipe = _training_settings(from_recipe, recipe, explicit)
        values.update({k: v for k, v in from_recipe.items() if k not in explicit})
        given |= set(from_recipe)
    if "model_kwargs" in field_names(config_class):
        values["model_kwargs"] = parse_model_kwargs(values.get("model_kwargs"))
    config = from_dict(config_class, values)
    if issubclass(config_class, TrainConfig):
        config.data = mixture.normalize(config.data)  # several sources: their shares checked here, before any work
        default = config_class()
        given |= {k for k in values if getattr(config, k) != getattr(default, k)}  # e.g. the demo's settings
        fitted = ("warmup_epochs",) + (() if recipe else config_class.data_defaults)
        config.auto = [name for name in fitted if name not in given]
        if getattr(config, "global_batch", None):  # then the batch and the accumulation are chosen when not given
            config.auto += ["batch_size"] if "batch_size" not in given and "batch_size" not in config.auto else []
            config.auto += ["grad_accum"] if "grad_accum" not in explicit else []  # a recipe's gives way
        if "warmup_epochs" in config.auto:  # the paper's share of the run, never more than its length
            config.warmup_epochs = round(default.warmup_epochs * min(1.0, config.epochs / default.epochs), 2)
    config.validate()
    return config
