"""Loading pretrained weights: this toolkit's checkpoints, the official SimMIM layout, timm state dicts."""

import sys
import types

import pytest
import torch

from simmim_cli import checkpoints
from simmim_cli.errors import SimmimError
from simmim_cli.models import build_simmim, create_backbone
from simmim_cli.optim import build_optimizer, build_scheduler
from simmim_cli.weights import classifier_kwargs, infer_architecture, load_encoder, read_weights

BEIT = ("beit_base_patch16_224", {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                  "use_abs_pos_emb": False, "use_rel_pos_bias": False,
                                  "use_shared_rel_pos_bias": True, "init_values": 0.1})
SWIN = ("swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]})


def yacs_config():
    """An object of class yacs.config.CfgNode, as the official checkpoints pickle (yacs is not installed)."""
    module = sys.modules.get("yacs.config") or types.ModuleType("yacs.config")
    if not hasattr(module, "CfgNode"):
        class CfgNode(dict):
            pass

        CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
        module.CfgNode = CfgNode
        sys.modules.setdefault("yacs", types.ModuleType("yacs"))
        sys.modules["yacs.config"] = module
    config = module.CfgNode()
    config["MODEL"] = {"TYPE": "vit"}
    return config


def official_checkpoint(path, simmim_model, old_swin_layout=False):
    """The layout of the official SimMIM releases: encoder.* (no .backbone), decoder.0.*, a pickled config."""
    state = {}
    for key, value in simmim_model.state_dict().items():
        key = key.replace("encoder.backbone.", "encoder.")
        state[key] = value
    if old_swin_layout:  # the original Swin code downsamples at the end of a stage, timm at the next one's start
        state = {_old_swin_key(k): v for k, v in state.items()}
    torch.save({"model": state, "config": yacs_config(), "epoch": 799, "optimizer": {"state": {}}}, path)


def _old_swin_key(key):
    parts = key.split(".")
    if len(parts) > 3 and parts[1] == "layers" and parts[3] == "downsample":
        parts[2] = str(int(parts[2]) - 1)
    return ".".join(parts)


def last_block_tokens(model, images):
    """The tokens (or map) out of the last block, before any final norm or pooling."""
    seen = {}
    last = model.blocks[-1] if hasattr(model, "blocks") else model.layers[-1]
    handle = last.register_forward_hook(lambda module, inputs, output: seen.setdefault("x", output))
    with torch.no_grad():
        model.forward_features(images)
    handle.remove()
    return seen["x"]


def test_official_vit_checkpoint_loads_with_no_backbone_key_missing_and_the_same_features(tmp_path):
    torch.manual_seed(0)
    name, kwargs = BEIT
    pretrain = build_simmim(name, 32, kwargs, 0.0).eval()
    official_checkpoint(tmp_path / "simmim_vit.pth", pretrain)
    weights = read_weights(tmp_path / "simmim_vit.pth")  # weights_only, the pickled yacs config read as data
    assert weights.source == "official SimMIM" and weights.decoder and weights.mask_token is not None
    inferred_name, inferred, img_size = infer_architecture(weights.encoder)
    assert inferred_name == name and img_size == 32
    assert {k: inferred[k] for k in ("embed_dim", "depth", "num_heads", "patch_size")} == {
        "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
    assert inferred["use_shared_rel_pos_bias"] and not inferred["use_rel_pos_bias"]
    # the official fine-tuning model: a relative position bias per block, mean pooling
    finetune_kwargs = classifier_kwargs(name, inferred)
    assert finetune_kwargs["use_rel_pos_bias"] and not finetune_kwargs["use_shared_rel_pos_bias"]
    model = create_backbone(name, 32, finetune_kwargs, 0.0, num_classes=5, norm_all_tokens=False).eval()
    report = load_encoder(model, weights)
    assert report.missing == [] and report.unexpected == []
    assert any("shared relative position bias" in note for note in report.adapted)
    images = torch.randn(2, 3, 32, 32)
    expected = last_block_tokens(pretrain.encoder.backbone, images)
    assert torch.allclose(last_block_tokens(model, images), expected, atol=1e-5)
    # the pooled features go through the pretrained final norm
    pooled = torch.nn.functional.layer_norm(expected[:, 1:].mean(1), (32,), pretrain.encoder.backbone.norm.weight,
                                            pretrain.encoder.backbone.norm.bias, eps=1e-6)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(images), pre_logits=True), pooled,
                              atol=1e-5)


def test_official_swin_checkpoint_in_the_old_layout_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    name, kwargs = SWIN
    pretrain = build_simmim(name, 32, {**kwargs, "window_size": 4}, 0.0).eval()
    official_checkpoint(tmp_path / "simmim_swin.pth", pretrain, old_swin_layout=True)
    weights = read_weights(tmp_path / "simmim_swin.pth")
    assert "layers.0.downsample.reduction.weight" in weights.encoder  # the old layout
    inferred_name, inferred, _ = infer_architecture(weights.encoder)
    assert inferred_name.startswith("swin_") and inferred["window_size"] == 4
    assert inferred["depths"] == [1, 1] and inferred["num_heads"] == [1, 2] and inferred["embed_dim"] == 16
    model = create_backbone(name, 32, inferred, 0.0, num_classes=3, norm_all_tokens=False).eval()
    assert load_encoder(model, weights).missing == []
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(images), pretrain.encoder.backbone.forward_features(images),
                              atol=1e-5)


def test_swin_window_6_at_192_resizes_to_window_7_at_224(tmp_path):
    torch.manual_seed(0)
    name, kwargs = SWIN
    pretrain = build_simmim(name, 192, {**kwargs, "window_size": 6}, 0.0)
    checkpoints.save_checkpoint({"kind": "pretrain", "model": pretrain.state_dict(),
                                 "config": {"model": name, "model_kwargs": {**kwargs, "window_size": 6},
                                            "img_size": 192}}, tmp_path / "pre.pth")
    weights = read_weights(tmp_path / "pre.pth")
    model = create_backbone(name, 224, {**kwargs, "window_size": 7}, 0.0, num_classes=4, norm_all_tokens=False)
    report = load_encoder(model, weights)
    assert report.missing == [] and any("resized" in note for note in report.adapted)
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (13 * 13, 1)
    logits = model(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


def test_vit_relative_tables_resize_from_192_to_224(tmp_path):
    torch.manual_seed(0)
    name, kwargs = BEIT
    pretrain = build_simmim(name, 192, {**kwargs, "patch_size": 16}, 0.0)
    official_checkpoint(tmp_path / "vit192.pth", pretrain)
    weights = read_weights(tmp_path / "vit192.pth")
    _, inferred, img_size = infer_architecture(weights.encoder)
    assert img_size == 192
    model = create_backbone(name, 224, classifier_kwargs(name, inferred), 0.0, num_classes=2, norm_all_tokens=False)
    report = load_encoder(model, weights)
    assert report.missing == [] and any("resized" in note for note in report.adapted)
    assert torch.isfinite(model(torch.randn(1, 3, 224, 224))).all()


def test_our_pretrain_checkpoint_splits_into_encoder_decoder_and_mask_token(tmp_path):
    model = build_simmim("vit_tiny_patch16_224", 32, {"patch_size": 8, "embed_dim": 32, "depth": 1,
                                                      "num_heads": 2}, 0.0)
    checkpoints.save_checkpoint({"kind": "pretrain", "model": model.state_dict(), "config": {"model": "x"}},
                                tmp_path / "ours.pth")
    weights = read_weights(tmp_path / "ours.pth")
    assert weights.kind == "pretrain" and set(weights.decoder) == {"0.weight", "0.bias"}
    assert "blocks.0.attn.qkv.weight" in weights.encoder and not any("mask_token" in k for k in weights.encoder)
    torch.save({"state_dict": {"module." + k: v for k, v in weights.encoder.items()}}, tmp_path / "timm.pth")
    plain = read_weights(tmp_path / "timm.pth")
    assert plain.source == "timm" and plain.encoder.keys() == weights.encoder.keys()


def test_weights_of_another_architecture_are_refused(tmp_path):
    vit = build_simmim("vit_tiny_patch16_224", 32, {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2})
    official_checkpoint(tmp_path / "vit.pth", vit)
    swin = create_backbone(SWIN[0], 32, {**SWIN[1], "window_size": 4}, 0.0, num_classes=3, norm_all_tokens=False)
    with pytest.raises(SimmimError, match="does not fit this model"):
        load_encoder(swin, read_weights(tmp_path / "vit.pth"))
    wider = create_backbone("vit_tiny_patch16_224", 32, {"patch_size": 8, "embed_dim": 64, "depth": 1,
                                                         "num_heads": 2}, 0.0, num_classes=3, norm_all_tokens=False)
    with pytest.raises(SimmimError, match=r"cls_token is \(1, 1, 32\) in the checkpoint and \(1, 1, 64\)"):
        load_encoder(wider, read_weights(tmp_path / "vit.pth"))
    deeper = create_backbone("vit_tiny_patch16_224", 32, {"patch_size": 8, "embed_dim": 32, "depth": 2,
                                                          "num_heads": 2}, 0.0, num_classes=3, norm_all_tokens=False)
    with pytest.raises(SimmimError, match="missing"):
        load_encoder(deeper, read_weights(tmp_path / "vit.pth"))
    report = load_encoder(deeper, read_weights(tmp_path / "vit.pth"), allow_missing=True)
    assert any(key.startswith("blocks.1.") for key in report.missing)


class Sneaky:
    """Any class that is not a known configuration type."""


def test_other_pickled_classes_are_still_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "config": Sneaky()}, tmp_path / "sneaky.pth")
    with pytest.raises(SimmimError, match="could run code"):
        checkpoints.load_checkpoint(tmp_path / "sneaky.pth")


def test_layer_decay_scales_each_depth_once():
    depth, decay = 4, 0.65
    model = create_backbone("vit_tiny_patch16_224", 32, {"patch_size": 8, "embed_dim": 32, "depth": depth,
                                                         "num_heads": 2}, 0.0, num_classes=3, norm_all_tokens=False)
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=decay)
    scale_of = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            scale_of[id(param)] = (group["lr_scale"], group["weight_decay"])
    names = dict(model.named_parameters())
    assert scale_of[id(names["patch_embed.proj.weight"])][0] == pytest.approx(decay ** (depth + 1))
    assert scale_of[id(names["cls_token"])] == (pytest.approx(decay ** (depth + 1)), 0.0)
    for block in range(depth):
        assert scale_of[id(names[f"blocks.{block}.attn.qkv.weight"])][0] == pytest.approx(decay ** (depth - block))
    assert scale_of[id(names["head.weight"])][0] == pytest.approx(1.0)
    assert scale_of[id(names["blocks.0.norm1.weight"])][1] == 0.0  # no decay on norms
    scheduler = build_scheduler(optimizer, "cosine", total_steps=100, warmup_steps=0, warmup_lr=0.0, min_lr=0.0)
    scheduler.step_update(0)
    for group in optimizer.param_groups:  # the scheduler applies the scale once, not squared
        assert group["lr"] == pytest.approx(1.0 * group["lr_scale"])
