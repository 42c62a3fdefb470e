"""Commands around trained models: ``evaluate``, ``visualize-recon``, ``knn``, ``export``, ``predict``."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import resolve_config
from ..options import (
    DATA,
    EV,
    KN,
    MODEL,
    AllowMissing,
    Bands,
    ClassifierImgSize,
    ClassifierModel,
    CropPct,
    Decode,
    Device,
    IoRetries,
    MasterPort,
    MaxImagePixels,
    MaxSampleMb,
    Mean,
    ModelKwargs,
    Nproc,
    Precision,
    ShardCache,
    ShardCacheSize,
    Std,
    Workers,
)
from ..redact import terminal
from ..tool_configs import EvaluateConfig, ExportConfig, KnnConfig, PredictConfig, VisualizeConfig
from .app import app, apply_process_settings, config_from_context, handle_errors


@app.command(epilog=(
    "Examples:\n\n  simmim evaluate --checkpoint runs/finetune-X/best.pth --data val/ --output report/\n\n"
    "  simmim evaluate --checkpoint vit-cpu.onnx --data val/ --output report-int8/     # what --int8 costs"))
@handle_errors
def evaluate(
    ctx: typer.Context,
    checkpoint: Annotated[str | None, typer.Option(
        help="best.pth or last.pth of a finetune or linear-probe run, or an .onnx classifier from simmim export "
        "(onnxruntime; --device picks its provider) \\[default: the newest under runs/].",
        show_default=False)] = None,
    data: Annotated[str | None, typer.Option(
        help="Labelled shards, or a folder with one sub-folder per class.", show_default=False)] = None,
    output: Annotated[str | None, typer.Option(
        help="Folder for metrics.json, confusion.json and confusion.png \\[default: runs/evaluate-<time>].",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = EV.batch_size,
    workers: Annotated[int, typer.Option(help="Data loader processes.")] = EV.workers,
    decode: Decode = EV.decode,
    max_sample_mb: MaxSampleMb = EV.max_sample_mb,
    max_image_pixels: MaxImagePixels = EV.max_image_pixels,
    io_retries: IoRetries = EV.io_retries,
    shard_cache: ShardCache = None,
    shard_cache_size: ShardCacheSize = EV.shard_cache_size,
    crop_pct: Annotated[float | None, typer.Option(
        help="Centre-crop fraction \\[default: the checkpoint's].", show_default=False)] = None,
    device: Device = EV.device,
    precision: Precision = EV.precision,
    force: Annotated[bool, typer.Option("--force", help="Replace an evaluation in --output.")] = False,
    gpus: Annotated[int, typer.Option(help="GPUs on this machine: the samples are split over one process per GPU "
                                           "and the counts summed.")] = EV.gpus,
    nproc: Nproc = EV.nproc,
    master_port: MasterPort = EV.master_port,
) -> None:
    """Top-1/top-5 of a classifier checkpoint, with per-class accuracy and a confusion matrix (JSON and PNG)."""
    import time

    from rich.console import Console
    from rich.table import Table

    from ..commands.evaluate import evaluate as run
    from ..summary import Summary, command

    started = time.perf_counter()
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
    model = result["checkpoint"]
    next_step = (command("simmim", "predict", model, "IMAGES") if str(model).endswith(".onnx")
                 else command("simmim", "export", "--onnx", "--checkpoint", model))
    typer.echo(Summary("evaluate", time.perf_counter() - started, "",
                       [(what, str(result["paths"][key])) for what, key in (
                           ("metrics", "metrics"), ("confusion", "confusion"), ("picture", "confusion_png"))],
                       [next_step]).text())


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
        help="Pretrain checkpoint: this toolkit's, an official SimMIM release, a transformers "
             "Swin/ViTForMaskedImageModeling folder or Hub id (hf-hub:microsoft/swin-base-simmim-window6-192) "
             "\\[default: the newest under runs/].",
        show_default=False)] = None,
    output: Annotated[str, typer.Option(help="PNG panel to write.")] = "recon.png",
    force: Annotated[bool, typer.Option("--force", help="Replace --output and --save-arrays files.")] = False,
    mask_ratio: Annotated[float | None, typer.Option(
        help="Fraction of cells masked \\[default: the checkpoint's, else 0.6].", show_default=False)] = None,
    mask_patch_size: Annotated[int | None, typer.Option(
        help="Masked cell size in pixels \\[default: the checkpoint's, else 32].", show_default=False)] = None,
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
    img_size: Annotated[int | None, typer.Option(help="Input size \\[default: the checkpoint's].",
                                                 show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="At most this many images in the panel.")] = 16,
    show_bands: Annotated[str | None, typer.Option(
        help="The model's channels shown as red, green and blue (or one, in grey), 0-based indices or band names, "
             "each stretched from its 2nd to its 98th percentile \\[default: 8-bit RGB as it is; other data: the "
             "first three channels, or the first in grey].", show_default=False)] = None,
    per_band: Annotated[bool, typer.Option(
        "--per-band", help="Also write one panel per channel, in grey: OUTPUT-band0.png, OUTPUT-band1.png, ...")
    ] = False,
    device: Device = "auto",
    max_sample_mb: MaxSampleMb = EV.max_sample_mb,
    max_image_pixels: MaxImagePixels = EV.max_image_pixels,
) -> None:
    """Reconstruction panels: original | masked input | reconstruction | reconstruction with visible patches."""
    from ..commands.visualize import visualize_recon as run

    result = run(config_from_context(VisualizeConfig, ctx))
    for line in result["notes"]:
        typer.echo(terminal(line), err=True)
    for line in result["skipped"]:
        typer.echo(terminal(f"warning: skipped unreadable {line}"), err=True)
    losses = result["losses"]
    typer.echo(f"wrote {result['output']} ({len(losses)} image(s), mean masked L1 {sum(losses) / len(losses):.4f})"
               + (f" and {result['arrays']}" if result["arrays"] else "")
               + (f"; one panel per band: {', '.join(map(str, result['band_panels']))}" if result["band_panels"]
                  else ""))


KNN_EPILOG = (
    "Examples:\n\n"
    "  simmim knn --pretrained runs/pretrain-X/checkpoint-00012345.pth --data train/ --val-data val/\n\n"
    "  simmim knn --model vit_base_patch16_224 --data train/ --val-data val/   # random-init baseline\n\n"
    "  simmim knn --pretrained ckpt.pth --data train/ --val-data val/ --gpus 8   # features on 8 GPUs\n\n"
    "  simmim knn --pretrained ckpt.pth --data train/ --val-data val/ --layer 8 --pool cls --cache-features --json"
)


@app.command(epilog=KNN_EPILOG)
@handle_errors
def knn(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option(
        help="Labelled shards whose features are the memory bank (e.g. the training split).",
        rich_help_panel=DATA, show_default=False)] = None,
    val_data: Annotated[str | None, typer.Option(
        help="Labelled shards to classify (same class list as --data).", rich_help_panel=DATA,
        show_default=False)] = None,
    crop_pct: CropPct = KN.crop_pct,
    bands: Bands = None,
    mean: Mean = None,
    std: Std = None,
    cache_features: Annotated[bool, typer.Option(
        help="Keep the features on disk and reuse them when encoder, layer, pooling and data match (also "
             "linear-probe's): try other --k and --temperature for free.", rich_help_panel=DATA)] = KN.cache_features,
    cache_dir: Annotated[str | None, typer.Option(
        help="Folder of cached features \\[default: runs/features].", rich_help_panel=DATA, show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", rich_help_panel=DATA)] = KN.batch_size,
    workers: Workers = KN.workers,
    max_sample_mb: MaxSampleMb = KN.max_sample_mb,
    max_image_pixels: MaxImagePixels = KN.max_image_pixels,
    io_retries: IoRetries = KN.io_retries,
    shard_cache: ShardCache = None,
    shard_cache_size: ShardCacheSize = KN.shard_cache_size,
    pretrained: Annotated[str | None, typer.Option(
        help="Encoder checkpoint (simmim, official SimMIM, timm, a transformers folder or hf-hub: id); without it "
             "a randomly initialised encoder is scored, the baseline to compare against.", rich_help_panel=MODEL,
        show_default=False)] = None,
    allow_missing: AllowMissing = False,
    model: ClassifierModel = None,
    model_kwargs: ModelKwargs = None,
    img_size: ClassifierImgSize = None,
    layer: Annotated[int, typer.Option(
        help="Block (ViT/BEiT) or stage (Swin) whose output is used; negative counts from the end.",
        rich_help_panel=MODEL)] = KN.layer,
    pool: Annotated[str, typer.Option(help="mean (patch tokens) | cls (class token, as DINO).",
                                      rich_help_panel=MODEL)] = KN.pool,
    k: Annotated[int, typer.Option("--k", help="Neighbours that vote (at most the memory bank's size).")] = KN.k,
    temperature: Annotated[float, typer.Option(
        help="Each neighbour's vote is exp(cosine similarity / temperature): lower trusts the nearest more.")
    ] = KN.temperature,
    seed: Annotated[int, typer.Option(help="Seed of the random encoder (without --pretrained).")] = KN.seed,
    device: Device = KN.device,
    precision: Precision = KN.precision,
    gpus: Annotated[int, typer.Option(help="GPUs on this machine: the images are split over one process per GPU "
                                           "for the features, which are then gathered.")] = KN.gpus,
    nproc: Nproc = KN.nproc,
    master_port: MasterPort = KN.master_port,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object (top1, top5, k, ...).")] = False,
) -> None:
    """Weighted k-NN accuracy of frozen features (DINO's protocol: cosine similarity, k 20, temperature 0.07):
    no training, a quick measure of what pretraining learned."""
    import json
    import time

    from ..commands.knn import knn as run
    from ..summary import Summary, command

    started = time.perf_counter()
    values = dict(ctx.params)
    values["json"] = values.pop("json_output")
    config = resolve_config(KnnConfig, values, set())
    apply_process_settings(config)
    result = run(config)
    if values["json"]:  # one object, nothing else (it says its seconds)
        typer.echo(json.dumps(result))
        return
    typer.echo(f"k-NN (k {result['k']}, temperature {result['temperature']:g}, layer {result['layer']}, "
               f"{result['pool']} pooling): top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on "
               f"{result['count']} images against a memory bank of {result['bank']}")
    encoder = ["--pretrained", values["pretrained"]] if values["pretrained"] else ["--model", result["model"]]
    data = ["--data", values["data"], "--val-data", values["val_data"]]
    typer.echo(Summary("knn", time.perf_counter() - started, "", next=[
        command("simmim", "linear-probe", *encoder, *data), command("simmim", "finetune", *encoder, *data)]).text())


@app.command(epilog=(
    "Examples:\n\n  simmim export --onnx                                   # the newest finetune run's best.pth\n\n"
    "  simmim export --onnx --checkpoint runs/finetune-X/best.pth --output vit.onnx --fp16\n\n"
    "  simmim export --onnx --checkpoint runs/finetune-X/best.pth --output vit-cpu.onnx --int8\n\n"
    "  simmim export --onnx --checkpoint runs/pretrain-X/checkpoint-00012345.pth --what features\n\n"
    "  simmim export --timm vit-simmim/ --checkpoint runs/pretrain-X/checkpoint-00012345.pth   # the encoder\n\n"
    "  simmim export --timm vit-cls/ --checkpoint runs/finetune-X/best.pth --push-to-hub me/vit-cls\n\n"
    "  simmim export --timm swin-224/ --checkpoint simmim_swin_base_192.pth --img-size 224 --model-kwargs "
    "'{\"window_size\": 7}'\n\n"
    "  simmim export --hf swin-mim/ --checkpoint runs/pretrain-X/checkpoint-00012345.pth  # with the pixel head\n\n"
    "  simmim export --hf vit-cls/ --checkpoint runs/finetune-X/best.pth --push-to-hub me/vit-cls\n\n"
    "  simmim export --consolidate vit-h.pth --checkpoint runs/pretrain-X/checkpoint-00012345.dcp   # one file\n\n"
    "A --timm folder loads with timm.create_model('local-dir:vit-simmim/', pretrained=True), also as a "
    "detection/segmentation backbone (features_only=True); an --hf folder with transformers' "
    "AutoModelForMaskedImageModeling / AutoModelForImageClassification.from_pretrained(DIR) "
    "(docs/hugging-face.md)."))
@handle_errors
def export(
    ctx: typer.Context,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Write an ONNX file.")] = True,
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint to export \\[default: the newest finetune/linear-probe run's best.pth, else the newest "
             "pretrain checkpoint].", show_default=False)] = None,
    what: Annotated[str | None, typer.Option(
        help="classifier (logits) | features (pooled) | reconstruction (images + mask → pixels) "
             "\\[default: classifier for classifier checkpoints, features for pretrain ones].",
        show_default=False)] = None,
    output: Annotated[str | None, typer.Option(help="ONNX file \\[default: <what>.onnx].", show_default=False)] = None,
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
    force: Annotated[bool, typer.Option("--force",
                                        help="Replace existing files (and a --timm or --hf folder's).")] = False,
    timm: Annotated[str | None, typer.Option(
        "--timm", help="Write a folder in timm's hub layout (model.safetensors + config.json + README.md model card): "
        "a pretraining checkpoint's encoder (no head), a fine-tuning checkpoint's whole classifier, a linear "
        "probe's encoder. Load it with timm.create_model('local-dir:DIR', pretrained=True). Without --onnx "
        "given too, no ONNX file is written. A folder that is not empty is refused unless --force.",
        show_default=False)] = None,
    hf: Annotated[str | None, typer.Option(
        "--hf", help="Write a folder in Hugging Face transformers' layout (config.json, model.safetensors, "
        "preprocessor_config.json, README.md): a pretraining checkpoint as SwinForMaskedImageModeling/"
        "ViTForMaskedImageModeling with its pixel head (pretraining can go on with transformers' run_mim.py), a "
        "fine-tuning checkpoint as …ForImageClassification with id2label. Checked before it is written: loaded by "
        "transformers with no missing or unexpected key, outputs within --tolerance of simmim's. A plain ViT or a "
        "Swin V1 only (the BEiT-style ViT and Swin V2: use --timm). Needs pip install \"simmim-cli\\[hf]\".",
        show_default=False)] = None,
    push_to_hub: Annotated[str | None, typer.Option(
        help="Upload the --timm or --hf folder to this Hugging Face Hub repository (user/name). A new repository is "
             "created private (make it public on the Hub); an existing one gets a new commit. Needs "
             "`hf auth login` or HF_TOKEN with write access.",
        show_default=False)] = None,
    img_size: Annotated[int | None, typer.Option(
        help="Input size of the exported model (ONNX, TorchScript, --timm or --hf) \\[default: the checkpoint's]; "
             "position embeddings and relative position tables are resized as finetune resizes them, and the ONNX "
             "metadata or config.json says the new size.",
        show_default=False)] = None,
    model_kwargs: Annotated[str | None, typer.Option(
        help="JSON of timm.create_model arguments that change the exported model, as for finetune: "
             "'{\"window_size\": 7}' for a Swin at another window, usually with --img-size (224 for window 7).",
        show_default=False)] = None,
    consolidate: Annotated[str | None, typer.Option(
        help="Write a sharded checkpoint folder (checkpoint-N.dcp of a --shard-model run) as this one .pth file: "
             "the weights (and EMA) and the run's record, without the optimizer's state (resume from the folder). "
             "Every command reads the folder as it is; this is for other tools. Without --onnx given too, no ONNX "
             "file is written.", show_default=False)] = None,
) -> None:
    """Export a checkpoint to ONNX (dynamic batch, fixed image size, preprocessing in the metadata), verified;
    or as a timm model folder (--timm) for timm and the detection/segmentation frameworks built on it."""
    import time

    from ..commands.export import export as run
    from ..summary import Summary, command

    started = time.perf_counter()
    config = config_from_context(ExportConfig, ctx)
    if (config.timm or config.hf or config.consolidate) and ctx.get_parameter_source("onnx").name in (
            "DEFAULT", "DEFAULT_MAP"):
        config.onnx = False  # --timm/--hf/--consolidate alone write their folder or file only
    result = run(config)
    for note in result["notes"]:
        typer.echo(f"note: {note}", err=True)
    if "timm" in result:
        timm_result = result["timm"]
        folder = timm_result["folder"]
        typer.echo(f"wrote {folder}/: the {timm_result['what']} of {result['checkpoint']} as timm's "
                   f"{timm_result['architecture']}; load it with timm.create_model('local-dir:{folder}', "
                   "pretrained=True)")
        if "pushed" in timm_result:
            typer.echo(f"pushed {folder}/ to the Hub: {timm_result['pushed']}")
    if "hf" in result:
        hf_result = result["hf"]
        folder = hf_result["folder"]
        typer.echo(f"wrote {folder}/: {result['checkpoint']} as transformers' {hf_result['architecture']} "
                   f"(loaded back strictly; max |transformers - simmim| = {hf_result['max_abs_diff']:.2e} on the "
                   f"check photos); load it with {hf_result['architecture']}.from_pretrained('{folder}')")
        if "pushed" in hf_result:
            typer.echo(f"pushed {folder}/ to the Hub: {hf_result['pushed']}")
    if config.consolidate:
        typer.echo(f"wrote {config.consolidate}: {result['checkpoint']} in one file (weights and the run's record; "
                   "resume from the folder)")
    next_steps = [] if "what" not in result or result["what"] != "classifier" else [
        command("simmim", "predict", path, "IMAGES") for path in result["files"] if path.suffix == ".onnx"][:1]
    done = Summary("export", time.perf_counter() - started, "", [("file", str(path)) for path in result["files"]],
                   next_steps)
    if "what" not in result:
        typer.echo(done.text())
        return
    check = result.get("verification")
    if check:
        agreement = f", top-1 agreement {100 * check['top1_agreement']:.0f}%" if "top1_agreement" in check else ""
        typer.echo(f"verified with onnxruntime ({check['provider']}) on real images: max |onnx - torch| = "
                   f"{check['max_abs_diff']:.2e}, "
                   f"cosine similarity >= {check['min_cosine']:.4f}" + agreement)
    exporter_note = f" (exporter: {result['exporter']})" if "exporter" in result else ""
    onnx_files = [path for path in result["files"] if path.suffix in (".onnx", ".pt")]
    typer.echo(f"wrote {', '.join(map(str, onnx_files))}: {result['what']} of {result['checkpoint']}"
               + exporter_note)
    typer.echo(done.text())


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
    workers: Annotated[int, typer.Option(
        help="Data loader processes that decode and crop the images (0: in this process); the results keep the "
             "input order.")] = PredictConfig().workers,
    provider: Annotated[str, typer.Option(
        help="auto (CUDA when onnxruntime can use it, else CPU with a note) | cuda | tensorrt | cpu. On CUDA and "
             "TensorRT the images stay on the GPU (onnxruntime IO binding).")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    img_size: Annotated[int | None, typer.Option(help="Check the model takes this size.",
                                                 show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many images.", show_default=False)] = None,
    io_retries: IoRetries = PredictConfig().io_retries,
    max_sample_mb: MaxSampleMb = EV.max_sample_mb,
    max_image_pixels: MaxImagePixels = EV.max_image_pixels,
) -> None:
    """Top-k classes of images, with names, from an ONNX model (onnxruntime, GPU when available) or a checkpoint."""
    import json

    from rich.console import Console
    from rich.table import Table

    from ..commands.predict import predict as run

    values = dict(ctx.params)
    values["json"] = values.pop("json_output")
    config = PredictConfig(**values)
    config.validate()
    apply_process_settings(config)
    result = run(config)
    errors = Console(stderr=True)
    for line in result["notes"]:
        errors.print(terminal(line), markup=False, highlight=False)
    for line in result["skipped"]:
        errors.print(terminal(f"warning: skipped unreadable {line}"), markup=False, highlight=False)
    if config.json:
        typer.echo(json.dumps(result["results"], indent=2))
    else:
        runners_up = {1: [], 2: ["top-2"]}.get(config.top_k, [f"top-2 to top-{config.top_k}"])  # what it lists
        table = Table("image", "top-1", "probability", *runners_up)
        for entry in result["results"]:
            # file and class names may hold control characters (ANSI escapes): shown escaped, never interpreted
            others = terminal(", ".join(f"{e['label']} {e['prob']:.2f}" for e in entry["topk"][1:]), newlines=False)
            table.add_row(terminal(entry["image"], newlines=False), terminal(entry["top1"], newlines=False),
                          f"{entry['topk'][0]['prob']:.3f}", *([others] if runners_up else []))
        Console().print(table)
    errors.print(f"{len(result['results'])} image(s) with {result['runtime']}: "
                 f"{result['images_per_second']:.1f} images/s", markup=False, highlight=False)


