"""visualize-recon, ONNX export + onnxruntime parity, predict."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_MODELS
from PIL import Image
from test_weights import official_checkpoint
from typer.testing import CliRunner

from simmim_cli import checkpoints
from simmim_cli.cli import app
from simmim_cli.commands.predict import predict
from simmim_cli.config import FinetuneConfig
from simmim_cli.image_spec import IMAGENET_RGB
from simmim_cli.inference import load_classifier
from simmim_cli.models import build_simmim, make_classifier
from simmim_cli.tasks import save_model_file
from simmim_cli.tool_configs import PredictConfig
from simmim_cli.transforms import CropTransform, decode_image
from simmim_cli.visualize import MIN_TILE
from simmim_cli.weights import load_simmim

runner = CliRunner()
CLASSES = ["cat", "dog", "fish"]


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[-1]


@pytest.fixture(scope="module")
def pretrain_checkpoint(tmp_path_factory) -> Path:
    name, kwargs, size = TINY_MODELS["vit"]
    torch.manual_seed(0)
    model = build_simmim(name, size, kwargs, 0.0)
    path = tmp_path_factory.mktemp("pre") / "checkpoint-00000010.pth"
    checkpoints.save_checkpoint({"kind": "pretrain", "model": model.state_dict(), "step": 10,
                                 "config": {"model": name, "model_kwargs": kwargs, "img_size": size,
                                            "mask_patch_size": 16, "mask_ratio": 0.6}}, path)
    return path


def classifier_checkpoint(folder: Path, family: str) -> Path:
    name, kwargs, size = TINY_MODELS[family]
    if family == "swin":
        kwargs = {**kwargs, "window_size": 4}
    config = FinetuneConfig(data="x", model=name, model_kwargs=kwargs, img_size=size, drop_path=0.0)
    torch.manual_seed(1)
    model = make_classifier(config, len(CLASSES), probe=False)
    path = folder / f"{family}-best.pth"
    save_model_file(path, "finetune", model, config, CLASSES, {"val_top1": 0.0})
    return path


# ---------------------------------------------------------------------------------------------- visualize-recon


def test_the_panel_shows_every_image_in_four_columns(pretrain_checkpoint, photo_folder, tmp_path):
    output = tmp_path / "panel.png"
    result = ok(runner.invoke(app, ["visualize-recon", str(photo_folder), "--checkpoint", str(pretrain_checkpoint),
                                    "--output", str(output), "--limit", "3"]))
    assert "3 image(s)" in result.output
    panel = Image.open(output)
    tile = 32 * -(-MIN_TILE // 32)  # 32-pixel images enlarged to at least MIN_TILE
    assert panel.width == 4 * tile + 5 * 4
    assert panel.height > 3 * tile
    assert runner.invoke(app, ["visualize-recon", str(photo_folder), "--checkpoint", str(pretrain_checkpoint),
                               "--output", str(output)]).exit_code == 2  # no overwriting without --force


def test_same_seed_same_masks_and_the_arrays_are_the_models_output(pretrain_checkpoint, photo_folder, tmp_path):
    def run(seed, name):
        ok(runner.invoke(app, ["visualize-recon", str(photo_folder), "--checkpoint", str(pretrain_checkpoint),
                               "--output", str(tmp_path / f"{name}.png"), "--save-arrays",
                               str(tmp_path / f"{name}.npz"), "--seed", str(seed), "--limit", "4"]))
        return np.load(tmp_path / f"{name}.npz")

    first, again, other = run(7, "a"), run(7, "b"), run(8, "c")
    assert np.array_equal(first["mask"], again["mask"]) and not np.array_equal(first["mask"], other["mask"])
    assert first["mask"].shape == (4, 4, 4) and (first["mask"].reshape(4, -1)[:, ::1].sum(1) == 12).all()
    model, _, _ = load_simmim(pretrain_checkpoint)
    with torch.no_grad():
        loss, reconstruction = model(torch.from_numpy(first["input"]), torch.from_numpy(first["mask"]))
    assert np.allclose(first["reconstruction"], reconstruction.numpy(), atol=1e-6)
    assert first["loss"].shape == (4,) and np.isclose(first["loss"].mean(), loss.item(), rtol=1e-4)


def test_a_given_mask_is_used_for_every_image(pretrain_checkpoint, photo_folder, tmp_path):
    coarse = np.array([[1, 0], [0, 1]], dtype=np.uint8)  # on the 16-pixel mask-patch grid of a 32-pixel image
    np.save(tmp_path / "mask.npy", coarse)
    ok(runner.invoke(app, ["visualize-recon", str(photo_folder), "--checkpoint", str(pretrain_checkpoint),
                           "--mask", str(tmp_path / "mask.npy"), "--output", str(tmp_path / "m.png"),
                           "--save-arrays", str(tmp_path / "m.npz"), "--limit", "2"]))
    expected = coarse.repeat(2, 0).repeat(2, 1).astype(bool)  # model patch 8: 2×2 tokens per cell
    assert all(np.array_equal(mask, expected) for mask in np.load(tmp_path / "m.npz")["mask"])
    np.save(tmp_path / "bad.npy", np.ones((3, 3)))
    assert "3x3" in one_line_error(runner.invoke(app, ["visualize-recon", str(photo_folder), "--checkpoint",
                                                       str(pretrain_checkpoint), "--mask", str(tmp_path / "bad.npy"),
                                                       "--output", str(tmp_path / "n.png")]))


def test_unreadable_images_are_named_and_the_rest_rendered(pretrain_checkpoint, photo_folder, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    good = sorted(photo_folder.glob("*.jpg"))[0]
    result = ok(runner.invoke(app, ["visualize-recon", str(broken), str(good), "--checkpoint",
                                    str(pretrain_checkpoint), "--output", str(tmp_path / "p.png")]))
    assert "skipped unreadable" in result.output and "broken.jpg" in result.output and "1 image(s)" in result.output


def test_official_checkpoints_reconstruct_and_missing_decoders_are_flagged(photo_folder, tmp_path):
    name, kwargs, size = TINY_MODELS["beit"]
    model = build_simmim(name, size, kwargs, 0.0)
    official_checkpoint(tmp_path / "official.pth", model)
    result = ok(runner.invoke(app, ["visualize-recon", str(photo_folder), "--checkpoint",
                                    str(tmp_path / "official.pth"), "--output", str(tmp_path / "o.png"),
                                    "--mask-patch-size", "16", "--limit", "2"]))
    assert "WARNING" not in result.output
    torch.save({"model": {k: v for k, v in torch.load(tmp_path / "official.pth", weights_only=False)["model"].items()
                          if not k.startswith("decoder.")}}, tmp_path / "no_decoder.pth")
    result = ok(runner.invoke(app, ["visualize-recon", str(photo_folder), "--checkpoint",
                                    str(tmp_path / "no_decoder.pth"), "--output", str(tmp_path / "d.png"),
                                    "--mask-patch-size", "16", "--limit", "2"]))
    assert "WARNING" in result.output and "no decoder weights" in result.output


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", ["vit", "beit", "swin"])
@pytest.mark.parametrize("what", ["classifier", "features"])
def test_onnx_export_matches_pytorch(tmp_path, family, what):
    import onnxruntime as ort

    checkpoint = classifier_checkpoint(tmp_path, family)
    output = tmp_path / f"{family}-{what}.onnx"
    result = ok(runner.invoke(app, ["export", "--onnx", "--checkpoint", str(checkpoint), "--what", what,
                                    "--output", str(output)]))
    assert "verified with onnxruntime" in result.output
    model = onnx.load(str(output))
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # a symbolic batch axis
    metadata = {entry.key: json.loads(entry.value) for entry in model.metadata_props}
    assert metadata["what"] == what and metadata["img_size"] == 32 and len(metadata["mean"]) == 3
    assert metadata["class_names"] == (CLASSES if what == "classifier" else [])
    classifier, _, _ = load_classifier(checkpoint)
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = classifier(images) if what == "classifier" else classifier.forward_head(
            classifier.forward_features(images), pre_logits=True)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"images": images.numpy()})[0]
    assert np.abs(actual - expected.numpy()).max() < 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_pretrain_checkpoints_export_features_and_reconstructions(pretrain_checkpoint, tmp_path):
    import onnxruntime as ort

    ok(runner.invoke(app, ["export", "--checkpoint", str(pretrain_checkpoint), "--output", str(tmp_path / "f.onnx")]))
    metadata = {e.key: e.value for e in onnx.load(str(tmp_path / "f.onnx")).metadata_props}
    assert json.loads(metadata["what"]) == "features"
    ok(runner.invoke(app, ["export", "--checkpoint", str(pretrain_checkpoint), "--what", "reconstruction",
                           "--output", str(tmp_path / "r.onnx"), "--torchscript"]))
    model, _, _ = load_simmim(pretrain_checkpoint)
    images, mask = torch.randn(3, 3, 32, 32), (torch.rand(3, 4, 4) < 0.5).float()
    with torch.no_grad():
        expected = model(images, mask)[1]
    session = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})[0]
    assert np.abs(actual - expected.numpy()).max() < 1e-4
    traced = torch.jit.load(str(tmp_path / "r.pt"))
    assert torch.allclose(traced(images, mask), expected, atol=1e-5)


def test_fp16_export_and_overwrite_rules(tmp_path):
    checkpoint = classifier_checkpoint(tmp_path, "vit")
    ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx"), "--fp16"]))
    assert "top-1 agreement 100%" in runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--output",
                                                         str(tmp_path / "m.onnx"), "--fp16", "--force"]).output
    weights = [t for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer if t.dims and len(t.dims) == 2]
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    before = (tmp_path / "m.onnx").read_bytes()
    assert "--force" in one_line_error(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--output",
                                                           str(tmp_path / "m.onnx")]))
    assert (tmp_path / "m.onnx").read_bytes() == before


def test_int8_export_quantizes_the_matmuls_and_predicts(tmp_path, photo_folder):
    checkpoint = classifier_checkpoint(tmp_path, "vit")
    result = ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--int8", "--output",
                                    str(tmp_path / "q.onnx")]))
    assert "top-1 agreement 100%" in result.output
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in model.graph.node)
    metadata = {entry.key: json.loads(entry.value) for entry in model.metadata_props}
    assert metadata["precision"] == "int8" and metadata["class_names"] == CLASSES
    predictions = json.loads(ok(runner.invoke(app, ["predict", str(tmp_path / "q.onnx"),
                                                    str(sorted(photo_folder.glob("*.jpg"))[0]), "--json"])).stdout)
    assert predictions[0]["top1"] in CLASSES
    assert "choose one" in one_line_error(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--int8",
                                                              "--fp16", "--output", str(tmp_path / "x.onnx")]))


def test_a_pretrain_checkpoint_is_not_a_classifier(pretrain_checkpoint, tmp_path):
    line = one_line_error(runner.invoke(app, ["export", "--checkpoint", str(pretrain_checkpoint), "--what",
                                              "classifier", "--output", str(tmp_path / "c.onnx")]))
    assert "not a classifier" in line


# ---------------------------------------------------------------------------------------------- predict


def torch_top1(checkpoint: Path, paths: list[Path]) -> list[str]:
    model, config, classes = load_classifier(checkpoint)
    view = CropTransform(config.img_size, config.crop_pct)
    batch = IMAGENET_RGB.normalize(torch.stack([view(decode_image(p.read_bytes()))["image"] for p in paths]))
    with torch.no_grad():
        return [classes[i] for i in model(batch).argmax(1).tolist()]


def test_predict_agrees_with_pytorch_with_onnx_and_with_the_checkpoint(photo_folder, tmp_path):
    checkpoint = classifier_checkpoint(tmp_path, "swin")
    ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx")]))
    paths = sorted(photo_folder.iterdir())[:6]
    expected = torch_top1(checkpoint, paths)
    for model in (tmp_path / "m.onnx", checkpoint):
        result = ok(runner.invoke(app, ["predict", str(model), *map(str, paths), "--json", "--top-k", "2",
                                        "--batch-size", "4"]))
        predictions = json.loads(result.stdout)
        assert [p["image"] for p in predictions] == list(map(str, paths))
        assert [p["top1"] for p in predictions] == expected
        assert all(len(p["topk"]) == 2 and set(p["topk"][0]) == {"label", "index", "prob"} for p in predictions)
        assert all(p["topk"][0]["prob"] >= p["topk"][1]["prob"] for p in predictions)
    table = ok(runner.invoke(app, ["predict", str(tmp_path / "m.onnx"), str(paths[0])], env={"COLUMNS": "200"}))
    assert "images/s" in table.output and expected[0] in table.output
    assert "top-2 to top-5" in table.output  # the header says what the column lists: the top-1 has its own


def test_predict_errors(photo_folder, tmp_path):
    checkpoint = classifier_checkpoint(tmp_path, "vit")
    ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx")]))
    image = str(sorted(photo_folder.glob("*.jpg"))[0])
    if not torch.cuda.is_available():
        assert "no usable GPU" in one_line_error(runner.invoke(app, ["predict", str(tmp_path / "m.onnx"), image,
                                                                    "--provider", "cuda"]))
    assert "above the 256 images TensorRT engines are built for" in one_line_error(runner.invoke(
        app, ["predict", str(tmp_path / "m.onnx"), image, "--provider", "tensorrt", "--batch-size", "512"]))
    assert "takes 32×32 images" in one_line_error(runner.invoke(app, ["predict", str(tmp_path / "m.onnx"), image,
                                                                      "--img-size", "64"]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    result = ok(runner.invoke(app, ["predict", str(tmp_path / "m.onnx"), str(broken), image, "--json"]))
    assert "skipped unreadable" in result.output and len(json.loads(result.stdout)) == 1


def test_predict_skips_an_image_it_cannot_read(photo_folder, tmp_path, monkeypatch):
    # a file listed but unreadable (permissions, gone from a shared disk) is skipped like one that does not decode
    checkpoint = classifier_checkpoint(tmp_path, "vit")
    ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx")]))
    first, locked, last = sorted(photo_folder.glob("photo*.jpg"))[:3]
    read_bytes = Path.read_bytes

    def refuse_locked(path):
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse_locked)
    run = predict(PredictConfig(model=str(tmp_path / "m.onnx"), images=[str(first), str(locked), str(last)]))
    assert [p["image"] for p in run["results"]] == [str(first), str(last)]
    assert run["skipped"] == [f"{locked}: PermissionError: Permission denied"]


def test_predict_with_loader_workers_keeps_the_input_order_skips_and_notes(photo_folder, tmp_path):
    import webdataset as wds

    checkpoint = classifier_checkpoint(tmp_path, "vit")
    ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx")]))
    broken, small = tmp_path / "broken.jpg", tmp_path / "small.png"
    broken.write_bytes(b"not an image")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(small)
    with wds.TarWriter(str(tmp_path / "mixed.tar")) as shard:  # a shard with a bad sample among good ones
        for index, path in enumerate(sorted(photo_folder.glob("digit*.png"))[:3]):
            shard.write({"__key__": f"s{index}", "png": path.read_bytes()})
            if index == 1:
                shard.write({"__key__": "bad", "jpg": b"garbage"})
    files = sorted(photo_folder.glob("photo*.jpg"), reverse=True)[:7]  # not the order a folder listing gives
    inputs = [*map(str, files[:3]), str(broken), str(small), str(tmp_path / "mixed.tar"), *map(str, files[3:])]
    runs = {workers: predict(PredictConfig(model=str(tmp_path / "m.onnx"), images=inputs, top_k=3, batch_size=2,
                                           workers=workers)) for workers in (0, 2, 3)}
    tar = str(tmp_path / "mixed.tar")
    assert [p["image"] for p in runs[0]["results"]] == [*map(str, files[:3]), str(small), f"{tar}:s0", f"{tar}:s1",
                                                        f"{tar}:s2", *map(str, files[3:])]
    assert [line.split(":")[0] for line in runs[0]["skipped"]] == [str(broken), tar]
    assert runs[0]["skipped"][1].startswith(f"{tar}:bad: ")
    assert runs[0]["skipped"][0] == f"{broken}: UnidentifiedImageError: not an image format PIL reads"
    assert [line for line in runs[0]["notes"] if str(small) in line] == [
        f"note: {small} is 8×8, smaller than the model's 32; it was enlarged"]
    for workers in (2, 3):
        assert runs[workers]["results"] == runs[0]["results"]  # names, order and probabilities
        assert runs[workers]["notes"] == runs[0]["notes"]
        assert runs[workers]["skipped"] == runs[0]["skipped"]
    result = ok(runner.invoke(app, ["predict", str(tmp_path / "m.onnx"), *inputs, "--json", "--workers", "2"]))
    assert [p["image"] for p in json.loads(result.stdout)] == [p["image"] for p in runs[0]["results"]]
    assert "--workers must be >= 0" in one_line_error(runner.invoke(app, ["predict", str(tmp_path / "m.onnx"),
                                                                          inputs[0], "--workers", "-1"]))


def test_onnx_classifier_binds_inputs_of_the_models_type_and_matches_a_plain_run(tmp_path):
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from simmim_cli.inference import OnnxClassifier

    checkpoint = classifier_checkpoint(tmp_path, "vit")
    ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx")]))
    ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "h.onnx"),
                           "--fp16", "--no-verify"]))
    # simmim export --fp16 keeps float32 images and logits; a model converted elsewhere may take float16
    assert ort.InferenceSession(str(tmp_path / "h.onnx")).get_inputs()[0].type == "tensor(float)"
    onnx.save(convert_float_to_float16(onnx.load(str(tmp_path / "m.onnx")), keep_io_types=False),
              str(tmp_path / "h16.onnx"))
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_classifier(checkpoint)[0](images)
    for name, tolerance in (("m", 1e-5), ("h", 5e-3), ("h16", 5e-3)):
        model = OnnxClassifier(tmp_path / f"{name}.onnx", "cpu")
        dtype = torch.float16 if name == "h16" else torch.float32
        assert model.input_type[0] == dtype
        plain = model.session.run(None, {"images": images.to(dtype).numpy()})[0]
        logits = model(images.transpose(2, 3).contiguous().transpose(2, 3))  # not contiguous
        assert logits.dtype == torch.float32 and logits.shape == (5, 3)
        assert torch.equal(logits, torch.from_numpy(plain).float())
        assert (logits - expected).abs().max() < tolerance
        assert model(images[:0]).shape == (0, 3)


def test_tensorrt_options_cache_the_engine_and_profile_the_dynamic_batch(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from simmim_cli.inference import tensorrt_options

    image = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 48, 40])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 48, 40])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "g", [image], [logits])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    options = tensorrt_options(path)
    assert options["trt_profile_min_shapes"] == "images:1x3x48x40"
    assert options["trt_profile_max_shapes"] == "images:256x3x48x40"
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == f"{path}.trt-cache"
