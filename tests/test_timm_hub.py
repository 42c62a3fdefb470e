"""simmim export --timm: timm's hub layout, loaded strictly by timm.create_model with the checkpoint's tensors."""

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_MODELS
from safetensors.torch import load_file
from test_export import CLASSES, classifier_checkpoint, ok, one_line_error
from test_weights import official_checkpoint
from typer.testing import CliRunner

from simmim_cli import checkpoints
from simmim_cli.cli import app
from simmim_cli.image_spec import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from simmim_cli.inference import load_classifier
from simmim_cli.models import build_simmim

runner = CliRunner()


def pretrain_checkpoint(folder: Path, family: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A pretrain checkpoint of a tiny encoder; returns it with the encoder's own tensors."""
    name, kwargs, size = TINY_MODELS[family]
    torch.manual_seed(0)
    model = build_simmim(name, size, kwargs, 0.0)
    path = folder / f"{family}-pretrain.pth"
    checkpoints.save_checkpoint({"kind": "pretrain", "model": model.state_dict(), "step": 10,
                                 "config": {"model": name, "model_kwargs": kwargs, "img_size": size}}, path)
    return path, model.encoder.backbone.state_dict()


def export_timm(checkpoint: Path, folder: Path, *extra: str):
    return ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--timm", str(folder), *extra]))


def load_both_ways(folder: Path) -> list[torch.nn.Module]:
    """timm's two ways to load the folder: local-dir:, and the architecture with the weights file overlaid."""
    config = json.loads((folder / "config.json").read_text())
    overlay = dict(file=str(folder / "model.safetensors"), num_classes=config["num_classes"])
    return [timm.create_model(f"local-dir:{folder}", pretrained=True),
            timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                              **config["model_args"])]


def assert_holds_exactly(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor of the model is the expected one, and nothing is left over or missing (a strict load)."""
    state = model.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[key], expected[key]) for key in state), \
        [key for key in state if not torch.equal(state[key], expected[key])]


@pytest.mark.parametrize("family", ["vit", "beit", "swin"])
def test_a_pretrain_encoder_loads_in_timm_with_the_checkpoints_tensors(tmp_path, family):
    checkpoint, encoder = pretrain_checkpoint(tmp_path, family)
    result = export_timm(checkpoint, tmp_path / "out")
    assert "local-dir:" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not list(tmp_path.glob("*.onnx"))  # --timm alone writes no ONNX file
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert set(saved) == set(encoder) and all(torch.equal(saved[k], encoder[k]) for k in saved)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    name, kwargs, size = TINY_MODELS[family]
    assert config["architecture"] == name and config["num_classes"] == 0
    assert {k: config["model_args"][k] for k in kwargs} == kwargs
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, size, size] and pretrained_cfg["num_classes"] == 0
    assert pretrained_cfg["mean"] == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert pretrained_cfg["std"] == pytest.approx(IMAGENET_DEFAULT_STD)
    assert "license" not in pretrained_cfg
    for model in load_both_ways(tmp_path / "out"):
        assert_holds_exactly(model, encoder)
        assert model.num_classes == 0
    features = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True, features_only=True,
                                 out_indices=(-1,))  # as a detection/segmentation backbone
    assert features(torch.randn(1, 3, size, size))[-1].shape[0] == 1


@pytest.mark.parametrize("family", ["vit", "beit", "swin"])
def test_a_finetuned_classifier_loads_whole_with_its_class_names(tmp_path, family):
    checkpoint = classifier_checkpoint(tmp_path, family)
    export_timm(checkpoint, tmp_path / "out")
    classifier, train_config, _ = load_classifier(checkpoint)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_classes"] == len(CLASSES) and config["label_names"] == CLASSES
    assert config["pretrained_cfg"]["crop_pct"] == train_config.crop_pct
    images = torch.randn(2, 3, 32, 32)
    for model in load_both_ways(tmp_path / "out"):
        assert_holds_exactly(model, classifier.state_dict())
        with torch.no_grad():
            assert torch.allclose(model.eval()(images), classifier(images), atol=1e-6)


@pytest.mark.parametrize("family", ["beit", "swin"])
def test_official_simmim_checkpoints_are_remapped_as_finetune_remaps_them(tmp_path, family):
    name, kwargs, size = TINY_MODELS[family]
    torch.manual_seed(0)
    model = build_simmim(name, size, kwargs, 0.0)
    official_checkpoint(tmp_path / "official.pth", model, old_swin_layout=family == "swin")
    export_timm(tmp_path / "official.pth", tmp_path / "out")
    for loaded in load_both_ways(tmp_path / "out"):
        assert_holds_exactly(loaded, model.encoder.backbone.state_dict())


def test_the_folder_is_not_overwritten_without_force(tmp_path):
    checkpoint = classifier_checkpoint(tmp_path, "vit")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    line = one_line_error(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--timm",
                                              str(tmp_path / "out")]))
    assert "--force" in line and "not empty" in line
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    export_timm(checkpoint, tmp_path / "out", "--force")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine" and (tmp_path / "out" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]  # no temporary folder left
    assert "--timm" in one_line_error(runner.invoke(app, ["export", "--checkpoint", str(checkpoint),
                                                          "--no-onnx", "--push-to-hub", "me/model"]))
    both = export_timm(checkpoint, tmp_path / "both", "--onnx", "--output", str(tmp_path / "m.onnx"))
    assert (tmp_path / "m.onnx").is_file() and "verified with onnxruntime" in both.output


def test_push_to_hub_uploads_the_exported_folder(tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    class RepoUrl:
        repo_id = "me/vit-cls"

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        seen.update(created=repo_id, private=private, exist_ok=exist_ok)
        return RepoUrl()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        seen.update(repo_id=repo_id, folder=folder_path, files=sorted(p.name for p in Path(folder_path).iterdir()))
        seen["config"] = json.loads((Path(folder_path) / "config.json").read_text())
        return "https://huggingface.co/me/vit-cls/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    checkpoint = classifier_checkpoint(tmp_path, "vit")
    result = export_timm(checkpoint, tmp_path / "out", "--push-to-hub", "me/vit-cls")
    assert "commit/abc" in result.output
    assert seen["created"] == "me/vit-cls" and seen["private"] and seen["exist_ok"]
    assert seen["repo_id"] == "me/vit-cls" and Path(seen["folder"]) == tmp_path / "out"
    assert seen["files"] == ["README.md", "config.json", "model.safetensors"]
    assert seen["config"]["label_names"] == CLASSES

    def refuse(self, *args, **kwargs):
        raise OSError("401 Client Error: Unauthorized")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    line = one_line_error(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--timm",
                                              str(tmp_path / "again"), "--push-to-hub", "me/vit-cls"]))
    assert "Unauthorized" in line and "hf auth login" in line


def test_a_linear_probe_exports_its_encoder_with_a_note(tmp_path):
    from simmim_cli.config import LinearProbeConfig
    from simmim_cli.models import make_classifier
    from simmim_cli.tasks import save_model_file

    name, kwargs, size = TINY_MODELS["swin"]
    config = LinearProbeConfig(data="x", model=name, model_kwargs=kwargs, img_size=size)
    torch.manual_seed(2)
    probe = make_classifier(config, len(CLASSES), probe=True)
    save_model_file(tmp_path / "probe.pth", "linear-probe", probe, config, CLASSES, {})
    result = export_timm(tmp_path / "probe.pth", tmp_path / "out")
    assert "no timm equivalent" in result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_classes"] == 0
    for model in load_both_ways(tmp_path / "out"):
        assert_holds_exactly(model, probe.backbone.state_dict())
