import pytest
import torch
from conftest import TINY_MODELS

from simmim_cli.errors import SimmimError
from simmim_cli.masking import MaskGenerator
from simmim_cli.models import (
    build_simmim,
    describe_architecture,
    masked_l1_loss,
    masked_l1_per_image,
    model_family,
)


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny(request):
    name, kwargs, size = TINY_MODELS[request.param]
    torch.manual_seed(0)
    model = build_simmim(name, size, kwargs)
    masks = MaskGenerator(size, 16, model.patch_size, 0.6)
    return request.param, model, masks, size


def test_each_family_trains_forward_and_backward(tiny):
    family, model, masks, size = tiny
    images = torch.randn(2, 3, size, size)
    mask = masks(2, torch.Generator().manual_seed(0))
    loss, reconstruction = model(images, mask)
    assert model.encoder.family == family
    assert reconstruction.shape == images.shape
    assert torch.isfinite(loss)
    loss.backward()
    assert model.encoder.mask_token.grad is not None and model.encoder.mask_token.grad.abs().sum() > 0
    assert model.decoder[0].weight.grad.abs().sum() > 0
    features = model.encoder(images, mask)
    stride = model.encoder.stride
    assert features.shape == (2, model.encoder.num_features, size // stride, size // stride)


def test_mask_token_replaces_exactly_the_masked_patch_embeddings(tiny):
    _, model, masks, size = tiny
    images = torch.randn(2, 3, size, size)
    mask = masks(2, torch.Generator().manual_seed(3))
    seen = {}
    patch_embed = model.encoder.backbone.patch_embed
    # registered after the model's own hook, so it sees the tokens the backbone receives
    handle = patch_embed.register_forward_hook(lambda module, inputs, output: seen.setdefault("tokens", output))
    with torch.no_grad():
        model.encoder(images, mask)
        handle.remove()
        plain = patch_embed(images)
    tokens = seen["tokens"]
    flat_mask = mask.flatten(1) if tokens.ndim == 3 else mask
    token = model.encoder.mask_token.view(-1)
    assert torch.equal(tokens[~flat_mask], plain[~flat_mask])  # visible patches untouched
    assert torch.allclose(tokens[flat_mask], token.expand_as(tokens[flat_mask]))  # masked ones are the token
    assert not torch.allclose(plain[flat_mask], tokens[flat_mask])


def test_without_a_mask_the_encoder_is_the_plain_backbone(tiny):
    _, model, _, size = tiny
    model.eval()  # some timm defaults include drop path
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        masked_off = model.encoder(images, None)
        direct = model.encoder.tokens_to_map(model.encoder.backbone.forward_features(images))
    assert torch.equal(masked_off, direct)


def test_loss_matches_a_straightforward_reference():
    torch.manual_seed(0)
    patch = 4
    images = torch.randn(3, 3, 16, 16)
    reconstruction = torch.randn(3, 3, 16, 16)
    mask = torch.rand(3, 4, 4) > 0.5
    total, count = 0.0, 0
    for b in range(3):
        for i in range(16):
            for j in range(16):
                if mask[b, i // patch, j // patch]:
                    count += 1
                    for c in range(3):
                        total += abs(float(images[b, c, i, j] - reconstruction[b, c, i, j]))
    expected = total / (count + 1e-5) / 3
    assert masked_l1_loss(images, reconstruction, mask, patch).item() == pytest.approx(expected, rel=1e-5)
    per_image = masked_l1_per_image(images, reconstruction, mask, patch)
    assert per_image.shape == (3,)
    # with equal masked counts per image, the batch loss is the mean of the per-image losses
    equal_mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    equal_mask[:, :2] = True
    assert masked_l1_loss(images, reconstruction, equal_mask, patch).item() == pytest.approx(
        masked_l1_per_image(images, reconstruction, equal_mask, patch).mean().item(), rel=1e-5)


def test_visible_pixels_do_not_count():
    images = torch.zeros(1, 3, 8, 8)
    reconstruction = torch.zeros(1, 3, 8, 8)
    mask = torch.tensor([[[True, False], [False, False]]])
    reconstruction[..., 4:, 4:] = 100.0  # error only where nothing is masked
    assert masked_l1_loss(images, reconstruction, mask, 4).item() == 0.0
    reconstruction[..., :4, :4] = 1.0
    assert masked_l1_loss(images, reconstruction, mask, 4).item() == pytest.approx(1.0, rel=1e-5)


def test_families_and_bad_names():
    assert model_family("vit_base_patch16_224") == "vit"
    assert model_family("deit_small_patch16_224") == "vit"
    assert model_family("beit_base_patch16_224") == "beit"
    assert model_family("swin_base_patch4_window7_224") == "swin"
    assert model_family("swinv2_tiny_window8_256") == "swinv2"
    with pytest.raises(SimmimError, match="not supported"):
        model_family("resnet50")
    with pytest.raises(SimmimError, match="unknown model"):
        model_family("vit_nonexistent_999")


def test_bad_model_kwargs_are_a_user_error():
    with pytest.raises(SimmimError, match="--model-kwargs"):
        build_simmim("vit_tiny_patch16_224", 32, {"no_such_argument": 1})


def test_no_weight_decay_names_real_parameters(tiny):
    _, model, _, _ = tiny
    names = dict(model.named_parameters())
    excluded = model.no_weight_decay()
    assert "encoder.mask_token" in excluded
    assert any(name in names for name in excluded - {"encoder.mask_token"}) or model.encoder.family == "vit"


@pytest.mark.parametrize("family, expected", [("vit", "patch 8, 32 px, width 32, depth 2"),
                                              ("swin", "patch 4, 32 px, width 16, depth 2")])
def test_the_architecture_is_described_as_built(family, expected):
    name, kwargs, size = TINY_MODELS[family]
    with torch.device("meta"):
        model = build_simmim(name, size, kwargs, 0.0)
    assert describe_architecture(model, size) == expected  # not what vit_tiny_patch16_224 / swin_tiny_... say
