"""simmim embed (Parquet embeddings, resumable, several processes, ONNX) and simmim search (neighbours, contact
sheet, near-duplicates, outliers, map), and that embed's features are knn's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_MODELS, digit_images, digit_labels, free_port, simmim
from PIL import Image
from test_knn import supervised_encoder, write_digit_shards
from typer.testing import CliRunner

from simmim_cli import checkpoints, distributed, embeddings, neighbours
from simmim_cli.cli import app
from simmim_cli.commands.classifier import resolve_classifier
from simmim_cli.embeddings import read_embeddings
from simmim_cli.errors import SimmimError
from simmim_cli.features import data_features
from simmim_cli.models import build_simmim, make_classifier
from simmim_cli.shards import write_shards
from simmim_cli.tool_configs import KnnConfig
from simmim_cli.weights import load_encoder, read_weights

runner = CliRunner()
VIT_NAME, VIT_KWARGS, SIZE = TINY_MODELS["vit"]
MODEL = ["--model", VIT_NAME, "--model-kwargs", json.dumps(VIT_KWARGS), "--img-size", str(SIZE)]


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """Labelled digit shards: 120 images in 6 shards of 20 (train), and 60 others (val)."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = digit_images(180, SIZE), digit_labels(180)
    for split, part in {"train": range(120), "val": range(120, 180)}.items():
        for index in part:
            folder = root / "images" / split / f"digit{labels[index]}"
            folder.mkdir(parents=True, exist_ok=True)
            images[index].save(folder / f"{index}.png")
        write_shards(root / "images" / split, root / split, maxcount=20, split=split)
    return {"train": root / "train", "val": root / "val", "images": root / "images"}


@pytest.fixture(scope="module")
def pretrain_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_simmim(VIT_NAME, SIZE, VIT_KWARGS, 0.0)
    path = tmp_path_factory.mktemp("pre") / "checkpoint-00000010.pth"
    checkpoints.save_checkpoint({"kind": "pretrain", "model": model.state_dict(), "step": 10,
                                 "config": {"model": VIT_NAME, "model_kwargs": VIT_KWARGS, "img_size": SIZE,
                                            "mask_patch_size": 16, "mask_ratio": 0.6}}, path)
    return path


def embed(*args: str):
    return runner.invoke(app, ["embed", "--workers", "0", *args])


# ---------------------------------------------------------------------------------------------- embed


@pytest.mark.parametrize(("layer", "pool"), [("-1", "mean"), ("0", "cls")])
def test_embeddings_are_the_features_knn_and_linear_probe_use(digits, pretrain_checkpoint, tmp_path, layer, pool):
    output = tmp_path / "e.parquet"
    ok(embed("--pretrained", str(pretrain_checkpoint), "--data", str(digits["train"]), "--output", str(output),
             "--layer", layer, "--pool", pool))
    table = read_embeddings(output)
    # knn's and linear-probe's way: the probe model of the checkpoint, features of the same centre crops
    config = KnnConfig(data=str(digits["train"]), val_data=str(digits["val"]), pretrained=str(pretrain_checkpoint),
                       layer=int(layer), pool=pool, workers=0)
    resolve_classifier(config, keep_pretrain_architecture=True)
    model = make_classifier(config, 10, probe=True)
    load_encoder(model.backbone, read_weights(pretrain_checkpoint))
    features, labels = data_features(model.eval().features, config, config.data, distributed.Context(),
                                     [f"digit{i}" for i in range(10)])
    assert table.vectors.shape == features.shape == (120, 32)
    assert torch.equal(table.vectors, features)  # the same numbers, not merely close
    assert table.labels == [f"digit{int(i)}" for i in labels]
    assert len(set(table.keys)) == 120 and all(Path(s).is_file() for s in table.sources)
    metadata = table.metadata
    assert metadata["layer"] == int(layer) and metadata["pool"] == pool and metadata["dim"] == 32
    assert metadata["model"]["name"] == VIT_NAME and metadata["model"]["pretrained"] == str(pretrain_checkpoint)
    assert metadata["preprocessing"]["img_size"] == SIZE and metadata["preprocessing"]["crop_pct"] == 0.875
    assert metadata["classes"] == [f"digit{i}" for i in range(10)]
    assert not (tmp_path / "e.parquet.parts").exists()


def test_the_file_is_plain_parquet_with_fixed_size_float32_vectors(digits, tmp_path):
    output = tmp_path / "plain.parquet"
    ok(embed(*MODEL, "--data", str(digits["val"]), "--output", str(output)))
    schema = pq.read_schema(output)
    assert schema.names == ["key", "source", "label", "embedding"]
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[32]"
    assert {"simmim:model", "simmim:layer", "simmim:pool", "simmim:preprocessing"} <= {
        k.decode() for k in schema.metadata}
    assert pq.read_table(output).num_rows == 60


def test_an_unlabelled_folder_is_embedded_without_labels(photo_folder, tmp_path):
    output = tmp_path / "photos.parquet"
    result = ok(embed(*MODEL, "--data", str(photo_folder), "--output", str(output)))
    assert "done: embed in" in result.output and "embeddings of width 32" in result.output
    assert f"embeddings  {output}" in result.output and f"simmim search {output} --map map.png" in result.output
    table = read_embeddings(output)
    assert len(table) == len(list(photo_folder.iterdir())) and set(table.labels) == {None}
    assert table.metadata["classes"] is None and table.metadata["model"]["seed"] == 0


def test_an_onnx_export_embeds_like_its_checkpoint(digits, pretrain_checkpoint, tmp_path):
    onnx_file = tmp_path / "features.onnx"
    ok(runner.invoke(app, ["export", "--checkpoint", str(pretrain_checkpoint), "--what", "features",
                           "--output", str(onnx_file)]))
    ok(embed("--pretrained", str(onnx_file), "--data", str(digits["val"]), "--output", str(tmp_path / "o.parquet"),
             "--device", "cpu"))
    # the export's metadata says crop 1.0 for a pretraining checkpoint; the checkpoint is embedded with the same
    ok(embed("--pretrained", str(pretrain_checkpoint), "--data", str(digits["val"]), "--output",
             str(tmp_path / "c.parquet"), "--crop-pct", "1", "--precision", "fp32"))
    from_onnx, from_checkpoint = read_embeddings(tmp_path / "o.parquet"), read_embeddings(tmp_path / "c.parquet")
    assert from_onnx.keys == from_checkpoint.keys
    assert (from_onnx.vectors - from_checkpoint.vectors).abs().max() < 1e-4
    assert from_onnx.metadata["model"]["onnx"] and from_onnx.metadata["layer"] is None
    error = one_line_error(embed("--pretrained", str(onnx_file), "--data", str(digits["val"]), "--layer", "0"))
    assert "drop --model" in error


def test_a_stopped_embed_continues_where_it_stopped_and_writes_nothing_twice(digits, tmp_path, monkeypatch):
    whole = tmp_path / "whole.parquet"
    ok(embed(*MODEL, "--data", str(digits["train"]), "--output", str(whole), "--batch-size", "7"))
    output = tmp_path / "e.parquet"
    written = []
    real_write = embeddings.write_part

    def stop_after_two(path, *args):
        if len(written) == 2:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the third shard
        real_write(path, *args)
        written.append(path.name)

    monkeypatch.setattr("simmim_cli.commands.embed.write_part", stop_after_two)
    stopped = embed(*MODEL, "--data", str(digits["train"]), "--output", str(output), "--batch-size", "7")
    assert stopped.exit_code == 130 and not output.exists()
    parts = tmp_path / "e.parquet.parts"
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == sorted(written) and len(written) == 2
    assert not list(parts.glob(".*.tmp"))  # the interrupted part left nothing half written
    # other settings do not continue this run
    error = one_line_error(embed(*MODEL, "--data", str(digits["train"]), "--output", str(output), "--layer", "0"))
    assert "holds an unfinished embedding made with other settings (layer)" in error
    monkeypatch.setattr("simmim_cli.commands.embed.write_part", real_write)
    (parts / ".part-000005.parquet.tmp").write_bytes(b"half a part")  # as a write killed with kill -9 leaves it
    resumed = ok(embed(*MODEL, "--data", str(digits["train"]), "--output", str(output), "--batch-size", "7",
                       "--force"))  # the same settings: --force continues too
    assert "continuing" in resumed.output and "2 of 6 shard(s)" in resumed.output
    assert "120 embeddings" in resumed.output and "80 embedded now" in resumed.output
    table, reference = read_embeddings(output), read_embeddings(whole)
    assert len(table.keys) == len(set(table.keys)) == 120
    assert table.keys == reference.keys and torch.equal(table.vectors, reference.vectors)
    assert not parts.exists()
    assert "already exists" in one_line_error(embed(*MODEL, "--data", str(digits["train"]), "--output", str(output)))
    # --force replaces the output and discards the parts of a stopped run of other settings
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"layer": 1}))
    real_write(parts / "part-000000.parquet", ["stale"], ["x"], [None], np.zeros((1, 32), np.float32), 32)
    ok(embed(*MODEL, "--data", str(digits["val"]), "--output", str(output), "--force"))
    replaced = read_embeddings(output)
    assert len(replaced) == 60 and "stale" not in replaced.keys


@pytest.mark.slow
def test_two_processes_write_the_same_file_as_one(digits, tmp_path):
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    ok(embed(*MODEL, "--data", str(digits["train"]), "--output", str(one)))
    result = simmim("embed", *MODEL, "--data", str(digits["train"]), "--output", str(two), "--workers", "1",
                    "--nproc", "2", "--device", "cpu", "--master-port", str(free_port()))
    assert result.returncode == 0, result.stderr
    first, second = read_embeddings(one), read_embeddings(two)
    assert first.keys == second.keys and first.labels == second.labels
    assert torch.allclose(first.vectors, second.vectors, atol=1e-5)


@pytest.mark.gpu
def test_on_a_gpu_the_embeddings_and_neighbours_are_the_cpus(digits, tmp_path):
    # the GPU path copies each batch's vectors out while the next one computes
    for device in ("cpu", "cuda"):
        ok(embed(*MODEL, "--data", str(digits["train"]), "--output", str(tmp_path / f"{device}.parquet"),
                 "--device", device, "--precision", "fp32", "--batch-size", "16"))
    on_cpu, on_gpu = read_embeddings(tmp_path / "cpu.parquet"), read_embeddings(tmp_path / "cuda.parquet")
    assert on_cpu.keys == on_gpu.keys and torch.allclose(on_cpu.vectors, on_gpu.vectors, atol=1e-3)
    _, cpu_rows = neighbours.all_nearest(on_cpu.vectors, 3, "cpu")
    _, gpu_rows = neighbours.all_nearest(on_cpu.vectors, 3, "cuda")
    assert torch.equal(cpu_rows, gpu_rows)


@pytest.mark.parametrize(("extra", "message"), [
    (["--output", "x.csv"], "give a .parquet file name"),
    (["--pool", "max"], "--pool must be mean or cls"),
    (["--layer", "9"], "--layer 9 is out of range"),
])
def test_embed_bad_input_is_one_line(digits, tmp_path, extra, message):
    args = [*MODEL, "--data", str(digits["val"]), "--output", str(tmp_path / "x.parquet"), *extra]
    assert message in one_line_error(embed(*args))


def test_without_pyarrow_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(SimmimError, match=r'pip install "simmim-cli\[embed\]"'):
        embeddings.require_pyarrow()


def test_stored_sources_carry_no_credentials():
    assert embeddings.public_url("s3://key:secret@bucket/a.tar") == "s3://bucket/a.tar"
    assert embeddings.public_url("https://host/x/a.tar?X-Amz-Signature=abc") == "https://host/x/a.tar"
    assert embeddings.public_url("/data/shards/a.tar") == "/data/shards/a.tar"


# ---------------------------------------------------------------------------------------------- neighbours


def test_chunked_exact_search_equals_one_matrix_product(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=generator), torch.randn(7, 16, generator=generator)
    expected = (torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T).topk(5)
    monkeypatch.setattr(neighbours, "CHUNK_ELEMENTS", 600)  # two queries per chunk
    similarity, index = neighbours.nearest(queries, bank, 5)
    assert torch.equal(index, expected.indices) and torch.allclose(similarity, expected.values)
    exclude = expected.indices[:, 0]  # each query's nearest row left out: the next five
    _, without = neighbours.nearest(queries, bank, 5, exclude)
    assert torch.equal(without[:, :4], expected.indices[:, 1:])


def test_faiss_gives_the_exact_search_its_neighbours():
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(500, 24, generator=generator)
    exact = neighbours.all_nearest(bank, 6, backend="exact")
    with_faiss = neighbours.all_nearest(bank, 6, backend="faiss")
    assert torch.equal(exact[1], with_faiss[1]) and torch.allclose(exact[0], with_faiss[0], atol=1e-5)


def test_duplicate_groups_are_connected_components_above_the_threshold(monkeypatch):
    monkeypatch.setattr(neighbours, "CHUNK_ELEMENTS", 40)  # several chunks of rows
    base = torch.eye(8)[:6]  # six orthogonal rows
    rows = torch.cat([base, base[[1]], base[[1]] + 0.01 * base[[2]], base[[4]] * 3])  # 6: copy of 1, 7: near 1
    assert neighbours.duplicate_groups(rows, 0.999) == [[1, 6, 7], [4, 8]]
    assert neighbours.duplicate_groups(rows, 1.0) == [[1, 6], [4, 8]]  # exact copies, whatever their length
    monkeypatch.setattr(neighbours, "MAX_DUPLICATE_PAIRS", 2)
    with pytest.raises(SimmimError, match="raise --duplicates"):
        neighbours.duplicate_groups(rows, 0.999)


def test_outliers_are_the_rows_farthest_from_their_neighbours():
    generator = torch.Generator().manual_seed(0)
    cluster = torch.tensor([1.0, 0, 0]) + 0.05 * torch.randn(20, 3, generator=generator)
    rows = torch.cat([cluster[:10], torch.tensor([[0.0, 0, 1]]), cluster[10:], torch.tensor([[0.0, 1, 0]])])
    found, score = neighbours.outliers(rows, 2, k=3)
    assert sorted(found.tolist()) == [10, 21] and (score < 0.5).all()


# ---------------------------------------------------------------------------------------------- search


@pytest.fixture(scope="module")
def digit_embeddings(digits, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("search") / "digits.parquet"
    ok(embed(*MODEL, "--data", str(digits["train"]), "--output", str(output)))
    return output


def test_search_by_key_and_by_image_file(digit_embeddings, digits, tmp_path):
    table = read_embeddings(digit_embeddings)
    key = table.keys[5]  # e.g. digit3/17: the image file of the same sample is in the images folder
    result = ok(runner.invoke(app, ["search", str(digit_embeddings), key, str(digits["images"] / "train" /
                                                                            f"{key}.png"), "--k", "4", "--json"]))
    by_key, by_file = json.loads(result.output)["results"]
    assert by_key["query"] == key and len(by_key["neighbours"]) == 4
    assert key not in [n["key"] for n in by_key["neighbours"]]  # a key's own row is left out
    vectors = torch.nn.functional.normalize(table.vectors, dim=1)
    expected = (vectors @ vectors[5]).topk(5).indices[1:].tolist()
    assert [n["index"] for n in by_key["neighbours"]] == expected
    # the image file is embedded the way embed did it: its own row comes first, with similarity 1
    assert by_file["neighbours"][0]["key"] == key and by_file["neighbours"][0]["similarity"] > 0.9999
    assert [n["key"] for n in by_file["neighbours"][1:]] == [n["key"] for n in by_key["neighbours"][:3]]
    text = ok(runner.invoke(app, ["search", str(digit_embeddings), key, "--k", "3"]))
    assert f"nearest to {key}" in text.output and "similarity" in text.output


def test_the_contact_sheet_shows_each_query_and_its_neighbours(digit_embeddings, tmp_path):
    table = read_embeddings(digit_embeddings)
    sheet = tmp_path / "sheet.png"
    ok(runner.invoke(app, ["search", str(digit_embeddings), table.keys[0], table.keys[1], "--k", "5",
                           "--sheet", str(sheet)]))
    from simmim_cli.visualize import SHEET_TILE

    image = Image.open(sheet)
    assert image.width >= 6 * SHEET_TILE and image.height >= 2 * SHEET_TILE
    pixels = np.asarray(image.convert("RGB"))
    grey = (pixels == 200).all(axis=2).sum()  # the colour of a tile whose image could not be read
    assert grey < SHEET_TILE * SHEET_TILE / 4  # every image was read back from its shard
    assert "already exists" in one_line_error(runner.invoke(app, ["search", str(digit_embeddings), table.keys[0],
                                                                  "--sheet", str(sheet)]))


@pytest.mark.parametrize(("args", "message"), [
    ([], "search does one thing at a time"),
    (["nothing/here"], "is neither a key of"),
    (["--duplicates", "1.5"], "--duplicates takes a cosine similarity in (0, 1]"),
    (["--map", "map.jpg"], "give a .png file name"),
    (["--outliers", "3", "--backend", "fast"], "--backend must be one of auto, exact, faiss"),
])
def test_search_bad_input_is_one_line(digit_embeddings, args, message):
    assert message in one_line_error(runner.invoke(app, ["search", str(digit_embeddings), *args]))


def test_search_of_a_file_that_is_not_embeddings(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    assert "is not a Parquet file" in one_line_error(runner.invoke(app, ["search", str(tmp_path / "x.parquet"),
                                                                         "--outliers", "2"]))


def scene(seed: int) -> Image.Image:
    """A 48-pixel picture of four random shapes on a random background: each seed a clearly different image."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        (left, top), (width, height) = rng.integers(0, 40, 2), rng.integers(8, 30, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape((int(left), int(top), int(left + width), int(top + height)), fill=colour)
    return image


def test_planted_duplicates_are_all_found_and_nothing_else(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    images = [scene(seed) for seed in range(80)]
    for index, image in enumerate(images):
        image.save(folder / f"d{index:03d}.png")
    images[3].save(folder / "z003-copy.png")
    images[17].save(folder / "z017-copy.png")
    images[17].save(folder / "z017-second-copy.png")  # a group of three
    images[40].save(folder / "z040-copy.jpg", quality=95)  # re-encoded
    Image.fromarray(np.clip(np.asarray(images[61]).astype(int) + 6, 0, 255).astype(np.uint8)).save(
        folder / "z061-copy.png")  # a little brighter
    output = tmp_path / "e.parquet"
    # measured with this encoder: planted pairs >= 0.9937 (the brighter one), different scenes <= 0.9890
    ok(embed(*MODEL, "--data", str(folder), "--output", str(output), "--precision", "fp32"))
    result = json.loads(ok(runner.invoke(app, ["search", str(output), "--duplicates", "0.992", "--json"])).output)
    groups = [sorted(row["key"] for row in group) for group in result["groups"]]
    assert sorted(groups) == sorted([["d003", "z003-copy"], ["d017", "z017-copy", "z017-second-copy"],
                                     ["d040", "z040-copy"], ["d061", "z061-copy"]])
    text = ok(runner.invoke(app, ["search", str(output), "--duplicates", "0.992"]))
    assert "4 group(s) of near-duplicates" in text.output
    none = ok(runner.invoke(app, ["search", str(output), "--duplicates", "1"]))  # exact copies only
    assert "2 group(s)" in none.output


def test_outliers_of_a_set_find_the_odd_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(digit_images(60, SIZE)):
        image.save(folder / f"d{index:03d}.png")
    rng = np.random.default_rng(0)
    for index in range(2):  # noise among digits
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"noise{index}.png")
    output = tmp_path / "e.parquet"
    ok(embed(*MODEL, "--data", str(folder), "--output", str(output)))
    result = json.loads(ok(runner.invoke(app, ["search", str(output), "--outliers", "2", "--k", "5", "--json"])).output)
    assert sorted(row["key"] for row in result["outliers"]) == ["noise0", "noise1"]


def test_the_map_colours_each_label_and_draws_thumbnails(digit_embeddings, tmp_path):
    picture = tmp_path / "map.png"
    result = json.loads(ok(runner.invoke(app, ["search", str(digit_embeddings), "--map", str(picture),
                                               "--projection", "pca", "--thumbnails", "12", "--json"])).output)
    assert result["colour_by"] == "label" and result["categories"] == 10 and result["projection"].startswith("PCA")
    assert 3 <= result["thumbnails"] <= 12  # as many as fit without covering each other
    image = np.asarray(Image.open(picture).convert("RGB"))
    assert image.shape[0] >= 800 and image.shape[1] >= 1000
    from matplotlib import colormaps

    for colour in colormaps["tab10"].colors:  # every label's colour is on the picture (dots at alpha 0.75 on white)
        target = (0.75 * np.array(colour) + 0.25) * 255
        assert (np.abs(image - target).max(axis=2) < 12).sum() > 20, colour
    by_source = ok(runner.invoke(app, ["search", str(digit_embeddings), "--map", str(picture), "--force",
                                       "--color-by", "source", "--thumbnails", "0"]))
    assert "coloured by source shard (6 kinds)" in by_source.output


@pytest.mark.slow
def test_neighbours_of_held_out_digits_share_their_class_more_with_a_trained_encoder(tmp_path):
    # the memory bank: 500 digits embedded; the queries: 100 other digits, as image files
    shards = write_digit_shards(tmp_path, {"train": range(500), "val": range(1000, 1100)})
    queries = sorted(str(path) for path in (tmp_path / "images" / "val").rglob("*.png"))
    trained = supervised_encoder(tmp_path / "vit.pth", 500)
    agreement = {}
    for name, encoder in {"random": MODEL, "trained": ["--pretrained", str(trained)]}.items():
        output = tmp_path / f"{name}.parquet"
        ok(embed(*encoder, "--data", str(shards["train"]), "--output", str(output), "--crop-pct", "1"))
        result = json.loads(ok(runner.invoke(app, ["search", str(output), *queries, "--k", "5", "--json"])).output)
        same = [n["label"] == Path(entry["query"]).parent.name for entry in result["results"]
                for n in entry["neighbours"]]
        agreement[name] = sum(same) / len(same)
    print(f"same-class share of the 5 nearest: {agreement}")
    assert agreement["trained"] > agreement["random"] + 0.05, agreement
