"""``simmim search``: over an embedding file of ``simmim embed``, the nearest neighbours of query images or keys
(a table, and a contact sheet), groups of near-duplicates, outliers, or a map of the whole set."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..embeddings import Embeddings, read_embeddings, read_images
from ..errors import SimmimError
from ..features import embedding_model, weights_stamp
from ..image_spec import ImageSpec
from ..neighbours import duplicate_groups, nearest, outliers, use_faiss
from ..tool_configs import EmbedConfig, SearchConfig


def search(config: SearchConfig) -> dict[str, Any]:
    """Does what ``config`` asks of the file (one thing at a time); returns the results for the command line."""
    for name in ("sheet", "map"):
        target = getattr(config, name)
        if target and Path(target).exists() and not config.force:
            raise SimmimError(f"{target} already exists; pass --force to replace it, or choose another --{name}")
    embeddings = read_embeddings(config.embeddings)
    device = distributed.pick_device(config.device)
    result: dict[str, Any] = {"embeddings": str(embeddings.path), "count": len(embeddings),
                              "backend": "faiss" if use_faiss(config.backend) else "exact"}
    if config.queries:
        result["results"] = _neighbours(config, embeddings, device)
    elif config.duplicates is not None:
        groups = duplicate_groups(embeddings.vectors, config.duplicates, device)
        result.update(threshold=config.duplicates, backend="exact",
                      groups=[[_row(embeddings, i) for i in group] for group in groups])
    elif config.outliers is not None:
        rows, scores = outliers(embeddings.vectors, config.outliers, config.k, device, config.backend)
        result.update(k=config.k, outliers=[{**_row(embeddings, int(i)), "mean_similarity": round(float(s), 4)}
                                            for i, s in zip(rows, scores, strict=True)])
    else:
        from ..embedding_map import draw_map

        result.update(draw_map(embeddings, Path(config.map), config.projection, config.color_by, config.thumbnails))
    return result


def _row(embeddings: Embeddings, index: int) -> dict[str, Any]:
    return {"index": index, "key": embeddings.keys[index], "label": embeddings.labels[index],
            "source": embeddings.sources[index]}


def _neighbours(config: SearchConfig, embeddings: Embeddings, device: torch.device) -> list[dict[str, Any]]:
    """Each query's ``k`` nearest rows; a key's own row is left out. With ``--sheet`` also the contact sheet."""
    names, vectors, own_rows, files = query_vectors(config.queries, embeddings, device)
    similarity, found = nearest(vectors, embeddings.vectors, config.k, torch.tensor(own_rows), device, config.backend)
    results = [{"query": name, "neighbours": [{**_row(embeddings, int(j)), "similarity": round(float(s), 4)}
                                              for s, j in zip(similarity[q], found[q], strict=True)]}
               for q, name in enumerate(names)]
    if config.sheet:
        _write_sheet(Path(config.sheet), embeddings, results, own_rows, files)
    return results


def query_vectors(queries: list[str], embeddings: Embeddings,
                  device: torch.device) -> tuple[list[str], torch.Tensor, list[int], dict[str, Path]]:
    """(names, vectors, own row or -1, image files by name) of the queries, in their order: a key of the file
    takes its row's vector; an image file is embedded by the encoder and preprocessing the file records."""
    rows_of: dict[str, list[int]] = {}
    for index, key in enumerate(embeddings.keys):
        rows_of.setdefault(key, []).append(index)
    own, files = [], {}
    for query in queries:
        if query in rows_of:
            if len(rows_of[query]) > 1:
                raise SimmimError(f"key {query} is in {len(rows_of[query])} shards of {embeddings.path}; query by "
                                  "image file instead")
            own.append(rows_of[query][0])
        elif Path(query).is_file():
            files[query] = Path(query)
            own.append(-1)
        else:
            raise SimmimError(f"{query} is neither a key of {embeddings.path} (keys look like "
                              f"'{embeddings.keys[0]}') nor an image file")
    embedded = iter(embed_files(list(files.values()), embeddings.metadata, device) if files else ())
    vectors = [embeddings.vectors[row] if row >= 0 else next(embedded) for row in own]
    return list(queries), torch.stack(vectors), own, files


def embedding_config(metadata: dict[str, Any], device: str = "auto") -> EmbedConfig:
    """The settings of ``embed`` that wrote a file (from its metadata), to embed more images the same way."""
    model, preprocessing = metadata["model"], metadata["preprocessing"]
    pretrained = model.get("pretrained")
    if pretrained and model.get("weights") and Path(model["weights"][0]).exists():
        if weights_stamp(pretrained) != model["weights"]:
            print(f"warning: {pretrained} has changed since the embeddings were written; query images are "
                  "embedded with it as it is now", file=sys.stderr)
    elif pretrained:
        raise SimmimError(f"query images are embedded by the encoder that wrote the file, {pretrained}, which is "
                          "no longer there; query by key, or embed again")
    return EmbedConfig(data="-", pretrained=pretrained, model=model.get("name"), model_kwargs=model.get("kwargs") or {},
                       img_size=preprocessing["img_size"],
                       layer=-1 if metadata.get("layer") is None else metadata["layer"],
                       pool=metadata.get("pool") or "mean", crop_pct=preprocessing["crop_pct"],
                       seed=model.get("seed") or 0, precision=preprocessing.get("precision", "auto"), device=device,
                       workers=0, image_spec=preprocessing.get("image"))


def embed_files(paths: list[Path], metadata: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Image files embedded as ``embed`` embedded the file's images (same encoder, view and normalisation)."""
    from ..features import feature_batches
    from ..image_inputs import PredictStream, image_sources

    config = embedding_config(metadata, device.type)
    features_of, _, device, precision = embedding_model(config, device)
    spec = ImageSpec.from_dict(config.image_spec)
    stream = PredictStream(image_sources([str(p) for p in paths]), config.img_size, config.crop_pct,
                           batch_size=64, spec=spec)
    vectors = []
    for features, batch in feature_batches(features_of, stream, device, precision, spec):
        for line in batch["skipped"]:
            raise SimmimError(f"query image {line}; give an image file PIL reads")
        vectors.append(features)
    return torch.cat(vectors)


def _write_sheet(path: Path, embeddings: Embeddings, results: list[dict[str, Any]], own_rows: list[int],
                 files: dict[str, Path]) -> None:
    from PIL import Image

    from ..visualize import contact_sheet, picture_of, save_png

    wanted = [(n["source"], n["key"]) for result in results for n in result["neighbours"]]
    wanted += [(embeddings.sources[row], embeddings.keys[row]) for row in own_rows if row >= 0]
    found = read_images(wanted)

    def picture(data: bytes | None) -> Image.Image | None:
        try:
            return picture_of(data) if data is not None else None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None

    rows = []
    for result, row in zip(results, own_rows, strict=True):
        name = result["query"]
        query = (picture(files[name].read_bytes()) if name in files
                 else picture(found.get((embeddings.sources[row], embeddings.keys[row]))))
        neighbours = [(picture(found.get((n["source"], n["key"]))), n["key"], f"{n['similarity']:.3f}")
                      for n in result["neighbours"]]
        rows.append((query, Path(name).name if name in files else name, neighbours))
    save_png(contact_sheet(rows), path)
