"""Pretrained weights: what a checkpoint holds, which model it fits, and loading it into that model.

Reads this toolkit's checkpoints (pretrain, finetune, linear-probe), the official SimMIM releases (a dict with
``model``; ``encoder.*``/``decoder.*`` keys; the ViT is timm's BEiT, the Swin is timm's Swin V1 in its old
layout), plain timm state dicts, and Hugging Face ``transformers`` ViT/Swin folders or Hub ids (``hf.py`` maps
their names). Tables and position embeddings are resized with timm's own checkpoint
filters (torch interpolation) when the image or window size changes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoints, hf
from .errors import SimmimError
from .models import model_family

# keys that are allowed to be absent from a checkpoint: a classifier's new head (and its norm)
HEAD_PREFIXES = ("head.", "fc_norm.")


@dataclass
class Weights:
    """The parts of a checkpoint, keyed as timm names them."""

    encoder: dict[str, torch.Tensor]  # timm backbone keys (with the classifier head when there is one)
    source: str  # "simmim-cli pretrain", "simmim-cli finetune", "official SimMIM", "timm", "Hugging Face <class>"
    path: Path
    kind: str | None = None  # a simmim-cli checkpoint's kind: pretrain, finetune, linear-probe
    decoder: dict[str, torch.Tensor] | None = None  # the SimMIM head's "0.weight", "0.bias"
    mask_token: torch.Tensor | None = None
    config: dict[str, Any] | None = None  # the run config of a simmim-cli checkpoint (model, kwargs, size of others)
    classes: list[str] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was left out or changed while reading


def read_weights(path: str | Path) -> Weights:
    """Any supported checkpoint → :class:`Weights` (a sharded run's checkpoint folder reads as its ``.pth`` would)."""
    if hf.is_hf(path):
        found = hf.read_folder(path)
        return Weights(encoder=found.encoder, source=f"Hugging Face {found.architecture}", path=Path(str(path)),
                       decoder=found.decoder, mask_token=found.mask_token, classes=found.classes, notes=found.notes,
                       config={"model": found.model, "model_kwargs": found.model_kwargs, "img_size": found.img_size,
                               "image_spec": found.image_spec})
    path = Path(path)
    if path.is_dir() and not checkpoints.is_sharded_checkpoint(path):
        raise SimmimError(f"{path} is a folder without config.json; give a checkpoint file, a sharded checkpoint "
                          "folder (checkpoint-N.dcp), or a folder written by transformers' save_pretrained")
    checkpoint = checkpoints.load_checkpoint(path)
    if "format_version" in checkpoint and "kind" in checkpoint:  # this toolkit
        state = checkpoint["model"]
        if checkpoint["kind"] == "pretrain":
            return Weights(
                encoder=_take(state, "encoder.backbone."), decoder=_take(state, "decoder.") or None,
                mask_token=state.get("encoder.mask_token"), source="simmim-cli pretrain", path=path,
                kind="pretrain", config=checkpoint.get("config"),
            )
        return Weights(encoder=dict(state), source=f"simmim-cli {checkpoint['kind']}", path=path,
                       kind=checkpoint["kind"], config=checkpoint.get("config"), classes=checkpoint.get("classes"),
                       metrics=checkpoint.get("metrics") or {})
    state = checkpoint
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = checkpoints.strip_prefixes({k: v for k, v in state.items() if torch.is_tensor(v)})
    if not state:
        raise SimmimError(f"{path} holds no tensors; is it a model checkpoint?")
    if any(k.startswith("encoder.") for k in state):  # the official SimMIM layout
        return Weights(encoder=_take(state, "encoder."), decoder=_take(state, "decoder.") or None,
                       mask_token=state.get("encoder.mask_token"), source="official SimMIM", path=path)
    return Weights(encoder=state, source="timm", path=path)


def _take(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k != "encoder.mask_token"}


# ---------------------------------------------------------------------------------------------- architecture


def infer_architecture(encoder: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any], int | None]:
    """(timm model name, create_model kwargs, image size or None) read off the tensors.

    What the tensors do not show (the head count of a plain ViT, the image size of a Swin) falls back to the
    usual values; ``--model``, ``--model-kwargs`` and ``--img-size`` override everything.
    """
    if "patch_embed.proj.weight" not in encoder:
        raise SimmimError("cannot tell the architecture of these weights (no patch_embed.proj.weight); "
                          "give --model and --model-kwargs")
    embed_dim, channels, patch, _ = encoder["patch_embed.proj.weight"].shape
    extra = {"in_chans": channels} if channels != 3 else {}
    if any(k.startswith("layers.") for k in encoder):
        stages = sorted({int(k.split(".")[1]) for k in encoder if k.startswith("layers.")})
        depths = [len({k.split(".")[3] for k in encoder if k.startswith(f"layers.{s}.blocks.")}) for s in stages]
        tables = [encoder.get(f"layers.{s}.blocks.0.attn.relative_position_bias_table") for s in stages]
        if any(t is None for t in tables):
            raise SimmimError("these Swin weights have no relative position tables (Swin V2?); give --model and "
                              "--model-kwargs")
        window = (math.isqrt(tables[0].shape[0]) + 1) // 2
        kwargs = {"embed_dim": embed_dim, "depths": depths, "num_heads": [t.shape[1] for t in tables],
                  "window_size": window, "patch_size": patch, **extra}
        return "swin_base_patch4_window7_224", kwargs, None
    depth = len({k.split(".")[1] for k in encoder if k.startswith("blocks.")})
    mlp_ratio = encoder["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    beit = any("rel_pos_bias" in k or "gamma_1" in k or k.endswith("q_bias") for k in encoder)
    if beit:
        shared = encoder.get("rel_pos_bias.relative_position_bias_table")
        block = encoder.get("blocks.0.attn.relative_position_bias_table")
        table = shared if shared is not None else block
        heads = table.shape[1] if table is not None else max(1, embed_dim // 64)
        kwargs = {"embed_dim": embed_dim, "depth": depth, "num_heads": heads, "patch_size": patch,
                  "mlp_ratio": mlp_ratio, "use_abs_pos_emb": "pos_embed" in encoder,
                  "use_shared_rel_pos_bias": shared is not None, "use_rel_pos_bias": block is not None,
                  "init_values": 0.1 if "blocks.0.gamma_1" in encoder else None, **extra}
        img_size = None
        if table is not None:
            grid = (math.isqrt(table.shape[0] - 3) + 1) // 2
            img_size = grid * patch
        return "beit_base_patch16_224", kwargs, img_size
    kwargs = {"embed_dim": embed_dim, "depth": depth, "num_heads": max(1, embed_dim // 64), "patch_size": patch,
              "mlp_ratio": mlp_ratio, "class_token": "cls_token" in encoder, **extra}
    img_size = None
    if "pos_embed" in encoder:
        tokens = encoder["pos_embed"].shape[1] - (1 if "cls_token" in encoder else 0)
        img_size = math.isqrt(tokens) * patch
    return "vit_base_patch16_224", kwargs, img_size


def classifier_kwargs(model_name: str, pretrain_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The official fine-tuning variant of a pretraining encoder: a BEiT pretrained with one shared relative
    position bias is fine-tuned with a bias per block (each starting from the shared one)."""
    kwargs = dict(pretrain_kwargs)
    if model_family(model_name) == "beit" and kwargs.get("use_shared_rel_pos_bias"):
        kwargs.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    return kwargs


def architecture_of(weights: Weights) -> tuple[str, dict[str, Any], int | None]:
    """The encoder a checkpoint was trained with: from its config when it has one, else from its tensors."""
    if weights.config and weights.config.get("model"):
        config = weights.config
        return config["model"], dict(config.get("model_kwargs") or {}), config.get("img_size")
    return infer_architecture(weights.encoder)


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    missing: list[str]
    unexpected: list[str]
    adapted: list[str]  # what was changed to fit (resized tables, copied shared bias, ...)


def adapt_state(encoder: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Makes checkpoint tensors fit ``model``: shared → per-block relative bias, final norm → pooled norm, and
    timm's checkpoint filter of the model's family (relative tables, position embeddings, patch embedding
    resized by interpolation; old Swin layout converted)."""
    import timm.models.beit as beit
    import timm.models.swin_transformer as swin
    import timm.models.swin_transformer_v2 as swinv2
    import timm.models.vision_transformer as vit

    state = dict(encoder)
    notes: list[str] = []
    names = set(model.state_dict())
    shared = state.get("rel_pos_bias.relative_position_bias_table")
    if shared is not None and "blocks.0.attn.relative_position_bias_table" in names \
            and "blocks.0.attn.relative_position_bias_table" not in state:
        for index in range(len(model.blocks)):
            state[f"blocks.{index}.attn.relative_position_bias_table"] = shared.clone()
        state = {k: v for k, v in state.items() if not k.startswith("rel_pos_bias.")}
        notes.append("copied the shared relative position bias into every block")
    if "norm.weight" in state and "norm.weight" not in names and "fc_norm.weight" in names \
            and "fc_norm.weight" not in state:
        state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
        notes.append("the final norm initialises the pooled-feature norm (fc_norm)")
    _adapt_input_channels(state, model, notes)
    family = model_family(model.pretrained_cfg["architecture"])
    filters = {"vit": vit.checkpoint_filter_fn, "beit": beit.checkpoint_filter_fn,
               "swin": swin.checkpoint_filter_fn, "swinv2": swinv2.checkpoint_filter_fn}
    before = {k: tuple(v.shape) for k, v in state.items()}
    with warnings.catch_warnings():  # timm's table interpolation trips over torch deprecation notices
        warnings.simplefilter("ignore", UserWarning)
        state = filters[family](state, model)
    resized = sorted(k for k, v in state.items() if k in before and tuple(v.shape) != before[k])
    if resized:
        notes.append(f"resized {len(resized)} tensor(s) to the model's size ({resized[0]}, ...)")
    return state, notes


def _adapt_input_channels(state: dict[str, torch.Tensor], model: nn.Module, notes: list[str]) -> None:
    """RGB weights (official, timm, Hugging Face) into an encoder of other channels: the patch embedding adapted
    as timm adapts it when it loads pretrained weights with another ``in_chans`` (the RGB filters summed for one
    channel, repeated and rescaled for more)."""
    from timm.models import adapt_input_conv

    key = "patch_embed.proj.weight"
    weight = state.get(key)
    wanted = model.patch_embed.proj.in_channels
    if weight is None or weight.ndim != 4 or weight.shape[1] == wanted:
        return
    if weight.shape[1] != 3:
        raise SimmimError(f"these weights take {weight.shape[1]} input channels and the data has {wanted}; "
                          f"pick {weight.shape[1]} bands with --bands, or start from weights of {wanted} channels (or "
                          "RGB weights, which are adapted)")
    state[key] = adapt_input_conv(wanted, weight)
    notes.append(f"adapted the 3-channel patch embedding to {wanted} channels (timm's adapt_input_conv)")


def load_encoder(model: nn.Module, weights: Weights, allow_missing: bool = False) -> LoadReport:
    """Loads ``weights.encoder`` into a timm model. Backbone keys that are missing or left over fail the load
    unless ``allow_missing``; the classifier head may differ (a new head is expected)."""
    state, notes = adapt_state(weights.encoder, model)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    for key in mismatched:
        if not key.startswith(HEAD_PREFIXES):
            raise SimmimError(
                f"{weights.path} does not fit this model: {key} is {tuple(state[key].shape)} in the checkpoint "
                f"and {tuple(own[key].shape)} in the model; choose the --model/--model-kwargs it was trained with")
        del state[key]  # a head for another number of classes
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(HEAD_PREFIXES)]
    if (missing or unexpected) and not allow_missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        raise SimmimError(f"{weights.path} does not fit this model: {' and '.join(parts)} backbone keys; "
                          "choose the --model/--model-kwargs it was trained with, or pass --allow-missing")
    return LoadReport(missing=missing, unexpected=unexpected, adapted=[*weights.notes, *notes])


def load_simmim(
    path: str | Path,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    img_size: int | None = None,
) -> tuple[nn.Module, Weights, LoadReport]:
    """A whole SimMIM model (encoder, mask token, pixel head) from a pretrain checkpoint of this toolkit or an
    official release; ``model_name``/``model_kwargs``/``img_size`` fill in what the checkpoint does not say, or
    change it (tables resized, the size checked). Without decoder weights in the checkpoint the head stays randomly
    initialised (see ``Weights.decoder``)."""
    from .models import build_simmim, check_img_size

    weights = read_weights(path)
    name, kwargs, size = architecture_of(weights)
    kwargs = {**kwargs, **(model_kwargs or {})}
    model = build_simmim(model_name or name, img_size or size or 224, kwargs, 0.0)
    report = load_encoder(model.encoder.backbone, weights)
    if img_size or model_kwargs:
        check_img_size(model.encoder.backbone, img_size or size or 224, model_name or name)
    if weights.mask_token is not None:
        if weights.mask_token.shape != model.encoder.mask_token.shape:
            raise SimmimError(f"{path}: its mask token is {tuple(weights.mask_token.shape)}, the model's "
                              f"{tuple(model.encoder.mask_token.shape)}; give the --model-kwargs it was trained with")
        model.encoder.mask_token.data.copy_(weights.mask_token)
    if weights.decoder:
        try:
            model.decoder.load_state_dict(weights.decoder)
        except RuntimeError as error:
            raise SimmimError(f"{path}: the pixel head does not fit this model ({str(error).splitlines()[-1]}); "
                              "give the --model-kwargs and --img-size it was trained with") from error
    return model.eval(), weights, report
