"""Command-line options shared by several commands (Typer ``Annotated`` aliases), grouped into help panels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .config import PRECISIONS, SCHEDULES, FinetuneConfig, LinearProbeConfig, PretrainConfig
from .tool_configs import EvaluateConfig, KnnConfig

DATA, MODEL, MASKING, OPTIM, RUN, DIST = "Data", "Model", "Masking", "Optimisation", "Run", "Distributed"
D = PretrainConfig()  # the defaults shown in --help
FT = FinetuneConfig()
LP = LinearProbeConfig()
EV = EvaluateConfig()
KN = KnnConfig()

Recipe = Annotated[Path | None, typer.Option(
    help="YAML file of option values (see recipes/); options given on the command line override it.",
    rich_help_panel=RUN, show_default=False)]
MIXING_HELP = (
    " Repeat --data to mix several sources; a share after '::' says how much of each epoch a source fills: "
    "'::30%' (a proportion of the epoch), '::0.5x' or '::3x' (passes over it), '::20000' (samples per epoch); "
    "without one it is read once per epoch. Or a YAML file listing the sources (see docs/mixing.md).")
Data = Annotated[list[str] | None, typer.Option(
    help="Training images: a shard folder (with _info.json from make-shards), a brace pattern "
         "'shards/train-{000000..000099}.tar', a text file listing one shard per line, or a plain folder of images "
         "(written once into shards in FOLDER.simmim-shards/ next to it, reused until the folder changes)."
         + MIXING_HELP, rich_help_panel=DATA, show_default=False)]
EpochSize = Annotated[int | None, typer.Option(
    help="Samples per epoch, when the shards' _info.json does not say (remote shards).",
    rich_help_panel=DATA, show_default=False)]
IoRetries = Annotated[int, typer.Option(
    help="Tries after a failed read of a remote shard (a cut connection, a 5xx, a timeout) before the run stops; "
         "each continues where the read stopped, after a backoff growing to a minute: the default rides out about "
         "3 minutes of a store not answering.", rich_help_panel=DATA)]
ShardCache = Annotated[str | None, typer.Option(
    help="Keep remote shards in this local folder: each downloaded once per node (processes share it), checked, "
         "renamed into place; later epochs read the local copy. Needed by --decode gpu for remote data.",
    rich_help_panel=DATA, show_default=False)]
ShardCacheSize = Annotated[str, typer.Option(
    help="Most the --shard-cache folder may hold, e.g. 200GB or 1.5TB; the least recently used shards make room.",
    rich_help_panel=DATA)]
Workers = Annotated[int | None, typer.Option(
    help="Data loader processes per training process \\[default: the cores this process may use ÷ training "
         "processes on the node, minus one, at most 12]. One process decodes and crops about 500 images/s (a core "
         "of a 2-core AMD EPYC); an H100 would train ViT-B/16 SimMIM on about 4,000/s (an estimate). With --decode "
         "gpu: DALI threads.", rich_help_panel=DATA,
    show_default=False)]
MaxSampleMb = Annotated[float, typer.Option(
    help="Largest shard member (one image file) read, in MB: a larger one is skipped without being read and named "
         "once, so a decompression bomb in a shard costs no memory. Raise it for huge single images.",
    rich_help_panel=DATA)]
MaxImagePixels = Annotated[float, typer.Option(
    help="Largest image decoded, in pixels (× bands beyond three), e.g. 100e6 = 100 megapixels: a larger one is "
         "skipped from its header, before it is decoded.", rich_help_panel=DATA)]
Decode = Annotated[str, typer.Option(
    help="cpu: decode and augment in loader processes. gpu: NVIDIA DALI decodes JPEGs on the GPU and augments "
         "there, for few CPU cores per GPU (pip install \"simmim-cli\\[dali]\"; writes DALI index files next to the "
         "shards once). With gpu a resumed run continues at the right batch of the epoch, but the rest of that "
         "epoch's order differs from an uninterrupted run's.", rich_help_panel=DATA)]
Bands = Annotated[str | None, typer.Option(
    help="Bands of multi-band images (TIFF, DICOM, .npy, 16-bit PNG) to train on, in this order: 0-based indices "
         "or the band names in the shards' _info.json, comma-separated, e.g. 3,2,1,7 \\[default: all].",
    rich_help_panel=DATA, show_default=False)]
Mean = Annotated[str | None, typer.Option(
    help="Per-channel mean for the normalisation, in the data's units (0-255 for 8-bit images, raw counts or "
         "Hounsfield units for others), comma-separated or one for all \\[default: ImageNet's for 8-bit RGB, the "
         "data's own from _info.json otherwise].", rich_help_panel=DATA, show_default=False)]
Std = Annotated[str | None, typer.Option(
    help="Per-channel standard deviation for the normalisation, like --mean.", rich_help_panel=DATA,
    show_default=False)]
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
WarmupEpochs = Annotated[float, typer.Option(
    help="Linear warmup length in epochs; not given, the default keeps its share of a shorter run (printed).",
    rich_help_panel=OPTIM)]
WarmupLr = Annotated[float, typer.Option(help="Warmup start lr, per 512 images.", rich_help_panel=OPTIM)]
MinLr = Annotated[float, typer.Option(help="Final lr of the cosine schedule, per 512 images.", rich_help_panel=OPTIM)]
WeightDecay = Annotated[float, typer.Option(
    help="AdamW weight decay (not applied to norms, biases, position tables and tokens).", rich_help_panel=OPTIM)]
ClipGrad = Annotated[float, typer.Option(help="Gradient norm clipping; 0 turns it off.", rich_help_panel=OPTIM)]
GradAccum = Annotated[int, typer.Option(
    help="Batches accumulated per optimizer step (a larger global batch on fewer GPUs).", rich_help_panel=OPTIM)]
GlobalBatch = Annotated[int | None, typer.Option(
    help="Images per optimizer step over all processes; the accumulation steps follow the process count "
    "(N = batch-size × processes × accumulation, --batch-size then the per-process micro-batch, or chosen), so the "
    "lr, the schedule and a resume's samples stay exact on another cluster shape (--decode cpu and cached probe "
    "features; --decode gpu keeps the schedule only).", rich_help_panel=OPTIM, show_default=False)]
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
    help="Run folder for config.yaml, metrics.jsonl, checkpoints and previews \\[default: runs/<command>-<time>].",
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
LogTo = Annotated[list[str] | None, typer.Option(
    "--log-to", help="Also log to an experiment tracker: tensorboard | wandb | mlflow (repeat for several; "
    "metrics.jsonl is always written). Scalars, previews/confusion matrices as images, the config as "
    "hyperparameters, the run folder's name as run name; --resume continues the same tracker run. TensorBoard "
    "writes <output>/tensorboard; W&B honours WANDB_MODE=offline and WANDB_PROJECT; MLflow honours "
    "MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME. Each needs its extra, e.g. pip install \"simmim-cli\\[wandb]\".",
    rich_help_panel=RUN, show_default=False)]
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
Bf16GradReduce = Annotated[bool, typer.Option(
    help="All-reduce gradients in bf16 instead of fp32: half the network traffic between nodes, gradients "
         "rounded to 3 significant digits before averaging. Worth it on multi-node jobs with slow links; no "
         "gain within one NVLink node.", rich_help_panel=DIST)]
ShardModel = Annotated[bool, typer.Option(
    "--shard-model", help="Shard the weights, gradients and AdamW state over the processes (PyTorch FSDP2): each GPU "
    "holds 1/N of them and gathers one block's weights just before it runs. For models that do not fit with "
    "replicas (ViT-H, SwinV2-G); checkpoints become folders that load on any process count. Across nodes the "
    "weights are sharded within each node and replicated across nodes (HSDP). See docs/big-models.md.",
    rich_help_panel=DIST)]
ParamGroups = Annotated[str, typer.Option(
    help="Whose parameter groups: timm (timm's layer ids and no-weight-decay list) | official (the authors' "
         "optimizer.py exactly, set by the paper's recipes: a Swin patch merging one layer lower for layer decay; "
         "weight decay on the ViT's relative position tables and pretraining mask token, and on Swin's tables in "
         "pretraining). See docs/hugging-face.md.",
    rich_help_panel=OPTIM)]
Pretrained = Annotated[str | None, typer.Option(
    help="Start from this checkpoint: a simmim pretrain checkpoint, an official SimMIM release, a timm state "
         "dict, a Hugging Face transformers ViT/Swin folder (save_pretrained, run_mim.py), or a Hub id such as "
         "hf-hub:microsoft/swin-base-simmim-window6-192 (fetched once into the Hugging Face cache). Its "
         "architecture is used unless --model/--model-kwargs say otherwise.",
    rich_help_panel=MODEL, show_default=False)]
AllowMissing = Annotated[bool, typer.Option(
    "--allow-missing", help="Load even when backbone keys are missing or left over (they are listed).",
    rich_help_panel=MODEL)]
ValData = Annotated[str | None, typer.Option(
    help="Labelled validation shards, or a folder with one sub-folder per class (made into shards once, like "
         "--data), evaluated (top-1/top-5) after every epoch.", rich_help_panel=DATA,
    show_default=False)]
LabelledData = Annotated[list[str] | None, typer.Option(
    help="Labelled training shards (from class sub-folders; class names come from _info.json), or a folder with "
         "one sub-folder of images per class: written once into shards in FOLDER.simmim-shards/ next to it, "
         "reused until the folder changes (for large sets, run make-shards once)." + MIXING_HELP
         + " Mixed sources must have the same classes.", rich_help_panel=DATA, show_default=False)]
ClassifierModel = Annotated[str | None, typer.Option(
    "--model", help="timm model name \\[default: the --pretrained checkpoint's].", rich_help_panel=MODEL,
    show_default=False)]
ClassifierImgSize = Annotated[int | None, typer.Option(
    "--img-size", help="Input size \\[default: the --pretrained checkpoint's, else 224]; position tables are resized.",
    rich_help_panel=MODEL, show_default=False)]
CropPct = Annotated[float, typer.Option(
    help="Evaluation crop: resize to img-size / crop-pct, then centre-crop.", rich_help_panel=DATA)]
