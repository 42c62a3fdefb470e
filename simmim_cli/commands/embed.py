"""``simmim embed``: one embedding per image of ``--data``, written as Parquet (``embeddings.py``), from the encoder
knn scores (``features.feature_encoder``) or an exported ``.onnx`` feature extractor.

Made to be stopped and started again on sets of millions: each shard's rows go to a part file in
``OUTPUT.parts/`` as soon as the shard is read whole, and a run started again with the same settings embeds only
the shards that have no part yet. At the end the parts are merged, in shard order (the same file for any
number of processes), into ``OUTPUT`` under a temporary name that is then renamed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, distributed, remote, storage
from ..embeddings import merge_parts, public_url, require_pyarrow, write_part
from ..errors import SimmimError
from ..features import embedding_model, feature_batches, weights_stamp
from ..image_spec import ImageSpec
from ..pipeline import EvalStream
from ..precision import resolve_precision
from ..shards import ShardSet, resolve_shards
from ..tool_configs import EmbedConfig, KnnConfig
from ..transforms import CropTransform
from .classifier import resolve_architecture
from .training import prepare_data

PARTS_SUFFIX = ".parts"
MANIFEST = "manifest.json"  # the settings of the unfinished run whose parts the folder holds


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + PARTS_SUFFIX)


def part_path(parts: Path, index: int) -> Path:
    return parts / f"part-{index:06d}.parquet"


@dataclass
class Plan:
    """What this run embeds: the data's shards, and the indices of those without a part yet."""

    metadata: dict[str, Any]
    shards: ShardSet
    todo: list[int]
    done: int


def embed(config: EmbedConfig) -> dict[str, Any]:
    """Embeds every image of ``--data`` once into ``--output``; with ``--gpus N``/``--nproc N`` the shards are
    dealt out to N processes. Returns what was written and measured, for the command line to print."""
    require_pyarrow()
    output = Path(config.output)
    if output.is_dir():
        raise SimmimError(f"--output {output} is a folder; give a .parquet file name")
    if output.exists() and not config.force:
        raise SimmimError(f"{output} already exists; pass --force to replace it, or choose another --output")
    prepare_data(config, "data")
    if config.onnx:
        from ..inference import read_metadata

        if not Path(config.pretrained).is_file():
            raise SimmimError(f"{config.pretrained} not found; give an .onnx file written by simmim export")
        exported = read_metadata(Path(config.pretrained))
        config.img_size = exported.get("img_size")
        config.crop_pct = config.crop_pct or exported.get("crop_pct", 1.0)
        config.image_spec = exported.get("image")  # the channels and normalisation it was exported with
    else:
        # fits the weights on the meta device; the channels and normalisation from the data, as knn takes them
        resolve_architecture(config, 1, True, resolve_shards(config.data).images)
        config.crop_pct = config.crop_pct or KnnConfig.crop_pct
    storage.check_writable(output.absolute().parent)
    if not distributed.needs_launch(config):
        return _embed_process(config)
    distributed.check_devices(config)
    return distributed.launch(_embed_process, config)


def describe(config: EmbedConfig, shards: ShardSet) -> dict[str, Any]:
    """What made the embeddings, for the file's metadata and for telling whether a run may be continued."""
    spec = ImageSpec.from_dict(config.image_spec)
    source = public_url(str(config.pretrained)) if config.pretrained else None
    stamp = weights_stamp(config.pretrained) if config.pretrained else None
    model = {"name": config.model, "kwargs": config.model_kwargs, "pretrained": source, "weights": stamp,
             "seed": None if config.pretrained else config.seed, "onnx": config.onnx}
    return {
        "model": model,
        "layer": None if config.onnx else config.layer,
        "pool": None if config.onnx else config.pool,
        "preprocessing": {"img_size": config.img_size, "crop_pct": config.crop_pct,
                          "resize": "bicubic to img_size / crop_pct, then a centre crop",
                          "image": spec.to_dict(), "precision": config.precision},
        "data": public_url(str(config.data)),
        "num_shards": len(shards.urls),
        "classes": shards.classes,
        "simmim_cli_version": __version__,
    }


def _plan(config: EmbedConfig) -> Plan:
    """Rank 0: the parts folder started, or checked and continued; the shards that are left."""
    output = Path(config.output)
    parts = parts_folder(output)
    shards = resolve_shards(config.data)
    metadata = json.loads(json.dumps(describe(config, shards)))  # as it reads back from JSON
    manifest = parts / MANIFEST
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        changed = sorted(k for k in {*previous, *metadata} - {"simmim_cli_version"}
                         if previous.get(k) != metadata.get(k))
        if changed and not config.force:
            raise SimmimError(f"{parts} holds an unfinished embedding made with other settings ({', '.join(changed)}); "
                              "continue it with the command that started it, or pass --force to start over")
        if changed:  # --force: that run's parts go; a run of these very settings continues, --force or not
            shutil.rmtree(parts)
    if not manifest.is_file():
        if parts.exists() and any(parts.iterdir()):
            raise SimmimError(f"{parts} exists and is not a parts folder of simmim embed; move it away or choose "
                              "another --output")
        with storage.writing(parts):
            parts.mkdir(parents=True, exist_ok=True)
        storage.write_text(manifest, json.dumps(metadata, indent=1))
    storage.remove_stale_temporaries(parts, (".*.tmp",))  # a part whose write was killed is written again
    todo = [i for i in range(len(shards.urls)) if not part_path(parts, i).is_file()]
    done = len(shards.urls) - len(todo)
    if done:
        print(f"note: continuing {output}: {done} of {len(shards.urls)} shard(s) are embedded already (in {parts}); "
              f"embedding the other {len(todo)}", file=sys.stderr)
    return Plan(metadata, shards, todo, done)


def _embed_process(config: EmbedConfig) -> dict[str, Any]:
    """This process's share of the shards left; rank 0 then merges every part into the output."""
    context = distributed.Context() if config.onnx else distributed.setup(config)  # onnxruntime places itself
    try:
        # the precision used is the one recorded (and the one search embeds query images with)
        config.precision = "fp32" if config.onnx else resolve_precision(config.precision, context.device)
        plan = distributed.broadcast_object(_plan(config) if context.is_main else None)
        features_of, dim, device, precision = embedding_model(config, context.device)
        parts = parts_folder(Path(config.output))
        started = time.perf_counter()
        mine = plan.todo[context.rank::context.world_size]
        count, skipped = _embed_shards(features_of, dim, device, precision, config, plan.shards, mine, parts,
                                       show_progress=context.is_main)
        count = int(distributed.all_reduce_sum([float(count)], device)[0])
        skipped = [line for share in distributed.gather_objects(skipped) for line in share]
        seconds = time.perf_counter() - started
        distributed.barrier()
        if not context.is_main:
            return {}
        output = Path(config.output)
        rows = merge_parts([part_path(parts, i) for i in range(len(plan.shards.urls))], output,
                           {**plan.metadata, "dim": dim}, dim)
        shutil.rmtree(parts, ignore_errors=True)
        return {"output": str(output), "rows": rows, "dim": dim, "embedded": count, "resumed_shards": plan.done,
                "shards": len(plan.shards.urls), "skipped": skipped, "seconds": round(seconds, 2),
                "images_per_second": round(count / seconds, 1) if count and seconds else None,
                "model": plan.metadata["model"], "layer": plan.metadata["layer"], "pool": plan.metadata["pool"]}
    finally:
        if not config.onnx:
            distributed.teardown()


def _embed_shards(features_of, dim: int, device, precision: str, config: EmbedConfig, shards: ShardSet,
                  mine: list[int], parts: Path, show_progress: bool) -> tuple[int, list[str]]:
    """Embeds the shards ``mine`` (indices into ``shards``), writing each one's part as soon as it is read whole.
    Returns (images embedded, descriptions of the samples skipped as unreadable)."""
    if not mine:
        return 0, []
    urls = [shards.urls[i] for i in mine]
    known = len(shards.shard_lengths) == len(shards.urls)
    lengths = [shards.shard_lengths[i] for i in mine] if known else []
    subset = ShardSet(urls=urls, num_samples=sum(lengths), classes=shards.classes, shard_lengths=lengths)
    # each loader worker reads whole shards (at most one worker per shard), so it knows when one is done
    spec = ImageSpec.from_dict(config.image_spec)
    stream = EvalStream(subset, CropTransform(config.img_size, config.crop_pct), config.batch_size,
                        workers=min(config.workers, len(urls)), labels=shards.classes is not None,
                        num_classes=shards.num_classes, names=True, decode=spec.image_decoder())
    index_of = dict(zip(urls, mine, strict=True))
    pending: dict[str, tuple[list[str], list[str | None], list[np.ndarray]]] = defaultdict(lambda: ([], [], []))
    classes = shards.classes or []
    count, skipped = 0, []
    from rich.progress import Progress

    with Progress(disable=not (show_progress and sys.stdout.isatty())) as progress:
        task = progress.add_task("embedding", total=sum(lengths) or None)
        for features, batch in feature_batches(features_of, stream, device, precision, spec):
            skipped += batch["skipped"]
            vectors = features.numpy()
            for row, (key, url, label) in enumerate(zip(batch["key"], batch["source"], batch["label"].tolist(),
                                                        strict=True)):
                keys, labels, chunks = pending[url]
                keys.append(key)
                labels.append(classes[label] if label >= 0 else None)
                chunks.append(vectors[row:row + 1])
            for url in batch["done"]:
                keys, labels, chunks = pending.pop(url, ([], [], []))
                stored = public_url(url if remote.is_url(url) else str(Path(url).resolve()))
                write_part(part_path(parts, index_of[url]), keys, [stored] * len(keys), labels,
                           np.concatenate(chunks) if chunks else np.empty((0, dim), np.float32), dim)
                count += len(keys)
            progress.advance(task, len(vectors) + len(batch["skipped"]))
    for line in skipped:
        print(f"warning: skipped unreadable {remote.shown(line)}", file=sys.stderr)
    return count, skipped
