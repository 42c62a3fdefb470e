"""The ``simmim`` command line: one thin function per command over the library."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .config import PRECISIONS, SCHEDULES, PretrainConfig, resolve_config
from .errors import SimmimError, debug_enabled, set_debug

DATA, MODEL, MASKING, OPTIM, RUN, DIST = "Data", "Model", "Masking", "Optimisation", "Run", "Distributed"
D = PretrainConfig()  # the defaults shown in --help

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
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


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


# ---------------------------------------------------------------------------------------------- shared options

Recipe = Annotated[Path | None, typer.Option(
    help="YAML file of option values (see recipes/); options given on the command line override it.",
    rich_help_panel=RUN, show_default=False)]
Data = Annotated[str | None, typer.Option(
    help="Training shards: a folder (with _info.json from make-shards), a brace pattern "
         "'shards/train-{000000..000099}.tar', or a text file listing one shard per line.",
    rich_help_panel=DATA, show_default=False)]
EpochSize = Annotated[int | None, typer.Option(
    help="Samples per epoch, when the shards' _info.json does not say (remote shards).",
    rich_help_panel=DATA, show_default=False)]
Workers = Annotated[int, typer.Option(help="Data loader processes per training process.", rich_help_panel=DATA)]
Model = Annotated[str, typer.Option(
    help="timm model name: vit_*, deit_*, beit_*, swin_* or swinv2_* (no weights are downloaded).",
    rich_help_panel=MODEL)]
ModelKwargs = Annotated[str | None, typer.Option(
    help="JSON of extra timm.create_model arguments, e.g. '{\"embed_dim\": 96, \"window_size\": 6}'.",
    rich_help_panel=MODEL, show_default=False)]
ImgSize = Annotated[int, typer.Option(help="Input image size (square).", rich_help_panel=MODEL)]
DropPath = Annotated[float, typer.Option(help="Stochastic depth rate.", rich_help_panel=MODEL)]
GradCheckpointing = Annotated[bool, typer.Option(
    help="Recompute activations in the backward pass: less memory, about 30% more compute.", rich_help_panel=MODEL)]
Epochs = Annotated[int, typer.Option(help="Training epochs.", rich_help_panel=OPTIM)]
BatchSize = Annotated[int, typer.Option(help="Images per process (per GPU) and step.", rich_help_panel=OPTIM)]
BaseLr = Annotated[float, typer.Option(
    help="Learning rate per 512 images: lr = base-lr × global batch / 512.", rich_help_panel=OPTIM)]
WarmupEpochs = Annotated[float, typer.Option(help="Linear warmup length in epochs.", rich_help_panel=OPTIM)]
WarmupLr = Annotated[float, typer.Option(help="Warmup start lr, per 512 images.", rich_help_panel=OPTIM)]
MinLr = Annotated[float, typer.Option(help="Final lr of the cosine schedule, per 512 images.", rich_help_panel=OPTIM)]
WeightDecay = Annotated[float, typer.Option(
    help="AdamW weight decay (not applied to norms, biases, position tables and tokens).", rich_help_panel=OPTIM)]
ClipGrad = Annotated[float, typer.Option(help="Gradient norm clipping; 0 turns it off.", rich_help_panel=OPTIM)]
GradAccum = Annotated[int, typer.Option(
    help="Batches accumulated per optimizer step (a larger global batch on fewer GPUs).", rich_help_panel=OPTIM)]
Schedule = Annotated[str, typer.Option(help=f"Learning-rate schedule after warmup: {' | '.join(SCHEDULES)}.",
                                       rich_help_panel=OPTIM)]
LrMilestones = Annotated[list[int] | None, typer.Option(
    help="Epochs at which the multistep schedule multiplies the lr by 0.1 (repeat the option for several).",
    rich_help_panel=OPTIM, show_default=False)]
Precision = Annotated[str, typer.Option(
    help=f"{' | '.join(PRECISIONS)}. auto = bf16 on GPUs and CPUs that have it (fp16 with loss scaling on older "
         "GPUs), else fp32.", rich_help_panel=OPTIM)]
Compile = Annotated[bool, typer.Option(help="torch.compile the model (slow first step, faster after).",
                                       rich_help_panel=OPTIM)]
Seed = Annotated[int, typer.Option(help="Seed for weights, data order, augmentation and masks.", rich_help_panel=RUN)]
Output = Annotated[str | None, typer.Option(
    help="Run folder for config.yaml, metrics.jsonl, checkpoints and previews [default: runs/<command>-<time>].",
    rich_help_panel=RUN, show_default=False)]
Resume = Annotated[str | None, typer.Option(
    help="Continue from a checkpoint file, or 'auto' for the newest one in --output (or in the newest run).",
    rich_help_panel=RUN, show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Start over in an --output folder that already holds a run.",
                                     rich_help_panel=RUN)]
LogEvery = Annotated[int, typer.Option(help="Steps between log lines (metrics.jsonl).", rich_help_panel=RUN)]
SaveEvery = Annotated[int, typer.Option(
    help="Steps between checkpoints (and previews); 0 = at the end of each epoch only.", rich_help_panel=RUN)]
Keep = Annotated[int, typer.Option(help="Newest checkpoints kept.", rich_help_panel=RUN)]
MaxSteps = Annotated[int, typer.Option(
    help="Stop after this many optimizer steps, schedule unchanged (smoke tests); 0 = no limit.", rich_help_panel=RUN)]
Device = Annotated[str, typer.Option(help="auto | cuda | cpu.", rich_help_panel=RUN)]
Gpus = Annotated[int, typer.Option(help="GPUs on this machine: starts one process per GPU (NCCL).",
                                   rich_help_panel=DIST)]
Nproc = Annotated[int, typer.Option(help="Processes on this machine, e.g. CPU processes with --device cpu (gloo).",
                                    rich_help_panel=DIST)]
Nnodes = Annotated[int, typer.Option(help="Machines in the job (run the same command on each).", rich_help_panel=DIST)]
NodeRank = Annotated[int, typer.Option(help="This machine's index, 0 .. nnodes-1.", rich_help_panel=DIST)]
MasterAddr = Annotated[str, typer.Option(help="Address of node 0, reachable from every node.", rich_help_panel=DIST)]
MasterPort = Annotated[int, typer.Option(help="Free TCP port on node 0.", rich_help_panel=DIST)]
DistTimeout = Annotated[float, typer.Option(
    help="Minutes a collective may wait for the other ranks before the job fails.", rich_help_panel=DIST)]


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

    from .data import write_shards

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
    from .tasks import pretrain as run

    run(config_from_context(PretrainConfig, ctx))


def _not_yet(name: str, issue: str):
    def command(args: Annotated[list[str] | None, typer.Argument(hidden=True)] = None) -> None:
        typer.echo(f"error: `simmim {name}` is not implemented yet ({issue}); "
                   "pretrain and make-shards work today", err=True)
        raise typer.Exit(2)

    command.__doc__ = f"(not implemented yet) {issue[0].upper()}{issue[1:]}."
    return command


for _name, _what in {
    "finetune": "fine-tune a pretrained encoder on labelled shards",
    "linear-probe": "train a linear classifier on frozen features",
    "evaluate": "top-1/top-5 and a confusion matrix of a checkpoint",
    "visualize-recon": "reconstruction panels for images",
    "export": "ONNX export of a checkpoint",
    "predict": "classify images with an ONNX model or a checkpoint",
}.items():
    app.command(_name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        _not_yet(_name, _what))


def run() -> None:
    """Entry point of ``python -m simmim_cli``."""
    app(prog_name="simmim")


if __name__ == "__main__":
    sys.exit(run())
