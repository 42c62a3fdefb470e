"""Official-layout checkpoints at another window or image size: checked on the meta device before launch, then
loaded for real, in finetune, linear-probe, visualize-recon and export --timm (issue 12)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import digit_images
from safetensors.torch import load_file
from test_export import CLASSES, classifier_checkpoint, one_line_error
from test_timm_hub import export_timm, load_both_ways
from test_weights import BEIT, SWIN, official_checkpoint
from typer.testing import CliRunner

from simmim_cli.cli import app
from simmim_cli.commands.classifier import resolve_classifier
from simmim_cli.commands.visualize import visualize_recon
from simmim_cli.config import FinetuneConfig, LinearProbeConfig
from simmim_cli.models import build_simmim, make_classifier
from simmim_cli.shards import write_shards
from simmim_cli.tool_configs import VisualizeConfig
from simmim_cli.weights import load_encoder, read_weights

runner = CliRunner()
# Swin: patch 4, two stages; each image size gives a window that tiles both stages' grids
WINDOW_SIZES = {5: 40, 6: 48, 7: 56}


@pytest.fixture(scope="module")
def shards(labelled_folder, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("resize") / "shards"
    write_shards(labelled_folder, output, maxcount=64)
    return output


@pytest.fixture(scope="module")
def swin_window4(tmp_path_factory) -> Path:
    """An official-layout (old Swin code) pretraining checkpoint, window 4 at 32 px, with a constant table per
    head, so that a resized table shows whether it came from the checkpoint."""
    torch.manual_seed(0)
    name, kwargs = SWIN
    model = build_simmim(name, 32, {**kwargs, "window_size": 4}, 0.0)
    with torch.no_grad():
        for stage in model.encoder.backbone.layers:
            for block in stage.blocks:
                table = block.attn.relative_position_bias_table
                table.copy_(torch.arange(1, table.shape[1] + 1, dtype=table.dtype).expand_as(table))
    path = tmp_path_factory.mktemp("official") / "simmim_swin_w4.pth"
    official_checkpoint(path, model, old_swin_layout=True)
    return path


@pytest.fixture(scope="module")
def beit_32(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("official") / "simmim_vit_32.pth"
    official_checkpoint(path, build_simmim(BEIT[0], 32, BEIT[1], 0.0))
    return path


def trains(model: torch.nn.Module, size: int, classes: int = 3) -> None:
    """A forward pass gives finite logits and one optimizer step lowers the loss on a fixed batch."""
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, size, size), torch.arange(4) % classes
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(3):
        logits = model(images)
        assert logits.shape == (4, classes) and torch.isfinite(logits).all()
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("window", sorted(WINDOW_SIZES))
@pytest.mark.parametrize("config_class", [FinetuneConfig, LinearProbeConfig])
def test_official_swin_window_4_loads_at_a_new_window(shards, swin_window4, window, config_class):
    size = WINDOW_SIZES[window]
    probe = config_class is LinearProbeConfig
    config = config_class(data=str(shards), pretrained=str(swin_window4), img_size=size,
                          model_kwargs={"window_size": window})
    resolve_classifier(config, keep_pretrain_architecture=probe)  # the meta-device check before launch
    assert config.model_kwargs["window_size"] == window and config.model_kwargs["embed_dim"] == SWIN[1]["embed_dim"]
    model = make_classifier(config, 3, probe)
    backbone = model.backbone if probe else model
    report = load_encoder(backbone, read_weights(swin_window4))
    assert report.missing == [] and any("resized" in note for note in report.adapted)
    for stage in backbone.layers:
        table = stage.blocks[0].attn.relative_position_bias_table
        assert table.shape[0] == (2 * window - 1) ** 2
        heads = torch.arange(1, table.shape[1] + 1, dtype=table.dtype).expand_as(table)
        assert torch.allclose(table, heads, atol=1e-4)  # interpolated from the checkpoint, not a fresh init
    trains(model, size)


@pytest.mark.parametrize("config_class", [FinetuneConfig, LinearProbeConfig])
def test_official_beit_loads_at_a_new_image_size(shards, beit_32, config_class):
    probe = config_class is LinearProbeConfig
    config = config_class(data=str(shards), pretrained=str(beit_32), img_size=48)
    resolve_classifier(config, keep_pretrain_architecture=probe)
    model = make_classifier(config, 3, probe)
    report = load_encoder(model.backbone if probe else model, read_weights(beit_32))
    assert report.missing == [] and any("resized" in note for note in report.adapted)
    trains(model, 48)


def test_finetune_command_takes_an_official_swin_at_window_7(shards, swin_window4, tmp_path):
    result = runner.invoke(app, ["finetune", "--data", str(shards), "--pretrained", str(swin_window4),
                                 "--img-size", "56", "--model-kwargs", json.dumps({"window_size": 7}),
                                 "--epochs", "1", "--batch-size", "8", "--workers", "0",
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "resized" in result.output and (tmp_path / "run" / "last.pth").is_file()


@pytest.mark.parametrize("window", [5, 7])
def test_visualize_recon_takes_an_official_swin_at_a_new_window(swin_window4, tmp_path, window):
    image = tmp_path / "digit.png"
    digit_images(1, 64)[0].save(image)
    report = visualize_recon(VisualizeConfig(images=[str(image)], checkpoint=str(swin_window4),
                                             output=str(tmp_path / "recon.png"), img_size=WINDOW_SIZES[window],
                                             model_kwargs={"window_size": window}, mask_patch_size=8))
    assert (tmp_path / "recon.png").is_file() and torch.isfinite(torch.tensor(report["losses"])).all()


# ---------------------------------------------------------------------------------------------- export --timm


def export_resized(checkpoint: Path, folder: Path, size: int, model_kwargs: dict | None = None):
    extra = ["--model-kwargs", json.dumps(model_kwargs)] if model_kwargs else []
    return export_timm(checkpoint, folder, "--img-size", str(size), *extra)


def runs_at(model: torch.nn.Module, size: int) -> torch.Tensor:
    with torch.no_grad():
        output = model.eval()(torch.randn(2, 3, size, size))
    assert output.shape[0] == 2 and torch.isfinite(output).all()
    return output


@pytest.mark.parametrize("window", [6, 7])
def test_official_swin_window_4_exports_to_timm_at_a_new_window(swin_window4, tmp_path, window):
    size = WINDOW_SIZES[window]
    result = export_resized(swin_window4, tmp_path / "out", size, {"window_size": window})
    assert "resized" in result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_args"]["window_size"] == window and config["model_args"]["img_size"] in (size, [size, size])
    assert config["pretrained_cfg"]["input_size"] == [3, size, size]
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for model in load_both_ways(tmp_path / "out"):  # rebuilt by timm at the new size, loaded strictly
        assert model.patch_embed.img_size == (size, size)
        for index, stage in enumerate(model.layers):
            table = stage.blocks[0].attn.relative_position_bias_table
            assert table.shape == ((2 * window - 1) ** 2, SWIN[1]["num_heads"][index])  # 7 x 7 rows at window 4
            heads = torch.arange(1, table.shape[1] + 1, dtype=table.dtype).expand_as(table)
            assert torch.allclose(table, heads, atol=1e-4)  # interpolated from the checkpoint, not a fresh init
        assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
        runs_at(model, size)


def test_official_beit_exports_to_timm_at_a_new_image_size(beit_32, tmp_path):
    export_resized(beit_32, tmp_path / "out", 48)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_args"]["img_size"] in (48, [48, 48]) and config["pretrained_cfg"]["input_size"] == [3, 48, 48]
    before = read_weights(beit_32).encoder["rel_pos_bias.relative_position_bias_table"]
    assert before.shape[0] == (2 * 32 // 8 - 1) ** 2 + 3
    for model in load_both_ways(tmp_path / "out"):
        assert model.patch_embed.grid_size == (6, 6)
        table = model.rel_pos_bias.relative_position_bias_table  # the shared table, on the 6 x 6 grid
        assert table.shape == ((2 * 6 - 1) ** 2 + 3, before.shape[1])
        assert torch.equal(table[-3:], before[-3:])  # the class-token rows are carried over as they are
        runs_at(model, 48)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_a_finetuned_classifier_exports_to_timm_at_a_new_size(tmp_path, family):
    checkpoint = classifier_checkpoint(tmp_path, family)  # 32 px; the Swin at window 4
    window = {"window_size": 7} if family == "swin" else None
    result = export_resized(checkpoint, tmp_path / "out", 56, window)
    assert "built at 56 x 56" in result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_args"]["img_size"] in (56, [56, 56]) and config["label_names"] == CLASSES
    for model in load_both_ways(tmp_path / "out"):
        if family == "vit":
            assert model.pos_embed.shape[1] == model.num_prefix_tokens + (56 // 8) ** 2  # from 4 x 4 to 7 x 7
        else:
            assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape[0] == 13 ** 2
        assert runs_at(model, 56).shape == (2, len(CLASSES))



def test_a_linear_probe_exports_its_encoder_to_timm_at_a_new_window(tmp_path):
    from simmim_cli.tasks import save_model_file

    name, kwargs = SWIN
    config = LinearProbeConfig(data="x", model=name, model_kwargs={**kwargs, "window_size": 4}, img_size=32)
    torch.manual_seed(2)
    probe = make_classifier(config, len(CLASSES), probe=True)
    save_model_file(tmp_path / "probe.pth", "linear-probe", probe, config, CLASSES, {})
    export_resized(tmp_path / "probe.pth", tmp_path / "out", 48, {"window_size": 6})
    for model in load_both_ways(tmp_path / "out"):
        assert model.num_classes == 0 and model.layers[1].blocks[0].attn.relative_position_bias_table.shape[0] == 121
        runs_at(model, 48)

@pytest.mark.parametrize("family", ["vit", "swin"])
def test_a_finetuned_classifier_exports_to_onnx_at_a_new_size(tmp_path, family):
    """The same resizing for --onnx: the file takes 56-px images and was verified against PyTorch at 56 px."""
    import onnxruntime as ort

    checkpoint = classifier_checkpoint(tmp_path, family)  # 32 px; the Swin at window 4
    window = ["--model-kwargs", json.dumps({"window_size": 7})] if family == "swin" else []
    output = tmp_path / "m56.onnx"
    result = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--output", str(output), "--img-size",
                                 "56", *window])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output.lower()
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[-2:] == [56, 56]
    images = torch.randn(2, 3, 56, 56).numpy()
    assert session.run(None, {session.get_inputs()[0].name: images})[0].shape == (2, len(CLASSES))


def test_official_swin_features_export_to_onnx_at_a_new_window(swin_window4, tmp_path):
    output = tmp_path / "features.onnx"
    result = runner.invoke(app, ["export", "--checkpoint", str(swin_window4), "--output", str(output), "--what",
                                 "features", "--img-size", "48", "--model-kwargs", json.dumps({"window_size": 6})])
    assert result.exit_code == 0, result.output
    import onnxruntime as ort

    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[-2:] == [48, 48]


def test_sizes_and_windows_that_do_not_fit_are_one_line_errors(beit_32, swin_window4, tmp_path):
    def refused(*options: str) -> str:
        return one_line_error(runner.invoke(app, ["export", "--checkpoint", str(beit_32), "--timm",
                                                  str(tmp_path / "out"), *options]))

    line = refused("--img-size", "50")
    assert "not a multiple of" in line and "patch size 8" in line and "use e.g. 48" in line
    assert "--model-kwargs" in refused("--model-kwargs", json.dumps({"window_size": 7}))  # not a Swin
    assert "--img-size" in refused("--img-size", "0")
    assert not (tmp_path / "out").exists()
    line = one_line_error(runner.invoke(app, ["export", "--checkpoint", str(swin_window4), "--timm",
                                              str(tmp_path / "out"), "--img-size", "42"]))
    assert "patch size 4" in line and "use e.g. 40" in line
