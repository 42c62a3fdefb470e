"""The ``simmim`` command line: one thin function per command over the library."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .config import (
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    LinearProbeConfig,
    PredictConfig,
    PretrainConfig,
    VisualizeConfig,
    resolve_config,
)
from .errors import SimmimError, debug_enabled, set_debug
from .options import (
    DATA,
    EV,
    FT,
    LP,
    MASKING,
    MODEL,
    OPTIM,
    AllowMissing,
    BaseLr,
    BatchSize,
    ClassifierImgSize,
    ClassifierModel,
    ClipGrad,
    Compile,
    CropPct,
    D,
    Data,
    Device,
    DistTimeout,
    DropPath,
    Epochs,
    EpochSize,
    Force,
    Gpus,
    GradAccum,
    GradCheckpointing,
    ImgSize,
    Keep,
    LabelledData,
    LogEvery,
    LrMilestones,
    MasterAddr,
    MasterPort,
    MaxSteps,
    MinLr,
    Model,
    ModelKwargs,
    Nnodes,
    NodeRank,
    Nproc,
    Output,
    Precision,
    Pretrained,
    Recipe,
    Resume,
    SaveEvery,
    Schedule,
    Seed,
    ValData,
    WarmupEpochs,
    WarmupLr,
    WeightDecay,
    Workers,
)

app = typer.Typer(
    name="simmim",
    help="Self-supervised pretraining of vision transformers with SimMIM, then finetune, evaluate and export.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)

# ---------------------------------------------------------------------------------------------- errors


def handle_errors(command):
    """User errors → one line on stderr and their exit code (2 for bad input); --debug shows tracebacks."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SimmimError as error:
            if debug_enabled():
                raise
            typer.echo(f"error: {one_line(error)}", err=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def one_line(error: Exception) -> str:
    """The message of an error; one raised in a data loader worker arrives wrapped in its traceback."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith("simmim_cli.errors.") else last
    return text


def _version(value: bool) -> None:
    if value:
        typer.echo(f"simmim-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """SimMIM (Xie et al., CVPR 2022): mask 32×32 patches, regress their pixels, learn a ViT/Swin encoder."""
    set_debug(debug)


def config_from_context(config_class: type, ctx: typer.Context) -> Any:
    """The command's parsed options → a validated config (defaults < --recipe < options given)."""
    explicit = {name for name in ctx.params if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
    values = dict(ctx.params)
    if values.get("lr_milestones") is None:
        values.pop("lr_milestones", None)
    if values.get("demo") and "recipe" not in explicit:
        from .demo import DEMO_SETTINGS

        values.update({k: v for k, v in DEMO_SETTINGS.items() if k not in explicit})
    return resolve_config(config_class, values, explicit)


# ---------------------------------------------------------------------------------------------- commands


@app.command("make-shards", epilog="Example: simmim make-shards photos/ shards/ --maxcount 5000")
@handle_errors
def make_shards(
    source: Annotated[Path, typer.Argument(help="Folder of images; class sub-folders become integer labels.",
                                           show_default=False)],
    output: Annotated[Path, typer.Argument(help="Folder for the shards and _info.json.", show_default=False)],
    maxcount: Annotated[int, typer.Option(help="Samples per shard.")] = 10000,
    shuffle: Annotated[bool, typer.Option(help="Shuffle samples across shards (class folders are sorted).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle.")] = 0,
    split: Annotated[str, typer.Option(help="Split name: shard file prefix and key in _info.json.")] = "train",
    force: Annotated[bool, typer.Option("--force", help="Replace shards of the same split in OUTPUT.")] = False,
) -> None:
    """Write WebDataset tar shards from a folder of images (JPEG bytes kept as they are, others stored losslessly)."""
    from rich.console import Console
    from rich.progress import Progress

    from .shards import write_shards

    if maxcount < 1:
        raise SimmimError("--maxcount must be at least 1")
    console = Console(stderr=True)
    with Progress(console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("writing shards", total=None)
        info = write_shards(
            source, output, maxcount=maxcount, shuffle=shuffle, seed=seed, split=split, force=force,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            on_skip=lambda path, reason: console.print(f"warning: skipped unreadable {path}: {reason}",
                                                       markup=False, highlight=False),
        )
    entry = info["splits"][split]
    classes = f", {info['num_classes']} classes" if "classes" in info else " (unlabelled)"
    skipped = f"; skipped {len(info['skipped'])} unreadable file(s)" if info["skipped"] else ""
    typer.echo(f"wrote {entry['num_samples']} samples in {len(entry['filenames'])} shard(s) to {output}"
               f"{classes}{skipped}")


PRETRAIN_EPILOG = (
    "Examples:\n\n"
    "  simmim pretrain --demo                                   # built-in images, a few CPU minutes\n\n"
    "  simmim pretrain --data shards/ --gpus 8                  # one 8-GPU machine\n\n"
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
    workers: Workers = D.workers,
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
    clip_grad: ClipGrad = D.clip_grad,
    grad_accum: GradAccum = D.grad_accum,
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
    save_every: SaveEvery = D.save_every,
    keep: Keep = D.keep,
    max_steps: MaxSteps = D.max_steps,
    device: Device = D.device,
    gpus: Gpus = D.gpus,
    nproc: Nproc = D.nproc,
    nnodes: Nnodes = D.nnodes,
    node_rank: NodeRank = D.node_rank,
    master_addr: MasterAddr = D.master_addr,
    master_port: MasterPort = D.master_port,
    dist_timeout: DistTimeout = D.dist_timeout,
) -> None:
    """Pretrain an encoder with SimMIM on WebDataset shards; writes checkpoints and reconstruction previews."""
    from .commands.pretrain import pretrain as run

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
    workers: Workers = FT.workers,
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
        help="Pooling of the classifier: avg | token [default: the model's own].", rich_help_panel=MODEL,
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
        help="Layer-wise lr decay [default: 0.65 for ViT/BEiT, 0.9 for Swin as the official recipes; higher for "
             "short runs, see the summary printed at start].",
        rich_help_panel=OPTIM, show_default=False)] = None,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.",
                                                   rich_help_panel=OPTIM)] = FT.label_smoothing,
    warmup_epochs: WarmupEpochs = FT.warmup_epochs,
    warmup_lr: WarmupLr = FT.warmup_lr,
    min_lr: MinLr = FT.min_lr,
    weight_decay: WeightDecay = FT.weight_decay,
    clip_grad: ClipGrad = FT.clip_grad,
    grad_accum: GradAccum = FT.grad_accum,
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
) -> None:
    """Fine-tune a pretrained encoder on labelled shards; evaluates every epoch, keeps best.pth and last.pth.

    The defaults shown are the paper's (ImageNet). Without --recipe, the lr, batch, layer decay and augmentation
    not given are fitted to the data set and the run's length (a summary is printed at start)."""
    from .commands.finetune import finetune as run

    config = config_from_context(FinetuneConfig, ctx)
    if config.auto_augment in ("", "none"):
        config.auto_augment = None
    run(config)


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
    workers: Workers = LP.workers,
    crop_pct: CropPct = LP.crop_pct,
    cache_features: Annotated[bool, typer.Option(
        help="Extract features once (centre crops, no augmentation) and train on them: fast repeated probes.",
        rich_help_panel=DATA)] = LP.cache_features,
    cache_dir: Annotated[str | None, typer.Option(
        help="Folder of cached features, reused when encoder, layer, pooling and data match "
             "[default: <output>/features].", rich_help_panel=DATA, show_default=False)] = None,
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
    schedule: Schedule = LP.schedule,
    lr_milestones: LrMilestones = None,
    precision: Precision = LP.precision,
    recipe: Recipe = None,
    seed: Seed = LP.seed,
    output: Output = None,
    resume: Resume = None,
    force: Force = False,
    log_every: LogEvery = LP.log_every,
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
) -> None:
    """Train a linear classifier (BatchNorm without affine + linear, MAE's protocol) on frozen features."""
    from .commands.probe import linear_probe as run

    run(config_from_context(LinearProbeConfig, ctx))


@app.command(epilog=(
    "Examples:\n\n  simmim evaluate --checkpoint runs/finetune-X/best.pth --data val/ --output report/\n\n"
    "  simmim evaluate --checkpoint vit-cpu.onnx --data val/ --output report-int8/     # what --int8 costs"))
@handle_errors
def evaluate(
    ctx: typer.Context,
    checkpoint: Annotated[str | None, typer.Option(
        help="best.pth or last.pth of a finetune or linear-probe run, or an .onnx classifier from simmim export "
        "(onnxruntime; --device picks its provider) [default: the newest under runs/].",
        show_default=False)] = None,
    data: Annotated[str | None, typer.Option(
        help="Labelled shards, or a folder with one sub-folder per class.", show_default=False)] = None,
    output: Annotated[str | None, typer.Option(
        help="Folder for metrics.json, confusion.json and confusion.png [default: runs/evaluate-<time>].",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = EV.batch_size,
    workers: Annotated[int, typer.Option(help="Data loader processes.")] = EV.workers,
    crop_pct: Annotated[float | None, typer.Option(
        help="Centre-crop fraction [default: the checkpoint's].", show_default=False)] = None,
    device: Device = EV.device,
    precision: Precision = EV.precision,
    force: Annotated[bool, typer.Option("--force", help="Replace an evaluation in --output.")] = False,
) -> None:
    """Top-1/top-5 of a classifier checkpoint, with per-class accuracy and a confusion matrix (JSON and PNG)."""
    from rich.console import Console
    from rich.table import Table

    from .commands.evaluate import evaluate as run

    result = run(config_from_context(EvaluateConfig, ctx))
    console = Console()
    console.print(f"{result['checkpoint']}: top-1 {result['val_top1']:.2f}%  top-5 {result['val_top5']:.2f}%  "
                  f"({result['count']} images" + (f", {len(result['skipped'])} unreadable skipped"
                                                 if result["skipped"] else "") + ")")
    confusion, classes = result["confusion"], result["classes"]
    if len(classes) <= 30:
        table = Table("class", "images", "accuracy")
        for i, name in enumerate(classes):
            support = int(confusion[i].sum())
            table.add_row(name, str(support), f"{100 * int(confusion[i, i]) / support:.1f}%" if support else "-")
        console.print(table)
    console.print(f"wrote {result['paths']['metrics']}, {result['paths']['confusion']} and "
                  f"{result['paths']['confusion_png']}")


@app.command("visualize-recon", epilog=(
    "Examples:\n\n  simmim visualize-recon photo.jpg                       # the newest pretrain checkpoint\n\n"
    "  simmim visualize-recon photos/ --checkpoint simmim_swin_base_800ep.pth --seed 3 --output swin.png\n\n"
    "  simmim visualize-recon shards/ --limit 8 --mask my_mask.npy --save-arrays recon.npz"))
@handle_errors
def visualize_recon(
    ctx: typer.Context,
    images: Annotated[list[str], typer.Argument(help="Image files, folders of images, or shards.",
                                                show_default=False)],
    checkpoint: Annotated[str | None, typer.Option(
        help="Pretrain checkpoint (this toolkit's or an official SimMIM release) [default: the newest under runs/].",
        show_default=False)] = None,
    output: Annotated[str, typer.Option(help="PNG panel to write.")] = "recon.png",
    force: Annotated[bool, typer.Option("--force", help="Replace --output and --save-arrays files.")] = False,
    mask_ratio: Annotated[float | None, typer.Option(
        help="Fraction of cells masked [default: the checkpoint's, else 0.6].", show_default=False)] = None,
    mask_patch_size: Annotated[int | None, typer.Option(
        help="Masked cell size in pixels [default: the checkpoint's, else 32].", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random masks: same seed, same masks.")] = 0,
    mask: Annotated[str | None, typer.Option(
        help="A .npy 0/1 array on the mask-patch or model-patch grid (1 = masked), used for every image.",
        show_default=False)] = None,
    save_arrays: Annotated[str | None, typer.Option(
        help="Also write input, mask, reconstruction (normalised) and per-image loss to this .npz.",
        show_default=False)] = None,
    model: Annotated[str | None, typer.Option(
        help="timm model name, when the checkpoint has no config (official releases: usually read off the "
             "weights).", show_default=False)] = None,
    model_kwargs: ModelKwargs = None,
    img_size: Annotated[int | None, typer.Option(help="Input size [default: the checkpoint's].",
                                                 show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="At most this many images in the panel.")] = 16,
    device: Device = "auto",
) -> None:
    """Reconstruction panels: original | masked input | reconstruction | reconstruction with visible patches."""
    from .commands.visualize import visualize_recon as run

    result = run(config_from_context(VisualizeConfig, ctx))
    for line in result["notes"]:
        typer.echo(line, err=True)
    for line in result["skipped"]:
        typer.echo(f"warning: skipped unreadable {line}", err=True)
    losses = result["losses"]
    typer.echo(f"wrote {result['output']} ({len(losses)} image(s), mean masked L1 {sum(losses) / len(losses):.4f})"
               + (f" and {result['arrays']}" if result["arrays"] else ""))


@app.command(epilog=(
    "Examples:\n\n  simmim export --onnx                                   # the newest finetune run's best.pth\n\n"
    "  simmim export --onnx --checkpoint runs/finetune-X/best.pth --output vit.onnx --fp16\n\n"
    "  simmim export --onnx --checkpoint runs/finetune-X/best.pth --output vit-cpu.onnx --int8\n\n"
    "  simmim export --onnx --checkpoint runs/pretrain-X/checkpoint-00012345.pth --what features"))
@handle_errors
def export(
    ctx: typer.Context,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Write an ONNX file.")] = True,
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint to export [default: the newest finetune/linear-probe run's best.pth, else the newest "
             "pretrain checkpoint].", show_default=False)] = None,
    what: Annotated[str | None, typer.Option(
        help="classifier (logits) | features (pooled) | reconstruction (images + mask → pixels) "
             "[default: classifier for classifier checkpoints, features for pretrain ones].",
        show_default=False)] = None,
    output: Annotated[str | None, typer.Option(help="ONNX file [default: <what>.onnx].", show_default=False)] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    exporter: Annotated[str, typer.Option(
        help="auto (dynamo, falling back to TorchScript with a note) | dynamo | torchscript.")] = "auto",
    fp16: Annotated[bool, typer.Option("--fp16", help="Half-precision model (float32 inputs and outputs), "
                                       "verified by top-1 agreement.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Dynamic int8 quantization for CPU deployment (2–3× faster "
                                       "there), verified by top-1 agreement and cosine similarity; measure its "
                                       "accuracy with simmim evaluate --checkpoint FILE.onnx.")] = False,
    torchscript: Annotated[bool, typer.Option("--torchscript", help="Also write a TorchScript file (.pt).")] = False,
    verify: Annotated[bool, typer.Option(help="Compare onnxruntime with PyTorch on real images; fail above "
                                         "--tolerance.")] = True,
    tolerance: Annotated[float, typer.Option(help="Largest accepted absolute difference (fp32).")] = 1e-4,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Export a checkpoint to ONNX (dynamic batch, fixed image size, preprocessing in the metadata), verified."""
    from .commands.export import export as run

    result = run(config_from_context(ExportConfig, ctx))
    check = result.get("verification")
    if check:
        agreement = f", top-1 agreement {100 * check['top1_agreement']:.0f}%" if "top1_agreement" in check else ""
        typer.echo(f"verified with onnxruntime on real images: max |onnx - torch| = {check['max_abs_diff']:.2e}, "
                   f"cosine similarity >= {check['min_cosine']:.4f}" + agreement)
    exporter_note = f" (exporter: {result['exporter']})" if "exporter" in result else ""
    typer.echo(f"wrote {', '.join(map(str, result['files']))}: {result['what']} of {result['checkpoint']}"
               + exporter_note)


@app.command(epilog=(
    "Examples:\n\n  simmim predict model.onnx photo.jpg photos/\n\n"
    "  simmim predict runs/finetune-X/best.pth shards/val --json --top-k 3 > predictions.json"))
@handle_errors
def predict(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="An .onnx file from simmim export, or a classifier checkpoint.",
                                         show_default=False)],
    images: Annotated[list[str], typer.Argument(help="Image files, folders or shards.", show_default=False)],
    top_k: Annotated[int, typer.Option(help="Classes per image.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    provider: Annotated[str, typer.Option(
        help="auto (CUDA when onnxruntime can use it, else CPU with a note) | cuda | tensorrt | cpu.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    img_size: Annotated[int | None, typer.Option(help="Check the model takes this size.",
                                                 show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many images.", show_default=False)] = None,
) -> None:
    """Top-k classes of images, with names, from an ONNX model (onnxruntime, GPU when available) or a checkpoint."""
    import json

    from rich.console import Console
    from rich.table import Table

    from .commands.predict import predict as run

    values = dict(ctx.params)
    values["json"] = values.pop("json_output")
    config = PredictConfig(**values)
    config.validate()
    result = run(config)
    errors = Console(stderr=True)
    for line in result["notes"]:
        errors.print(line, markup=False, highlight=False)
    for line in result["skipped"]:
        errors.print(f"warning: skipped unreadable {line}", markup=False, highlight=False)
    if config.json:
        typer.echo(json.dumps(result["results"], indent=2))
    else:
        table = Table("image", "top-1", "probability", f"top-{config.top_k}")
        for entry in result["results"]:
            table.add_row(entry["image"], entry["top1"], f"{entry['topk'][0]['prob']:.3f}",
                          ", ".join(f"{e['label']} {e['prob']:.2f}" for e in entry["topk"][1:]))
        Console().print(table)
    errors.print(f"{len(result['results'])} image(s) with {result['runtime']}: "
                 f"{result['images_per_second']:.1f} images/s", markup=False, highlight=False)


def run() -> None:
    """Entry point of ``python -m simmim_cli``."""
    app(prog_name="simmim")


if __name__ == "__main__":
    sys.exit(run())
