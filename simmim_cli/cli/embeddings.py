"""Commands for an encoder without labels: ``embed`` (one vector per image, as Parquet) and ``search`` (neighbours,
near-duplicates, outliers and a map of an embedding file)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import (
    DATA,
    DIST,
    MODEL,
    RUN,
    AllowMissing,
    ClassifierImgSize,
    ClassifierModel,
    Device,
    IoRetries,
    MasterPort,
    MaxImagePixels,
    MaxSampleMb,
    ModelKwargs,
    Nproc,
    Precision,
    ShardCache,
    ShardCacheSize,
    Workers,
)
from ..tool_configs import EmbedConfig, SearchConfig
from .app import app, config_from_context, handle_errors

EM = EmbedConfig()
SE = SearchConfig()
SEARCH = "Search"


@app.command(epilog=(
    "Examples:\n\n"
    "  simmim embed --pretrained runs/pretrain-X/checkpoint-00012345.pth --data photos/ --output photos.parquet\n\n"
    "  simmim embed --pretrained ckpt.pth --data 's3://bucket/shards/' --output all.parquet --gpus 8\n\n"
    "  simmim embed --pretrained features.onnx --data shards/ --output onnx.parquet     # export --what features\n\n"
    "Stopped, the same command continues where it stopped; see docs/embeddings.md."))
@handle_errors
def embed(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option(
        help="Images to embed: a folder (class sub-folders give labels), shards, a brace pattern, a list file or a "
             "remote shard folder.", rich_help_panel=DATA, show_default=False)] = None,
    output: Annotated[str, typer.Option(
        help="Parquet file: one row per image (key, source shard, label, embedding), the encoder and "
             "preprocessing in its metadata. Parts are kept in OUTPUT.parts/ until it is complete.",
        rich_help_panel=DATA)] = EM.output,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace --output, and discard the parts of a stopped run made with other settings (a "
        "stopped run of the same settings continues).",
        rich_help_panel=DATA)] = False,
    crop_pct: Annotated[float | None, typer.Option(
        help="Centre-crop fraction \\[default: 0.875 as knn, or an .onnx file's own].", rich_help_panel=DATA,
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", rich_help_panel=DATA)] = EM.batch_size,
    workers: Workers = EM.workers,
    io_retries: IoRetries = EM.io_retries,
    shard_cache: ShardCache = None,
    shard_cache_size: ShardCacheSize = EM.shard_cache_size,
    pretrained: Annotated[str | None, typer.Option(
        help="Encoder: a checkpoint (simmim, official SimMIM, timm, a transformers folder or hf-hub: id), or an .onnx "
             "file of simmim export --what features; without it a randomly initialised encoder, the baseline.",
        rich_help_panel=MODEL, show_default=False)] = None,
    allow_missing: AllowMissing = False,
    model: ClassifierModel = None,
    model_kwargs: ModelKwargs = None,
    img_size: ClassifierImgSize = None,
    layer: Annotated[int, typer.Option(
        help="Block (ViT/BEiT) or stage (Swin) whose output is the embedding; negative counts from the end.",
        rich_help_panel=MODEL)] = EM.layer,
    pool: Annotated[str, typer.Option(help="mean (patch tokens) | cls (class token).",
                                      rich_help_panel=MODEL)] = EM.pool,
    seed: Annotated[int, typer.Option(help="Seed of the random encoder (without --pretrained).",
                                      rich_help_panel=MODEL)] = EM.seed,
    device: Device = EM.device,
    precision: Precision = EM.precision,
    gpus: Annotated[int, typer.Option(help="GPUs on this machine: the shards are dealt out to one process per GPU.",
                                      rich_help_panel=DIST)] = EM.gpus,
    nproc: Nproc = EM.nproc,
    master_port: MasterPort = EM.master_port,
    max_sample_mb: MaxSampleMb = EM.max_sample_mb,
    max_image_pixels: MaxImagePixels = EM.max_image_pixels,
) -> None:
    """One embedding per image (the encoder's pooled features, as knn uses them), written as Parquet: for
    neighbours, near-duplicates, outliers and a map (simmim search), or your own tools (pandas, FAISS)."""
    import time

    from ..commands.embed import embed as run
    from ..summary import Summary, command

    started = time.perf_counter()
    result = run(config_from_context(EmbedConfig, ctx))
    resumed = f", {result['resumed_shards']} shard(s) from the stopped run" if result["resumed_shards"] else ""
    speed = f" at {result['images_per_second']:.1f} images/s" if result["images_per_second"] else ""
    skipped = f"; {len(result['skipped'])} unreadable image(s) skipped" if result["skipped"] else ""
    output = str(result["output"])
    typer.echo(Summary("embed", time.perf_counter() - started,
                       f"{result['rows']} embeddings of width {result['dim']} ({result['embedded']} embedded now"
                       f"{speed}{resumed}){skipped}", [("embeddings", output)],
                       [command("simmim", "search", output, "--map", "map.png"),
                        command("simmim", "search", output, "--duplicates", "0.95")]).text())


@app.command(epilog=(
    "Examples:\n\n"
    "  simmim search photos.parquet cats/0042 my-photo.jpg --k 8 --sheet neighbours.png\n\n"
    "  simmim search photos.parquet --duplicates 0.97 --json > duplicates.json\n\n"
    "  simmim search photos.parquet --outliers 20\n\n"
    "  simmim search photos.parquet --map map.png"))
@handle_errors
def search(
    ctx: typer.Context,
    embeddings: Annotated[str, typer.Argument(help="A Parquet file written by simmim embed.", show_default=False)],
    queries: Annotated[list[str] | None, typer.Argument(
        help="Keys of the file (e.g. cats/0042) or image files (embedded as the file's images were).",
        show_default=False)] = None,
    k: Annotated[int, typer.Option("--k", help="Neighbours per query; with --outliers, the neighbours a row's score "
                                   "averages over.", rich_help_panel=SEARCH)] = SE.k,
    sheet: Annotated[str | None, typer.Option(
        help="Also draw the queries and their neighbours, with similarities, into this PNG.",
        rich_help_panel=SEARCH, show_default=False)] = None,
    duplicates: Annotated[float | None, typer.Option(
        help="List groups of near-duplicates: images linked by cosine similarity at least this (e.g. 0.95).",
        rich_help_panel=SEARCH, show_default=False)] = None,
    outliers: Annotated[int | None, typer.Option(
        help="List this many images least similar to their --k nearest neighbours.", rich_help_panel=SEARCH,
        show_default=False)] = None,
    map: Annotated[str | None, typer.Option(
        "--map", help="Draw the embeddings in 2-D into this PNG, coloured by label or source, with thumbnails.",
        rich_help_panel=SEARCH, show_default=False)] = None,
    projection: Annotated[str, typer.Option(
        help="auto (UMAP when umap-learn is installed, else PCA) | pca | umap.", rich_help_panel=SEARCH)
    ] = SE.projection,
    color_by: Annotated[str, typer.Option(
        help="auto (label when the file has labels, else source) | label | source.", rich_help_panel=SEARCH)
    ] = SE.color_by,
    thumbnails: Annotated[int, typer.Option(help="Images drawn on the map, spread over it.",
                                            rich_help_panel=SEARCH)] = SE.thumbnails,
    backend: Annotated[str, typer.Option(
        help="auto (FAISS when installed) | exact (matrix products in chunks, on the GPU when there is one) | "
             "faiss. Both are exact: the same neighbours.", rich_help_panel=SEARCH)] = SE.backend,
    device: Device = SE.device,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.",
                                              rich_help_panel=RUN)] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the --sheet or --map file.",
                                        rich_help_panel=RUN)] = False,
) -> None:
    """Nearest neighbours of images or keys in an embedding file, groups of near-duplicates, outliers, or a map."""
    import json

    from rich.console import Console
    from rich.table import Table

    from ..commands.search import search as run
    from ..config import resolve_config

    values = dict(ctx.params)
    values["json"] = values.pop("json_output")
    values["queries"] = values["queries"] or []
    result = run(resolve_config(SearchConfig, values, set()))
    if values["json"]:
        typer.echo(json.dumps(result, indent=1))
        return
    console = Console()
    if "results" in result:
        for entry in result["results"]:
            console.print(f"nearest to {entry['query']}:", markup=False, highlight=False)
            table = Table("#", "key", "label", "similarity", "source")
            for rank, n in enumerate(entry["neighbours"], 1):
                table.add_row(str(rank), n["key"], n["label"] or "", f"{n['similarity']:.4f}", _short(n["source"]))
            console.print(table)
        if sheet:
            console.print(f"wrote {sheet}", markup=False, highlight=False)
    elif "groups" in result:
        found = f"{len(result['groups'])} group(s) of" if result["groups"] else "no"
        console.print(f"{found} near-duplicates (cosine >= {result['threshold']}) among {result['count']} images",
                      markup=False, highlight=False)
        if result["groups"]:
            table = Table("group", "images", "keys")
            for number, group in enumerate(result["groups"], 1):
                keys = ", ".join(row["key"] for row in group[:8]) + (", ..." if len(group) > 8 else "")
                table.add_row(str(number), str(len(group)), keys)
            console.print(table)
    elif "outliers" in result:
        console.print(f"{len(result['outliers'])} outlier(s) among {result['count']} images, least similar to "
                      f"their {result['k']} nearest neighbours first:", markup=False, highlight=False)
        table = Table("#", "key", "label", "mean similarity", "source")
        for rank, row in enumerate(result["outliers"], 1):
            table.add_row(str(rank), row["key"], row["label"] or "", f"{row['mean_similarity']:.4f}",
                          _short(row["source"]))
        console.print(table)
    else:
        console.print(f"wrote {result['map']}: {result['points']} images, {result['projection']}, coloured by "
                      f"{result['colour_by']} ({result['categories']} kinds), {result['thumbnails']} thumbnails",
                      markup=False, highlight=False)


def _short(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1]
