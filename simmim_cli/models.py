"""SimMIM on timm backbones: the masked encoder, the one-layer pixel head, and the masked L1 loss.

Any timm model of the ViT, BEiT, Swin V1 or Swin V2 families can be the encoder. Its own
``forward_features`` runs unchanged; a forward hook on ``patch_embed`` swaps the masked patch
embeddings for a learnable mask token, which is exactly where SimMIM inserts it (before the
class token and position information are added).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .errors import SimmimError

# timm module that defines a model → the encoder family we know how to mask
FAMILIES = {
    "vision_transformer": "vit",
    "deit": "vit",
    "beit": "beit",
    "swin_transformer": "swin",
    "swin_transformer_v2": "swinv2",
}

# kwargs that make a headless encoder apply its final norm to every token (SimMIM regresses from all tokens)
_NORM_ALL_TOKENS = {"vit": {"fc_norm": False}, "beit": {"use_fc_norm": False}, "swin": {}, "swinv2": {}}


def model_family(model_name: str) -> str:
    """'vit', 'beit', 'swin' or 'swinv2' for a timm model name; a SimmimError for anything else."""
    if not timm.is_model(model_name):
        raise SimmimError(
            f"unknown model '{model_name}'; list the choices with: python -c \"import timm; "
            f"print(timm.list_models('vit_*') + timm.list_models('beit_*') + timm.list_models('swin*'))\""
        )
    module = timm.models.model_entrypoint(model_name).__module__.rsplit(".", 1)[-1]
    if module not in FAMILIES:
        raise SimmimError(
            f"model '{model_name}' (timm module '{module}') is not supported; "
            "use a ViT (vit_*), BEiT (beit_*), Swin (swin_*) or Swin V2 (swinv2_*) model"
        )
    return FAMILIES[module]


def create_backbone(
    model_name: str,
    img_size: int,
    model_kwargs: dict[str, Any] | None = None,
    drop_path_rate: float | None = None,
    num_classes: int = 0,
    norm_all_tokens: bool = True,
) -> nn.Module:
    """A timm model, never with downloaded weights. ``model_kwargs`` win over everything we set.

    ``norm_all_tokens`` keeps the final norm on every token (a SimMIM encoder, a probed backbone) rather than
    on pooled features only (timm's choice for mean-pooling classifiers). ``model_kwargs`` may hold one key of ours,
    ``layer_norm_eps``: the epsilon of every LayerNorm (transformers' ViT uses 1e-12 where timm's uses 1e-6; a
    JSON number, where timm would need a ``norm_layer`` function)."""
    family = model_family(model_name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "img_size": img_size}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if norm_all_tokens:
        kwargs.update(_NORM_ALL_TOKENS[family])
    kwargs.update(model_kwargs or {})
    norm_eps = kwargs.pop("layer_norm_eps", None)
    try:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        raise SimmimError(f"timm cannot build '{model_name}' with {kwargs}: {error}; fix --model-kwargs") from error
    if norm_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(norm_eps)
    return model


class MaskedEncoder(nn.Module):
    """A timm backbone that takes a token mask and returns a feature map.

    ``forward(images (B,channels,H,W), mask (B,H/p,W/p) bool) -> (B, C, H/s, W/s)`` with ``p`` the patch size
    and ``s`` the total stride (16 for ViT-B/16, 32 for Swin). Masked patch embeddings are replaced by
    ``mask_token``.
    """

    def __init__(self, backbone: nn.Module, family: str):
        super().__init__()
        self.backbone = backbone
        self.family = family
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.stride = backbone.feature_info[-1]["reduction"]
        self.num_features = backbone.num_features
        self.num_prefix_tokens = getattr(backbone, "num_prefix_tokens", 0)  # class/register tokens (ViT, BEiT)
        embed_dim = backbone.patch_embed.proj.out_channels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self._mask: torch.Tensor | None = None  # set only for the duration of one forward
        backbone.patch_embed.register_forward_hook(self._insert_mask_token)

    def _insert_mask_token(self, module: nn.Module, inputs: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Runs right after patch_embed: ``x * (1 - w) + mask_token * w``, w = 1 on masked tokens."""
        if self._mask is None:
            return tokens
        # ViT/BEiT give (B, N, C) tokens; Swin gives (B, H, W, C)
        weight = self._mask.flatten(1) if tokens.ndim == 3 else self._mask
        weight = weight.unsqueeze(-1).to(tokens.dtype)
        return tokens * (1 - weight) + self.mask_token.to(tokens.dtype) * weight

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._mask = mask
        try:
            tokens = self.backbone.forward_features(images)
        finally:
            self._mask = None
        return self.tokens_to_map(tokens)

    def tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens → ``(B, C, H/s, W/s)``; drops class/register tokens."""
        if tokens.ndim == 4:  # Swin: (B, H, W, C)
            return tokens.permute(0, 3, 1, 2)
        tokens = tokens[:, self.num_prefix_tokens :]  # (B, N, C)
        side = int(tokens.shape[1] ** 0.5)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

    def no_weight_decay(self) -> set[str]:
        backbone_names = getattr(self.backbone, "no_weight_decay", set)()
        return {"mask_token"} | {f"backbone.{name}" for name in backbone_names}


class SimMIM(nn.Module):
    """Masked image modelling: encode all tokens with masked ones replaced, predict raw pixels, L1 on masked area.

    ``forward(images, mask) -> (loss, reconstruction)``; images are normalised ``(B, in_chans, H, W)`` (3 for RGB,
    any number of bands for other data: the head predicts every one), the mask is bool ``(B, H/p, W/p)`` on the
    encoder's patch grid.
    """

    def __init__(self, encoder: MaskedEncoder, in_chans: int = 3):
        super().__init__()
        self.encoder = encoder
        self.in_chans = in_chans
        # one linear layer per output position: 1x1 conv to stride² · in_chans values, rearranged into pixels
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, encoder.stride**2 * in_chans, kernel_size=1),
            nn.PixelShuffle(encoder.stride),
        )

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,in_chans,H,W), (B,H/p,W/p) → feature map (B, C, H/s, W/s)."""
        return self.encoder(images, mask)

    def forward_decoder(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H/s, W/s) → reconstruction (B, in_chans, H, W)."""
        return self.decoder(features)

    def forward_loss(self, images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean absolute error over the masked pixels and channels (the paper's loss)."""
        return masked_l1_loss(images, reconstruction, mask, self.patch_size)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.forward_decoder(self.forward_encoder(images, mask))
        return self.forward_loss(images, reconstruction, mask), reconstruction

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}


def pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Token mask (B, H/p, W/p) → pixel mask (B, 1, H, W) of the same dtype."""
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


def masked_l1_loss(
    images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """``sum(|x - x̂| · m) / (sum(m) + 1e-5) / C`` with m the pixel mask, as in the official code."""
    weight = pixel_mask(mask, patch_size).to(torch.float32)
    error = F.l1_loss(reconstruction.float(), images.float(), reduction="none")
    return (error * weight).sum() / (weight.sum() + 1e-5) / images.shape[1]


def masked_l1_per_image(
    images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """The same loss for each image on its own: ``(B,)``."""
    weight = pixel_mask(mask, patch_size).to(torch.float32)
    error = F.l1_loss(reconstruction.float(), images.float(), reduction="none")
    return (error * weight).sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)) + 1e-5) / images.shape[1]


class FeatureExtractor(nn.Module):
    """Pooled features ``(B, C)`` from one block (ViT, BEiT) or stage (Swin) of a timm backbone.

    ``pool`` is ``mean`` (patch tokens / spatial positions) or ``cls`` (the class token). The last block's
    output goes through the model's final norm, as in MAE's linear probing; earlier ones are taken raw.
    """

    def __init__(self, backbone: nn.Module, layer: int = -1, pool: str = "mean"):
        super().__init__()
        self.backbone = backbone
        units = len(backbone.blocks) if hasattr(backbone, "blocks") else len(backbone.layers)
        if not -units <= layer < units:
            what = "blocks" if hasattr(backbone, "blocks") else "stages"
            raise SimmimError(f"--layer {layer} is out of range: this encoder has {units} {what} "
                              f"(0..{units - 1}, or -1 for the last)")
        self.index = layer % units
        self.last = self.index == units - 1
        self.tokens = hasattr(backbone, "blocks")  # ViT/BEiT: tokens with a class token; Swin: feature maps
        if pool == "cls" and not (self.tokens and getattr(backbone, "num_prefix_tokens", 0)):
            raise SimmimError("--pool cls needs a class token; this encoder has none: use --pool mean")
        self.pool = pool
        self.num_features = backbone.feature_info[self.index]["num_chs"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        kwargs = {"return_prefix_tokens": True} if self.tokens else {}
        (output,) = self.backbone.forward_intermediates(images, indices=[self.index], norm=self.last,
                                                        intermediates_only=True, **kwargs)
        if self.tokens:
            spatial, prefix = output  # (B, C, H, W), (B, P, C)
            return prefix[:, 0] if self.pool == "cls" else spatial.mean(dim=(2, 3))
        return output.mean(dim=(2, 3))


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switches timm's attention modules between ``F.scaled_dot_product_attention`` and the explicit
    ``softmax(q @ kᵀ) @ v``. Fused kernels win on GPUs; on CPUs under bf16 the explicit form runs about twice
    as fast for ViT-sized heads (benchmarks/pretrain_step.py). Returns the number of modules switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled
            switched += 1
    return switched


def build_simmim(
    model_name: str, img_size: int, model_kwargs: dict[str, Any] | None = None, drop_path_rate: float | None = None
) -> SimMIM:
    """A SimMIM model around a fresh timm encoder; its pixel head predicts the encoder's input channels
    (``in_chans`` in ``model_kwargs``, 3 by default)."""
    family = model_family(model_name)
    backbone = create_backbone(model_name, img_size, model_kwargs, drop_path_rate, norm_all_tokens=True)
    return SimMIM(MaskedEncoder(backbone, family), input_channels(backbone))


def input_channels(model: nn.Module) -> int:
    """The number of channels a timm backbone (or a model holding one) takes."""
    backbone = model.backbone if hasattr(model, "backbone") else model
    return backbone.patch_embed.proj.in_channels


def make_classifier(config, num_classes: int, probe: bool) -> nn.Module:
    if probe:
        backbone = create_backbone(config.model, config.img_size, config.model_kwargs, 0.0, num_classes=0,
                                   norm_all_tokens=True)
        return ProbeModel(FeatureExtractor(backbone, config.layer, config.pool), num_classes)
    kwargs = {**config.model_kwargs, **({"global_pool": config.global_pool} if config.global_pool else {})}
    return create_backbone(config.model, config.img_size, kwargs, config.drop_path, num_classes=num_classes,
                           norm_all_tokens=False)


def check_img_size(model: nn.Module, img_size: int, model_name: str) -> None:
    """Refuses an input size the model cannot take: one that is not a multiple of its patch size (timm would drop
    the edge pixels without a word), or one its forward pass rejects. A model on the meta device is run there (no
    memory, no compute)."""
    backbone = model.backbone if hasattr(model, "backbone") else model
    patch = backbone.patch_embed.patch_size[0]
    channels = input_channels(backbone)
    if img_size % patch:
        raise SimmimError(f"--img-size {img_size} is not a multiple of {model_name}'s patch size {patch}; "
                          f"use e.g. {max(1, round(img_size / patch)) * patch}")
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.device(device):
            model.eval()(torch.zeros(2, channels, img_size, img_size))
    except (AssertionError, RuntimeError, ValueError) as error:
        raise SimmimError(f"--img-size {img_size} does not work with {model_name}: "
                          f"{str(error).splitlines()[0]}; choose a size the model takes") from error


def describe_architecture(model: nn.Module, img_size: int) -> str:
    """What the model is, whatever its timm name says: ``patch 8, 96 px, width 192, depth 6`` (the timm encoder
    inside a SimMIM model, a classifier or a probe; Swin's width is its first stage's)."""
    encoder = next((m for m in model.modules() if hasattr(m, "patch_embed")), None)
    if encoder is None:
        return f"{img_size} px"
    patch = encoder.patch_embed.patch_size
    stages = getattr(encoder, "layers", None)
    depth = sum(len(stage.blocks) for stage in stages) if stages is not None else len(getattr(encoder, "blocks", []))
    width = getattr(encoder, "embed_dim", None) or encoder.num_features
    return f"patch {patch[0] if isinstance(patch, tuple) else patch}, {img_size} px, width {width}, depth {depth}"


class ProbeModel(nn.Module):
    """A frozen encoder (always in eval mode) and a trainable BatchNorm (no affine) + linear head."""

    def __init__(self, extractor: FeatureExtractor, num_classes: int):
        super().__init__()
        self.extractor = extractor
        self.extractor.requires_grad_(False)
        self.head = nn.Sequential(nn.BatchNorm1d(extractor.num_features, affine=False, eps=1e-6),
                                  nn.Linear(extractor.num_features, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    @property
    def backbone(self) -> nn.Module:
        return self.extractor.backbone

    def train(self, mode: bool = True) -> ProbeModel:
        super().train(mode)
        self.extractor.eval()  # frozen means frozen: no dropout, no drop path, no batch statistics
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.extractor(images).float()

    def forward(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(images) if features is None else features)


