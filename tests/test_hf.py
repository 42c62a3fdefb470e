"""Hugging Face transformers in and out: folders and Hub ids read as transformers computes them, export --hf loaded
strictly by transformers with our outputs. The models are tiny ones transformers builds itself; nothing is
downloaded."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, digit_images, digit_labels, simmim
from test_export import CLASSES, classifier_checkpoint, ok, one_line_error
from test_timm_hub import pretrain_checkpoint
from typer.testing import CliRunner

from simmim_cli.cli import app
from simmim_cli.image_spec import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from simmim_cli.inference import load_classifier
from simmim_cli.models import create_backbone
from simmim_cli.weights import architecture_of, load_encoder, load_simmim, read_weights

transformers = pytest.importorskip("transformers")  # the test extra installs it (simmim-cli[hf])
runner = CliRunner()

# small configs transformers runs (a Swin needs every stage at least one window wide)
SWIN = dict(image_size=128, patch_size=4, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4,
            encoder_stride=32)
# transformers' ViT normalises with layer_norm_eps 1e-12 (timm's with 1e-6): on these random weights that alone would
# make a difference of 1e-3, so the epsilon is carried over
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=64, encoder_stride=8)


def hf_model(kind: str, cls: str, folder: Path, **extra):
    """A randomly initialised transformers model of ``cls`` (e.g. ForMaskedImageModeling), saved to ``folder``."""
    torch.manual_seed(0)
    config_class = transformers.SwinConfig if kind == "swin" else transformers.ViTConfig
    model_class = getattr(transformers, ("Swin" if kind == "swin" else "ViT") + cls)
    model = model_class(config_class(**(SWIN if kind == "swin" else VIT), **extra)).eval()
    model.save_pretrained(str(folder))
    return model


def images_and_mask(size: int, patch: int, count: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(count, 3, size, size, generator=generator)
    mask = torch.rand(count, size // patch, size // patch, generator=generator) < 0.6
    return images, mask


@pytest.mark.parametrize("kind", ["swin", "vit"])
def test_a_transformers_simmim_model_reconstructs_as_transformers_does(tmp_path, kind):
    theirs = hf_model(kind, "ForMaskedImageModeling", tmp_path / "hf")
    ours, weights, _ = load_simmim(tmp_path / "hf")
    assert weights.source == f"Hugging Face {'Swin' if kind == 'swin' else 'ViT'}ForMaskedImageModeling"
    assert weights.decoder and weights.mask_token is not None
    size, patch = theirs.config.image_size, theirs.config.patch_size
    images, mask = images_and_mask(size, patch)
    with torch.no_grad():
        expected = theirs(pixel_values=images, bool_masked_pos=mask.flatten(1))
        loss, reconstruction = ours(images, mask)
    assert reconstruction.shape == expected.reconstruction.shape == images.shape
    assert (reconstruction - expected.reconstruction).abs().max() < 1e-4
    assert abs(float(loss) - float(expected.loss)) < 1e-4
    assert expected.reconstruction.abs().max() > 0.01  # a real comparison, not of two zero maps


def test_transformers_encoders_and_classifiers_give_our_features_and_logits(tmp_path):
    theirs = hf_model("vit", "Model", tmp_path / "vit")  # with its pooler, which SimMIM does not use
    weights = read_weights(tmp_path / "vit")
    name, kwargs, size = architecture_of(weights)
    assert (name, size) == ("vit_base_patch16_224", 32) and kwargs["embed_dim"] == 32 and kwargs["depth"] == 2
    encoder = create_backbone(name, size, kwargs, 0.0).eval()
    report = load_encoder(encoder, weights)
    assert [note for note in report.adapted if "pooler" in note] == [weights.notes[0]]
    images, _ = images_and_mask(32, 8)
    with torch.no_grad():
        assert (encoder.forward_features(images) - theirs(pixel_values=images).last_hidden_state).abs().max() < 1e-4

    labels = {"id2label": {0: "cat", 1: "dog", 2: "eel"}, "label2id": {"cat": 0, "dog": 1, "eel": 2}}
    theirs = hf_model("swin", "ForImageClassification", tmp_path / "swin", **labels)
    weights = read_weights(tmp_path / "swin")
    assert weights.classes == ["cat", "dog", "eel"]
    name, kwargs, size = architecture_of(weights)
    classifier = create_backbone(name, size, kwargs, 0.0, num_classes=3, norm_all_tokens=False).eval()
    assert not load_encoder(classifier, weights).missing
    images, _ = images_and_mask(128, 4)
    with torch.no_grad():
        expected = theirs(pixel_values=images).logits
        assert (classifier(images) - expected).abs().max() < 1e-4 and expected.abs().max() > 1e-3


def test_visualize_recon_uses_the_pixel_head_of_a_transformers_folder(tmp_path, photo_folder):
    hf_model("swin", "ForMaskedImageModeling", tmp_path / "hf")
    result = ok(runner.invoke(app, ["visualize-recon", str(photo_folder), "--checkpoint", str(tmp_path / "hf"),
                                    "--limit", "2", "--output", str(tmp_path / "recon.png"), "--device", "cpu"]))
    assert (tmp_path / "recon.png").is_file() and "no decoder weights" not in result.output


def check_loads_strictly(folder: Path, auto: str):
    model, info = getattr(transformers, auto).from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


@pytest.mark.parametrize("family", ["swin", "vit"])
def test_export_hf_writes_what_transformers_loads_strictly_with_our_outputs(tmp_path, family):
    checkpoint, _ = pretrain_checkpoint(tmp_path, family)
    result = ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--hf", str(tmp_path / "mim")]))
    assert "ForMaskedImageModeling" in result.output and not list(tmp_path.glob("*.onnx"))
    assert sorted(p.name for p in (tmp_path / "mim").iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    theirs = check_loads_strictly(tmp_path / "mim", "AutoModelForMaskedImageModeling")
    ours, _, _ = load_simmim(checkpoint)
    size = TINY_MODELS[family][2]
    images, mask = images_and_mask(size, ours.patch_size)
    with torch.no_grad():
        expected = theirs(pixel_values=images, bool_masked_pos=mask.flatten(1))
        loss, reconstruction = ours(images, mask)
    assert (reconstruction - expected.reconstruction).abs().max() < 1e-4
    assert abs(float(loss) - float(expected.loss)) < 1e-4
    processor = json.loads((tmp_path / "mim" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": size, "width": size}
    assert processor["image_mean"] == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert processor["image_std"] == pytest.approx(IMAGENET_DEFAULT_STD)

    checkpoint = classifier_checkpoint(tmp_path, family)
    ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--hf", str(tmp_path / "cls")]))
    theirs = check_loads_strictly(tmp_path / "cls", "AutoModelForImageClassification")
    assert [theirs.config.id2label[i] for i in range(len(CLASSES))] == CLASSES
    ours, config, _ = load_classifier(checkpoint)
    with torch.no_grad():
        assert (theirs(pixel_values=images).logits - ours(images)).abs().max() < 1e-4
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "cls"))
    assert processor.crop_size == {"height": size, "width": size}
    assert processor.size == {"shortest_edge": int(size / config.crop_pct)}

    # and back: the exported folder is a --pretrained checkpoint like any other, with the same tensors
    back = read_weights(tmp_path / "cls")
    assert all(torch.equal(back.encoder[key], value) for key, value in ours.state_dict().items()
               if not key.endswith("relative_position_index"))


def test_export_hf_refuses_what_transformers_cannot_hold_and_keeps_folders(tmp_path):
    checkpoint, _ = pretrain_checkpoint(tmp_path, "beit")
    line = one_line_error(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--hf", str(tmp_path / "b")]))
    assert "BEiT" in line and "--timm" in line
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp*"))
    checkpoint, _ = pretrain_checkpoint(tmp_path, "swinv2")
    assert "--timm" in one_line_error(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--hf",
                                                          str(tmp_path / "v2")]))
    checkpoint, _ = pretrain_checkpoint(tmp_path, "swin")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    line = one_line_error(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--hf",
                                              str(tmp_path / "mine")]))
    assert "--hf" in line and "--force" in line
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert "one folder" in one_line_error(runner.invoke(app, [
        "export", "--checkpoint", str(checkpoint), "--hf", "a", "--timm", "b", "--push-to-hub", "me/x"]))


def test_finetune_starts_from_a_transformers_folder(tmp_path):
    from simmim_cli import checkpoints
    from simmim_cli.shards import write_shards

    for index, (image, label) in enumerate(zip(digit_images(80, 32), digit_labels(80), strict=True)):
        if label < 2:
            (tmp_path / "images" / f"digit{label}").mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / "images" / f"digit{label}" / f"{index}.png")
    write_shards(tmp_path / "images", tmp_path / "shards", maxcount=16, split="train")
    theirs = hf_model("vit", "ForMaskedImageModeling", tmp_path / "hf")
    result = ok(runner.invoke(app, [
        "finetune", "--pretrained", str(tmp_path / "hf"), "--data", str(tmp_path / "shards"), "--output",
        str(tmp_path / "run"), "--epochs", "2", "--batch-size", "8", "--warmup-epochs", "1", "--workers", "0",
        "--log-every", "1", "--base-lr", "0.01", "--param-groups", "official"]))
    assert f"loaded {tmp_path / 'hf'}" in result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    saved = checkpoints.load_checkpoint(tmp_path / "run" / "last.pth")
    assert saved["config"]["model"] == "vit_base_patch16_224" and saved["config"]["model_kwargs"]["embed_dim"] == 32
    assert saved["config"]["model_kwargs"]["layer_norm_eps"] == 1e-12  # transformers' epsilon, kept
    start = theirs.state_dict()  # trained from transformers' weights: close to them after a few small steps
    key = next(k for k in start if k.endswith("layernorm_before.weight"))
    assert (saved["model"]["blocks.0.norm1.weight"] - start[key]).abs().max() < 0.1

    # and back to transformers, epsilon and all: one command each way
    ok(runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--hf",
                           str(tmp_path / "back")]))
    back = check_loads_strictly(tmp_path / "back", "AutoModelForImageClassification")
    assert back.config.layer_norm_eps == 1e-12 and back.config.id2label == {0: "digit0", 1: "digit1"}
    result = ok(runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--timm",
                                    str(tmp_path / "timm")]))
    assert "epsilon 1e-12" in result.output  # timm's config.json cannot say it: the export tells


def test_a_hub_id_comes_from_the_cache_offline_and_is_one_line_error_otherwise(tmp_path, monkeypatch, photo_folder):
    import huggingface_hub.constants as constants

    # the layout huggingface_hub keeps: refs/main names the snapshot folder of that commit
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-simmim"
    hf_model("vit", "ForMaskedImageModeling", repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, weights, _ = load_simmim("hf-hub:someone/tiny-simmim")
    assert weights.source == "Hugging Face ViTForMaskedImageModeling" and weights.decoder
    line = one_line_error(runner.invoke(app, ["visualize-recon", str(photo_folder), "--checkpoint",
                                              "hf-hub:someone/not-cached", "--output", str(tmp_path / "r.png")]))
    assert "hf-hub:someone/not-cached" in line and "HF_HUB_OFFLINE" in line

    # as a user runs it: a process of its own, nothing reaches the network
    shutil.rmtree(tmp_path / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    hub_id = "hf-hub:microsoft/swin-base-simmim-window6-192"
    result = simmim("visualize-recon", str(photo_folder), "--checkpoint", hub_id, "--output", str(tmp_path / "r.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert hub_id in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_pytorch_model_bin_is_read_like_safetensors(tmp_path):
    from safetensors.torch import load_file

    hf_model("vit", "ForMaskedImageModeling", tmp_path / "hf")
    expected = read_weights(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")  # what older transformers wrote
    (tmp_path / "hf" / "model.safetensors").unlink()
    found = read_weights(tmp_path / "hf")
    assert set(found.encoder) == set(expected.encoder)
    assert all(torch.equal(found.encoder[key], expected.encoder[key]) for key in found.encoder)
    assert torch.equal(found.decoder["0.weight"], expected.decoder["0.weight"])


def test_export_hf_pushes_the_checked_folder(tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    class RepoUrl:
        repo_id = "me/swin-simmim"

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        seen.update(created=repo_id, private=private)
        return RepoUrl()

    def upload_folder(self, repo_id, folder_path, commit_message="", **kwargs):
        seen.update(files=sorted(p.name for p in Path(folder_path).iterdir()), message=commit_message)
        return "https://huggingface.co/me/swin-simmim/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    checkpoint, _ = pretrain_checkpoint(tmp_path, "swin")
    result = ok(runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--hf", str(tmp_path / "out"),
                                    "--push-to-hub", "me/swin-simmim"]))
    assert "commit/abc" in result.output and seen["created"] == "me/swin-simmim" and seen["private"]
    assert seen["files"] == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert "--hf" in seen["message"]
