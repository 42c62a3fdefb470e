"""Data and training commands: ``make-shards``, ``pretrain``, ``finetune``, ``linear-probe``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from ..config import (
    FinetuneConfig,
    LinearProbeConfig,
    PretrainConfig,
)
from ..errors import SimmimError
from ..options import (
    DATA,
    FT,
    LP,
    MASKING,
    MODEL,
    OPTIM,
    RUN,
    AllowMissing,
    Bands,
    BaseLr,
    BatchSize,
    Bf16GradReduce,
    ClassifierImgSize,
    ClassifierModel,
    ClipGrad,
    Compile,
    CropPct,
    D,
    Data,
    Decode,
    Device,
    DistTimeout,
    DropPath,
    Epochs,
    EpochSize,
    Force,
    GlobalBatch,
    Gpus,
    GradAccum,
    GradCheckpointing,
    ImgSize,
    IoRetries,
    Keep,
    LabelledData,
    LogEvery,
    LogTo,
    LrMilestones,
    MasterAddr,
    MasterPort,
    MaxImagePixels,
    MaxSampleMb,
    MaxSteps,
    Mean,
    MinLr,
    Model,
    ModelKwargs,
    Nnodes,
    NodeRank,
    Nproc,
    Output,
    ParamGroups,
    Precision,
    Pretrained,
    Recipe,
    Resume,
    SaveEvery,
    Schedule,
    Seed,
    ShardCache,
    ShardCacheSize,
    ShardModel,
    Std,
    ValData,
    WarmupEpochs,
    WarmupLr,
    WeightDecay,
    Workers,
)
from ..redact import terminal
from .app import app, config_from_context, handle_errors


@app.command("make-shards", epilog="Example: simmim make-shards photos/ shards/ --max-size 100")
@handle_errors
def make_shards(
    source: Annotated[Path, typer.Argument(help="Folder of images; class sub-folders become integer labels.",
                                           show_default=False)],
    output: Annotated[str, typer.Argument(
        help="Folder for the shards and _info.json: a local folder, or s3://bucket/path/ or gs://bucket/path/ (each "
             "shard uploaded when complete, _info.json last).", show_default=False)],
    maxcount: Annotated[int, typer.Option(help="Most samples per shard.")] = 10000,
    max_size: Annotated[float, typer.Option(
        help="Most megabytes of images per shard. Training deals shards out to every loader process of every GPU "
             "(nodes × GPUs × --workers); write at least that many shards, better a few times more (for a small "
             "set, --maxcount is the easier knob: images ÷ loader processes).")] = 100.0,
    shuffle: Annotated[bool, typer.Option(help="Shuffle samples across shards (class folders are sorted).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle.")] = 0,
    split: Annotated[str, typer.Option(help="Split name: shard file prefix and key in _info.json.")] = "train",
    force: Annotated[bool, typer.Option("--force", help="Replace shards of the same split in OUTPUT.")] = False,
    workers: Annotated[int | None, typer.Option(
        help="Processes reading and checking the images \\[default: the cores]; the output is the same for any "
             "number.", show_default=False)] = None,
    stats_images: Annotated[int | None, typer.Option(
        help="Measure the per-channel mean and std of images that are not 8-bit photos (TIFF, DICOM, .npy, 16-bit "
             "PNG) over this many of them, drawn with --seed, instead of over all \\[default: all].",
        show_default=False)] = None,
    io_retries: IoRetries = D.io_retries,
    max_sample_mb: MaxSampleMb = D.max_sample_mb,
    max_image_pixels: MaxImagePixels = D.max_image_pixels,
) -> None:
    """Write WebDataset tar shards from a folder of images: the original bytes of JPEG, PNG, WebP, TIFF/GeoTIFF,
    DICOM and .npy files, other 8-bit pictures as lossless PNG; _info.json records the images' channels, type and,
    beyond 8-bit photos, their per-channel statistics."""
    import time

    from rich.console import Console
    from rich.progress import Progress

    from .. import limits, remote
    from ..shards import write_remote_shards, write_shards
    from ..summary import Summary, command

    started = time.perf_counter()
    if maxcount < 1 or max_size <= 0:
        raise SimmimError("--maxcount must be at least 1 and --max-size above 0")
    limits.check_processes("--workers", workers, minimum=1)
    if stats_images is not None and stats_images < 1:
        raise SimmimError(f"--stats-images must be at least 1, got {stats_images}")
    remote.configure(io_retries)
    limits.check_settings(max_sample_mb, max_image_pixels)
    limits.configure(int(max_sample_mb * 2**20), int(max_image_pixels))
    write = (functools.partial(write_remote_shards, url=output) if remote.is_url(output)
             else functools.partial(write_shards, output=Path(output)))
    console = Console(stderr=True)
    with Progress(console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("writing shards", total=None)
        info = write(
            source, maxcount=maxcount, max_size_mb=max_size, shuffle=shuffle, seed=seed, split=split,
            force=force, workers=workers or limits.usable_cores(), stats_images=stats_images,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            on_skip=lambda path, reason: console.print(terminal(f"warning: skipped unreadable {path}: {reason}"),
                                                       markup=False, highlight=False),
        )
    entry = info["splits"][split]
    classes = f", {info['num_classes']} classes" if "classes" in info else " (unlabelled)"
    skipped = f"; skipped {len(info['skipped'])} unreadable file(s)" if info["skipped"] else ""
    images = info.get("images") or {}
    if images.get("mean"):  # what the training commands normalise with (image_spec.py)
        names = f" ({', '.join(images['band_names'])})" if images.get("band_names") else ""
        mean, std = (", ".join(f"{v:.6g}" for v in images[key]) for key in ("mean", "std"))
        typer.echo(f"images: {images['channels']} channel(s) of {images['dtype']}{names}; per-channel mean {mean}, "
                   f"std {std} over {images['statistics']['images']} image(s)")
    next_steps = [command("simmim", "pretrain", "--data", output)] + (  # labels or not, images to pretrain on
        [command("simmim", "finetune", "--pretrained", "CHECKPOINT", "--data", output, "--val-data", "VAL")]
        if "classes" in info else [])
    typer.echo(Summary("make-shards", time.perf_counter() - started,
                       f"wrote {entry['num_samples']} samples in {len(entry['filenames'])} shard(s) to {output}"
                       f"{classes}{skipped}", next=next_steps).text())


PRETRAIN_EPILOG = (
    "Examples:\n\n"
    "  simmim pretrain --demo                                   # built-in images, a few CPU minutes\n\n"
    "  simmim pretrain --data shards/ --gpus 8                  # one 8-GPU machine\n\n"
    "  simmim pretrain --data shards/ --gpus 8 --shard-model --model vit_huge_patch14_224   # too big for DDP\n\n"
    "  simmim pretrain --recipe recipes/pretrain_swin_base_192_w6_100ep.yaml --data shards/ --gpus 8\n\n"
    "  simmim pretrain --data shards/ --resume auto --output runs/my-run"
)


@app.command(epilog=PRETRAIN_EPILOG)
@handle_errors
def pretrain(
    ctx: typer.Context,
    data: Data = None,
    demo: Annotated[bool, typer.Option(
        "--demo", help="Pretrain a small ViT on a built-in image set (crops of the photos scikit-learn ships).",
        rich_help_panel=DATA)] = False,
    epoch_size: EpochSize = None,
    io_retries: IoRetries = D.io_retries,
    shard_cache: ShardCache = None,
    shard_cache_size: ShardCacheSize = D.shard_cache_size,
    val_data: Annotated[str | None, typer.Option(
        help="Held-out shards (labels not needed): their masked L1 is logged as val_loss after every epoch "
             "(centre crops, the same masks each time), the loss to watch for overfitting.", rich_help_panel=DATA,
        show_default=False)] = None,
    knn_data: Annotated[str | None, typer.Option(
        help="Labelled shards: the k-NN memory bank. With --knn-val-data, each checkpoint logs knn_top1 and "
             "knn_top5 (weighted k-NN on the last block's mean-pooled features, k 20, T 0.07; see simmim knn), "
             "a quick 'is pretraining working?' signal. Keep both small: they are scored on one process.",
        rich_help_panel=DATA, show_default=False)] = None,
    knn_val_data: Annotated[str | None, typer.Option(
        help="Labelled shards classified by k-NN against --knn-data at each checkpoint.", rich_help_panel=DATA,
        show_default=False)] = None,
    workers: Workers = D.workers,
    decode: Decode = D.decode,
    max_sample_mb: MaxSampleMb = D.max_sample_mb,
    max_image_pixels: MaxImagePixels = D.max_image_pixels,
    bands: Bands = None,
    mean: Mean = None,
    std: Std = None,
    model: Model = D.model,
    model_kwargs: ModelKwargs = None,
    img_size: ImgSize = D.img_size,
    drop_path: DropPath = D.drop_path,
    grad_checkpointing: GradCheckpointing = D.grad_checkpointing,
    mask_patch_size: Annotated[int, typer.Option(
        help="Side of the square masked cells in pixels; a multiple of the model's patch size.",
        rich_help_panel=MASKING)] = D.mask_patch_size,
    mask_ratio: Annotated[float, typer.Option(
        help="Fraction of cells masked (rounded up).", rich_help_panel=MASKING)] = D.mask_ratio,
    epochs: Epochs = D.epochs,
    batch_size: BatchSize = D.batch_size,
    base_lr: BaseLr = D.base_lr,
    warmup_epochs: WarmupEpochs = D.warmup_epochs,
    warmup_lr: WarmupLr = D.warmup_lr,
    min_lr: MinLr = D.min_lr,
    weight_decay: WeightDecay = D.weight_decay,
    param_groups: ParamGroups = D.param_groups,
    clip_grad: ClipGrad = D.clip_grad,
    grad_accum: GradAccum = D.grad_accum,
    global_batch: GlobalBatch = None,
    schedule: Schedule = D.schedule,
    lr_milestones: LrMilestones = None,
    precision: Precision = D.precision,
    compile: Compile = D.compile,
    recipe: Recipe = None,
    seed: Seed = D.seed,
    output: Output = None,
    resume: Resume = None,
    force: Force = D.force,
    log_every: LogEvery = D.log_every,
    log_to: LogTo = None,
    save_every: SaveEvery = D.save_every,
    keep: Keep = D.keep,
    keep_previews: Annotated[int, typer.Option(
        help="Reconstruction previews (preview-<step>.png) kept: the first, the newest and evenly spread ones "
             "between; 0 keeps every one.", rich_help_panel=RUN)] = D.keep_previews,
    max_steps: MaxSteps = D.max_steps,
    device: Device = D.device,
    gpus: Gpus = D.gpus,
    nproc: Nproc = D.nproc,
    nnodes: Nnodes = D.nnodes,
    node_rank: NodeRank = D.node_rank,
    master_addr: MasterAddr = D.master_addr,
    master_port: MasterPort = D.master_port,
    dist_timeout: DistTimeout = D.dist_timeout,
    bf16_grad_reduce: Bf16GradReduce = D.bf16_grad_reduce,
    shard_model: ShardModel = D.shard_model,
) -> None:
    """Pretrain an encoder with SimMIM on WebDataset shards; writes checkpoints and reconstruction previews."""
    from ..commands.pretrain import pretrain as run

    run(config_from_context(PretrainConfig, ctx))


FINETUNE_EPILOG = (
    "Examples:\n\n"
    "  simmim finetune --pretrained runs/pretrain-X/checkpoint-00012345.pth --data train/ --val-data val/ --gpus 8\n\n"
    "  simmim finetune --recipe recipes/finetune_vit_base_224_100ep.yaml --pretrained simmim_vit_base.pth "
    "--data train/ --val-data val/"
)


@app.command(epilog=FINETUNE_EPILOG)
@handle_errors
def finetune(
    ctx: typer.Context,
    data: LabelledData = None,
    val_data: ValData = None,
    epoch_size: EpochSize = None,
    io_retries: IoRetries = D.io_retries,
    shard_cache: ShardCache = None,
    shard_cache_size: ShardCacheSize = D.shard_cache_size,
    workers: Workers = FT.workers,
    decode: Decode = FT.decode,
    max_sample_mb: MaxSampleMb = FT.max_sample_mb,
    max_image_pixels: MaxImagePixels = FT.max_image_pixels,
    bands: Bands = None,
    mean: Mean = None,
    std: Std = None,
    auto_augment: Annotated[str | None, typer.Option(
        help="timm RandAugment policy; 'none' turns it off.", rich_help_panel=DATA)] = FT.auto_augment,
    color_jitter: Annotated[float, typer.Option(help="Colour jitter (used when RandAugment is off).",
                                                rich_help_panel=DATA)] = FT.color_jitter,
    min_crop_scale: Annotated[float, typer.Option(
        help="RandomResizedCrop keeps at least this fraction of the image area (raise it for small images).",
        rich_help_panel=DATA)] = FT.min_crop_scale,
    hflip: Annotated[float, typer.Option(help="Horizontal flip probability (0 for text, digits, anything handed).",
                                         rich_help_panel=DATA)] = FT.hflip,
    reprob: Annotated[float, typer.Option(help="Random erasing probability.", rich_help_panel=DATA)] = FT.reprob,
    mixup: Annotated[float, typer.Option(help="Mixup alpha (0 = off).", rich_help_panel=DATA)] = FT.mixup,
    cutmix: Annotated[float, typer.Option(help="CutMix alpha (0 = off).", rich_help_panel=DATA)] = FT.cutmix,
    crop_pct: CropPct = FT.crop_pct,
    pretrained: Pretrained = None,
    allow_missing: AllowMissing = False,
    model: ClassifierModel = None,
    model_kwargs: ModelKwargs = None,
    img_size: ClassifierImgSize = None,
    drop_path: DropPath = FT.drop_path,
    global_pool: Annotated[str | None, typer.Option(
        help="Pooling of the classifier: avg | token \\[default: the model's own].", rich_help_panel=MODEL,
        show_default=False)] = None,
    grad_checkpointing: GradCheckpointing = FT.grad_checkpointing,
    model_ema: Annotated[bool, typer.Option(help="Keep an exponential moving average of the weights; it is the "
                                            "one evaluated and saved.", rich_help_panel=MODEL)] = FT.model_ema,
    model_ema_decay: Annotated[float, typer.Option(help="EMA decay per step.",
                                                   rich_help_panel=MODEL)] = FT.model_ema_decay,
    epochs: Epochs = FT.epochs,
    batch_size: BatchSize = FT.batch_size,
    base_lr: BaseLr = FT.base_lr,
    layer_decay: Annotated[float | None, typer.Option(
        help="Layer-wise lr decay \\[default: 0.65 for ViT/BEiT, 0.9 for Swin as the official recipes; higher for "
             "short runs, see the summary printed at start].",
        rich_help_panel=OPTIM, show_default=False)] = None,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.",
                                                   rich_help_panel=OPTIM)] = FT.label_smoothing,
    warmup_epochs: WarmupEpochs = FT.warmup_epochs,
    warmup_lr: WarmupLr = FT.warmup_lr,
    min_lr: MinLr = FT.min_lr,
    weight_decay: WeightDecay = FT.weight_decay,
    param_groups: ParamGroups = FT.param_groups,
    clip_grad: ClipGrad = FT.clip_grad,
    grad_accum: GradAccum = FT.grad_accum,
    global_batch: GlobalBatch = None,
    schedule: Schedule = FT.schedule,
    lr_milestones: LrMilestones = None,
    precision: Precision = FT.precision,
    compile: Compile = FT.compile,
    recipe: Recipe = None,
    seed: Seed = FT.seed,
    output: Output = None,
    resume: Resume = None,
    force: Force = False,
    log_every: LogEvery = FT.log_every,
    log_to: LogTo = None,
    save_every: SaveEvery = FT.save_every,
    keep: Keep = FT.keep,
    max_steps: MaxSteps = FT.max_steps,
    device: Device = FT.device,
    gpus: Gpus = FT.gpus,
    nproc: Nproc = FT.nproc,
    nnodes: Nnodes = FT.nnodes,
    node_rank: NodeRank = FT.node_rank,
    master_addr: MasterAddr = FT.master_addr,
    master_port: MasterPort = FT.master_port,
    dist_timeout: DistTimeout = FT.dist_timeout,
    bf16_grad_reduce: Bf16GradReduce = FT.bf16_grad_reduce,
    shard_model: ShardModel = FT.shard_model,
) -> None:
    """Fine-tune a pretrained encoder on labelled shards; evaluates every epoch, keeps best.pth and last.pth.

    The defaults shown are the paper's (ImageNet). Without --recipe, the lr, batch, layer decay and augmentation
    not given are fitted to the data set and the run's length (a summary is printed at start)."""
    from ..commands.finetune import finetune as run

    run(finetune_config(ctx))


def finetune_config(ctx: typer.Context) -> FinetuneConfig:
    """finetune's options → its config (also for ``simmim check finetune``)."""
    config = config_from_context(FinetuneConfig, ctx)
    if config.auto_augment in ("", "none"):
        config.auto_augment = None
    return config


PROBE_EPILOG = (
    "Examples:\n\n"
    "  simmim linear-probe --pretrained runs/pretrain-X/checkpoint-00012345.pth --data train/ --val-data val/\n\n"
    "  simmim linear-probe --model vit_base_patch16_224 --data train/ --val-data val/   # random-init baseline\n\n"
    "  simmim linear-probe --pretrained ckpt.pth --data train/ --val-data val/ --cache-features --layer 8"
)


@app.command("linear-probe", epilog=PROBE_EPILOG)
@handle_errors
def linear_probe(
    ctx: typer.Context,
    data: LabelledData = None,
    val_data: ValData = None,
    epoch_size: EpochSize = None,
    io_retries: IoRetries = D.io_retries,
    shard_cache: ShardCache = None,
    shard_cache_size: ShardCacheSize = D.shard_cache_size,
    workers: Workers = LP.workers,
    decode: Decode = LP.decode,
    max_sample_mb: MaxSampleMb = LP.max_sample_mb,
    max_image_pixels: MaxImagePixels = LP.max_image_pixels,
    bands: Bands = None,
    mean: Mean = None,
    std: Std = None,
    crop_pct: CropPct = LP.crop_pct,
    cache_features: Annotated[bool, typer.Option(
        help="Extract features once (centre crops, no augmentation) and train on them: fast repeated probes.",
        rich_help_panel=DATA)] = LP.cache_features,
    cache_dir: Annotated[str | None, typer.Option(
        help="Folder of cached features, reused when encoder, layer, pooling and data match "
             "\\[default: <output>/features].", rich_help_panel=DATA, show_default=False)] = None,
    pretrained: Annotated[str | None, typer.Option(
        help="Encoder checkpoint (simmim, official SimMIM or timm); without it a randomly initialised encoder is "
             "probed, the baseline to compare against.", rich_help_panel=MODEL, show_default=False)] = None,
    allow_missing: AllowMissing = False,
    model: ClassifierModel = None,
    model_kwargs: ModelKwargs = None,
    img_size: ClassifierImgSize = None,
    layer: Annotated[int, typer.Option(
        help="Block (ViT/BEiT) or stage (Swin) to probe; negative counts from the end.",
        rich_help_panel=MODEL)] = LP.layer,
    pool: Annotated[str, typer.Option(help="mean (patch tokens) | cls (class token).",
                                      rich_help_panel=MODEL)] = LP.pool,
    optimizer: Annotated[str, typer.Option(help="lars | sgd (momentum 0.9).", rich_help_panel=OPTIM)] = LP.optimizer,
    epochs: Epochs = LP.epochs,
    batch_size: BatchSize = LP.batch_size,
    base_lr: BaseLr = LP.base_lr,
    warmup_epochs: WarmupEpochs = LP.warmup_epochs,
    warmup_lr: WarmupLr = LP.warmup_lr,
    min_lr: MinLr = LP.min_lr,
    weight_decay: WeightDecay = LP.weight_decay,
    clip_grad: ClipGrad = LP.clip_grad,
    grad_accum: GradAccum = LP.grad_accum,
    global_batch: GlobalBatch = None,
    schedule: Schedule = LP.schedule,
    lr_milestones: LrMilestones = None,
    precision: Precision = LP.precision,
    recipe: Recipe = None,
    seed: Seed = LP.seed,
    output: Output = None,
    resume: Resume = None,
    force: Force = False,
    log_every: LogEvery = LP.log_every,
    log_to: LogTo = None,
    save_every: SaveEvery = LP.save_every,
    keep: Keep = LP.keep,
    max_steps: MaxSteps = LP.max_steps,
    device: Device = LP.device,
    gpus: Gpus = LP.gpus,
    nproc: Nproc = LP.nproc,
    nnodes: Nnodes = LP.nnodes,
    node_rank: NodeRank = LP.node_rank,
    master_addr: MasterAddr = LP.master_addr,
    master_port: MasterPort = LP.master_port,
    dist_timeout: DistTimeout = LP.dist_timeout,
    bf16_grad_reduce: Bf16GradReduce = LP.bf16_grad_reduce,
    shard_model: ShardModel = LP.shard_model,
) -> None:
    """Train a linear classifier (BatchNorm without affine + linear, MAE's protocol) on frozen features."""
    from ..commands.probe import linear_probe as run

    run(config_from_context(LinearProbeConfig, ctx))


